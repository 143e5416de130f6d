//! Unicast discovery: a bounded-concurrency TCP sweep of the configured addresses, UDP
//! HELLO, and the HTTP interface where the ESC/VP.net port is closed.
//!
//! [`discover`]: each address gets a TCP connection to its port, the ESC/VP.net CONNECT
//! handshake (with the target's password) and, when the session opens, `SNO?` for the serial
//! number; then the session is closed. Only the given endpoints are contacted, each once.
//!
//! [`discover_combined`] adds, alongside the sweep, the ESC/VP.net HELLO over UDP sent by
//! unicast to each configured address and port ([`hello_sweep`]: never a broadcast, replies
//! from other addresses ignored), and, where the TCP port refused or closed the connection,
//! `SNO?` over the HTTP `json_query` interface ([`http_probe`]). [`devices`] then groups the
//! sightings by serial number, so one projector seen at two addresses is one device.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use epmc_proto::model::DeviceId;
use escvp::discovery::DiscoveryConfig;
use escvp::net::HelloInfo;

use crate::collect::{CollectError, CollectOptions, Projector, Report, Stage};
use crate::config::Endpoint;
use crate::http::{HttpError, HttpProjector};

/// What one address said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// It completed the ESC/VP.net handshake: a projector we can talk to.
    Projector {
        /// Its serial number (`SNO?`), if it gave one.
        serial: Option<String>,
        /// What went wrong after the handshake, if anything (e.g. `SNO?` timed out).
        problem: Option<CollectError>,
    },
    /// It answered in ESC/VP.net but would not open a session: busy, password required or
    /// wrong, not allowed. A projector, but not one we can read right now.
    Locked(CollectError),
    /// No projector: nothing listens, no answer, or the peer does not speak ESC/VP.net.
    Absent(CollectError),
}

impl ProbeOutcome {
    /// Whether a projector answered the ESC/VP.net handshake (whether or not it let us in).
    pub fn is_projector(&self) -> bool {
        !matches!(self, ProbeOutcome::Absent(_))
    }
}

/// One probed address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The address.
    pub addr: SocketAddr,
    /// What it said.
    pub outcome: ProbeOutcome,
}

/// Probes one endpoint, within [`CollectOptions::deadline`].
pub async fn probe(endpoint: &Endpoint, options: &CollectOptions) -> Probe {
    let work = async {
        let mut projector = match Projector::connect(endpoint, options).await {
            Ok(p) => p,
            Err(e) if e.is_escvp_refusal() => return ProbeOutcome::Locked(e),
            Err(e) => return ProbeOutcome::Absent(e),
        };
        let mut report = Report::default();
        let outcome = match projector.identify(&mut report).await {
            Ok(_) => ProbeOutcome::Projector {
                serial: projector.serial().map(str::to_owned),
                problem: None,
            },
            Err(e) => ProbeOutcome::Projector {
                serial: None,
                problem: Some(e),
            },
        };
        projector.close().await;
        outcome
    };
    let outcome = tokio::time::timeout(options.deadline, work)
        .await
        .unwrap_or(ProbeOutcome::Absent(CollectError::TimedOut(
            Stage::Deadline,
        )));
    Probe {
        addr: endpoint.addr,
        outcome,
    }
}

/// Probes every endpoint, at most `concurrency` at once; results in the endpoints' order.
pub async fn discover(
    endpoints: &[Endpoint],
    options: &CollectOptions,
    concurrency: usize,
) -> Vec<Probe> {
    crate::sweep::bounded_map(endpoints, concurrency, |e| {
        let e = e.clone();
        let options = options.clone();
        async move { probe(&e, &options).await }
    })
    .await
}

// ---- UDP HELLO, the HTTP fallback, and the combined sweep ----------------------------------

/// UDP HELLO settings of [`discover_combined`].
#[derive(Clone, Debug)]
pub struct HelloOptions {
    /// How long to wait for replies in all.
    pub timeout: Duration,
    /// How many times HELLO is sent to each address (UDP may drop it).
    pub attempts: u32,
}

impl Default for HelloOptions {
    fn default() -> Self {
        HelloOptions {
            timeout: Duration::from_millis(1500),
            attempts: 3,
        }
    }
}

/// Sends the ESC/VP.net HELLO by unicast to each endpoint's address and port (UDP; never a
/// broadcast, never another address) and returns who answered, by address. Replies that do
/// not come from a configured address are ignored.
pub async fn hello_sweep(
    endpoints: &[Endpoint],
    options: &HelloOptions,
) -> std::io::Result<BTreeMap<SocketAddr, HelloInfo>> {
    let wanted: BTreeSet<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
    let mut found = BTreeMap::new();
    for v4 in [true, false] {
        let targets: Vec<SocketAddr> = wanted
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == v4)
            .collect();
        if targets.is_empty() {
            continue;
        }
        let bind = if v4 {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let replies = escvp::discovery::discover(&DiscoveryConfig {
            targets,
            bind,
            broadcast: false,
            timeout: options.timeout,
            attempts: options.attempts,
        })
        .await?;
        for d in replies {
            if wanted.contains(&d.addr) {
                found.insert(d.addr, d.info);
            } else {
                tracing::debug!(from = %d.addr, "HELLO reply from an address not configured, ignored");
            }
        }
    }
    Ok(found)
}

/// What the HTTP `json_query` interface said where the ESC/VP.net port was closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpProbe {
    /// It answered json_query: a projector reachable over HTTP; its serial if `SNO?` gave
    /// one.
    Projector {
        /// The serial number.
        serial: Option<String>,
    },
    /// It asked for Digest credentials we do not have or refused ours: probably a projector,
    /// but not one we can read.
    Locked(HttpError),
    /// No json_query there.
    Absent(HttpError),
}

/// Reads `SNO?` over HTTP at `endpoint`'s address and HTTP port.
pub async fn http_probe(
    endpoint: &Endpoint,
    http_port: u16,
    options: &CollectOptions,
) -> HttpProbe {
    let work = async {
        let mut p = HttpProjector::for_endpoint(endpoint, http_port, options)?;
        let mut report = Report::default();
        p.identify(&mut report).await?;
        Ok::<_, HttpError>(p.serial().map(str::to_owned))
    };
    match tokio::time::timeout(options.deadline, work).await {
        Ok(Ok(serial)) => HttpProbe::Projector { serial },
        Ok(Err(e @ (HttpError::PasswordRequired | HttpError::WrongPassword))) => {
            HttpProbe::Locked(e)
        }
        Ok(Err(e)) => HttpProbe::Absent(e),
        Err(_) => HttpProbe::Absent(HttpError::TimedOut(Stage::Deadline)),
    }
}

/// Everything one configured address said: the TCP sweep, UDP HELLO and, where port 3629
/// refused or closed the connection, the HTTP interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    /// The configured address (and ESC/VP.net port).
    pub addr: SocketAddr,
    /// The ESC/VP.net TCP probe.
    pub tcp: ProbeOutcome,
    /// The HELLO reply, if any.
    pub hello: Option<HelloInfo>,
    /// The HTTP probe, if tried.
    pub http: Option<HttpProbe>,
}

impl Sighting {
    /// Whether anything says a projector is there.
    pub fn is_projector(&self) -> bool {
        self.tcp.is_projector()
            || self.hello.is_some()
            || matches!(
                self.http,
                Some(HttpProbe::Projector { .. } | HttpProbe::Locked(_))
            )
    }

    /// The serial number, from ESC/VP.net or HTTP.
    pub fn serial(&self) -> Option<&str> {
        match (&self.tcp, &self.http) {
            (
                ProbeOutcome::Projector {
                    serial: Some(s), ..
                },
                _,
            ) => Some(s),
            (
                _,
                Some(HttpProbe::Projector {
                    serial: Some(s), ..
                }),
            ) => Some(s),
            _ => None,
        }
    }

    /// The device id: the serial when known, `ip:ADDR` otherwise.
    pub fn device_id(&self) -> DeviceId {
        crate::collect::device_id(self.serial(), self.addr)
    }
}

/// The TCP sweep, UDP HELLO (unless `hello` is `None`) and, where 3629 refused or closed the
/// connection and the endpoint has an HTTP port, an HTTP probe; one [`Sighting`] per
/// endpoint, in the endpoints' order. HELLO runs alongside the sweep. A HELLO socket that
/// cannot be opened is logged and the sweep goes on without it.
pub async fn discover_combined(
    endpoints: &[Endpoint],
    options: &CollectOptions,
    concurrency: usize,
    hello: Option<&HelloOptions>,
) -> Vec<Sighting> {
    discover_combined_observed(endpoints, options, concurrency, hello, |_, _| {}).await
}

/// [`discover_combined`], calling `probed(finished, found)` as each endpoint's probe comes
/// in: how many have been probed, and whether this one found a projector (over ESC/VP.net,
/// or over HTTP where 3629 was closed; HELLO replies are only known at the end): for a
/// progress display.
pub async fn discover_combined_observed(
    endpoints: &[Endpoint],
    options: &CollectOptions,
    concurrency: usize,
    hello: Option<&HelloOptions>,
    mut probed: impl FnMut(usize, bool),
) -> Vec<Sighting> {
    let hellos = async {
        match hello {
            Some(h) => hello_sweep(endpoints, h).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "UDP HELLO discovery failed");
                BTreeMap::new()
            }),
            None => BTreeMap::new(),
        }
    };
    let sweep = crate::sweep::bounded_map_observed(
        endpoints,
        concurrency,
        |e| {
            let e = e.clone();
            let options = options.clone();
            async move {
                let probe = probe(&e, &options).await;
                let http = match (&probe.outcome, e.http_port) {
                    (ProbeOutcome::Absent(err), Some(port))
                        if crate::http::fallback_applies(err) =>
                    {
                        Some(http_probe(&e, port, &options).await)
                    }
                    _ => None,
                };
                (probe, http)
            }
        },
        |n, (probe, http): &(Probe, Option<HttpProbe>)| {
            let found = probe.outcome.is_projector()
                || matches!(
                    http,
                    Some(HttpProbe::Projector { .. } | HttpProbe::Locked(_))
                );
            probed(n, found);
        },
    );
    let (mut hellos, probes) = tokio::join!(hellos, sweep);
    probes
        .into_iter()
        .map(|(p, http)| Sighting {
            addr: p.addr,
            hello: hellos.remove(&p.addr),
            tcp: p.outcome,
            http: http.filter(|h| !matches!(h, HttpProbe::Absent(e) if e.is_no_server())),
        })
        .collect()
}

/// One device among the sightings: addresses that reported the same serial number are one
/// device (an address change or a second interface does not make a second device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredDevice {
    /// The serial number, or `ip:ADDR` where no serial is known.
    pub device_id: DeviceId,
    /// The sightings of this device, in the endpoints' order.
    pub sightings: Vec<Sighting>,
}

/// Groups the sightings that found a projector into devices keyed by serial number (the
/// `ip:` id where unknown), in order of first appearance.
pub fn devices(sightings: &[Sighting]) -> Vec<DiscoveredDevice> {
    let mut out: Vec<DiscoveredDevice> = Vec::new();
    for s in sightings.iter().filter(|s| s.is_projector()) {
        let id = s.device_id();
        match out.iter_mut().find(|d| d.device_id == id) {
            Some(d) => d.sightings.push(s.clone()),
            None => out.push(DiscoveredDevice {
                device_id: id,
                sightings: vec![s.clone()],
            }),
        }
    }
    out
}
