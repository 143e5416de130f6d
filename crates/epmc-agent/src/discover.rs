//! Unicast discovery: a bounded-concurrency TCP sweep of the configured addresses.
//!
//! Each address gets a TCP connection to its port, the ESC/VP.net CONNECT handshake (with the
//! target's password) and, when the session opens, `SNO?` for the serial number; then the
//! session is closed. Only the given endpoints are contacted, each once.

use std::net::SocketAddr;

use crate::collect::{CollectError, CollectOptions, Projector, Report, Stage};
use crate::config::Endpoint;

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
