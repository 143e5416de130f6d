//! A fleet of emulated projectors on 127.0.0.1, a few of them faulty: discovery and
//! collection of all of them with bounded concurrency; every healthy one read exactly, every
//! faulty one reported as what it is.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use epmc_agent::collect::{CollectError, CollectOptions, Stage, collect_all};
use epmc_agent::config::{Endpoint, TargetSpec};
use epmc_agent::discover::{ProbeOutcome, discover};
use epmc_proto::model::PowerState;
use escvp::emulator::{ClosedPort, Fleet, ProjectorConfig, fleet_plan};
use escvp::net::Password;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const BOUND: Duration = Duration::from_secs(60);
const FLEET: usize = 50;
const CONCURRENCY: usize = 8;

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the test did not finish within its bound")
}

fn quick() -> CollectOptions {
    CollectOptions {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_millis(500),
        command_timeout_scale: 0.1,
        deadline: Duration::from_secs(10),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Healthy,
    Busy,
    Password,
    Silent,
    Garbage,
    Drops,
}

fn role(i: usize) -> Role {
    match i {
        4 => Role::Busy,
        11 => Role::Password,
        19 => Role::Silent,
        27 => Role::Garbage,
        35 | 36 => Role::Drops,
        _ => Role::Healthy,
    }
}

/// Refuses connections, and stays ours until dropped.
fn closed_port() -> ClosedPort {
    ClosedPort::on(Ipv4Addr::LOCALHOST.into()).expect("reserve a port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_fifty_with_faulty_ones() {
    bounded(async {
        let template = ProjectorConfig {
            serial: "FLT0000000".into(),
            hours_per_second: 0.0,
            start_on: true,
            ..ProjectorConfig::default()
        };
        let first: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let plan: Vec<(SocketAddr, ProjectorConfig)> = fleet_plan(first, FLEET, false, &template)
            .into_iter()
            .enumerate()
            .map(|(i, (addr, mut c))| {
                c.model = format!("EB-FLEET-{i:02}");
                c.lamp_hours = vec![100 + i as u32];
                c.on_time_hours = 1000 + 7 * i as u32;
                match role(i) {
                    Role::Healthy => {}
                    Role::Busy => c.faults.busy = true,
                    Role::Password => c.password = Some(Password::new("pw").expect("password")),
                    Role::Silent => c.faults.silent = true,
                    Role::Garbage => c.faults.garbage = b"\x00\xffjunk".to_vec(),
                    Role::Drops => c.faults.drop_after = Some(2),
                }
                (addr, c)
            })
            .collect();
        let configs: Vec<ProjectorConfig> = plan.iter().map(|(_, c)| c.clone()).collect();
        let fleet = Fleet::spawn(plan).await.expect("fleet starts");
        let projectors = fleet.projectors();
        assert_eq!(projectors.len(), FLEET);

        // The configured list: every projector plus two addresses where nothing listens.
        let mut endpoints: Vec<Endpoint> = projectors
            .iter()
            .map(|p| Endpoint::new(p.tcp_addr()))
            .collect();
        let nothing = [closed_port(), closed_port()];
        endpoints.insert(7, Endpoint::new(nothing[0].addr()));
        endpoints.push(Endpoint::new(nothing[1].addr()));
        let index_of = |addr: SocketAddr| projectors.iter().position(|p| p.tcp_addr() == addr);

        // Discovery.
        let probes = discover(&endpoints, &quick(), CONCURRENCY).await;
        assert_eq!(probes.len(), endpoints.len());
        for (probe, endpoint) in probes.iter().zip(&endpoints) {
            assert_eq!(probe.addr, endpoint.addr);
            let Some(i) = index_of(probe.addr) else {
                assert_eq!(
                    probe.outcome,
                    ProbeOutcome::Absent(CollectError::Refused),
                    "{}",
                    probe.addr
                );
                continue;
            };
            let serial = projectors[i].serial().to_owned();
            match (role(i), &probe.outcome) {
                (
                    Role::Healthy | Role::Drops,
                    ProbeOutcome::Projector {
                        serial: s,
                        problem: None,
                    },
                ) => {
                    assert_eq!(s.as_deref(), Some(serial.as_str()), "#{i}");
                }
                (Role::Busy, ProbeOutcome::Locked(CollectError::Busy)) => {}
                (Role::Password, ProbeOutcome::Locked(CollectError::PasswordRequired)) => {}
                (
                    Role::Silent,
                    ProbeOutcome::Projector {
                        serial: None,
                        problem: Some(CollectError::TimedOut(Stage::Command("SNO"))),
                    },
                ) => {}
                (
                    Role::Garbage,
                    ProbeOutcome::Projector {
                        serial: None,
                        problem: Some(CollectError::Garbage(_)),
                    },
                ) => {}
                (r, other) => panic!("#{i} ({r:?}): unexpected {other:?}"),
            }
            assert!(probe.outcome.is_projector());
        }
        let answered: BTreeSet<SocketAddr> = probes
            .iter()
            .filter(|p| p.outcome.is_projector())
            .map(|p| p.addr)
            .collect();
        let expected: BTreeSet<SocketAddr> = projectors.iter().map(|p| p.tcp_addr()).collect();
        assert_eq!(answered, expected);

        // Collection.
        let results = collect_all(&endpoints, &quick(), CONCURRENCY).await;
        assert_eq!(results.len(), endpoints.len());
        let mut healthy = 0;
        for (result, endpoint) in results.iter().zip(&endpoints) {
            let Some(i) = index_of(endpoint.addr) else {
                assert_eq!(result.as_ref().err(), Some(&CollectError::Refused));
                continue;
            };
            match (role(i), result) {
                (Role::Healthy, Ok(c)) => {
                    healthy += 1;
                    let col = &c.collection;
                    assert_eq!(c.addr, endpoint.addr);
                    assert_eq!(col.device_id.as_str(), projectors[i].serial(), "#{i}");
                    assert_eq!(
                        col.info.model.as_ref().map(|m| m.as_str()),
                        Some(configs[i].model.as_str())
                    );
                    assert_eq!(col.status.power, Some(PowerState::On), "#{i}");
                    assert_eq!(
                        col.status
                            .light_up_time_hours
                            .as_ref()
                            .map(|h| h.as_slice().to_vec()),
                        Some(vec![100 + i as u32]),
                        "#{i}"
                    );
                    assert_eq!(
                        col.status.total_operation_time_hours,
                        Some(1000 + 7 * i as u32),
                        "#{i}"
                    );
                    assert_eq!(col.status.error_code.map(|c| c.get()), Some(0));
                    assert_eq!(col.status.source.as_ref().map(|s| s.code.get()), Some(0x30));
                    assert_eq!(col.settings.volume, Some(120));
                    assert_eq!(c.report.unsupported, ["VER", "NWPNAME"]);
                }
                (Role::Busy, Err(CollectError::Busy)) => {}
                (Role::Password, Err(CollectError::PasswordRequired)) => {}
                (Role::Silent, Err(CollectError::TimedOut(Stage::Command("SNO")))) => {}
                (Role::Garbage, Err(CollectError::Garbage(_))) => {}
                (Role::Drops, Err(CollectError::Dropped)) => {}
                (r, other) => panic!("#{i} ({r:?}): unexpected {other:?}"),
            }
        }
        assert_eq!(healthy, FLEET - 6);
        fleet.shutdown().await;
    })
    .await;
}

/// Binds a few emulators on 127.0.0.x sharing one port, so that a CIDR range covers them.
async fn fleet_on_addresses(hosts: &[u8]) -> (Fleet, u16) {
    let mut last = None;
    for _ in 0..8 {
        // A free port (released at once, so that the fleet can take it on each address).
        let port = closed_port().addr().port();
        let plan = hosts.iter().map(|h| {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, *h)), port);
            let config = ProjectorConfig {
                serial: format!("RNG00000{h:02}"),
                ..ProjectorConfig::default()
            };
            (addr, config)
        });
        match Fleet::spawn(plan).await {
            Ok(f) => return (f, port),
            Err(e) => last = Some(e),
        }
    }
    panic!("no common free port on 127.0.0.x: {last:?}");
}

#[tokio::test]
async fn a_cidr_range_is_swept_address_by_address() {
    bounded(async {
        let hosts = [17u8, 18, 20, 23];
        let (fleet, port) = fleet_on_addresses(&hosts).await;
        let spec: TargetSpec = format!("127.0.0.16/29:{port}").parse().expect("range");
        let endpoints: Vec<Endpoint> = spec.addresses().map(Endpoint::new).collect();
        // .17 to .22: the network (.16) and broadcast (.23) addresses are not contacted.
        let swept: Vec<u8> = endpoints
            .iter()
            .map(|e| match e.addr.ip() {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect();
        assert_eq!(swept, [17, 18, 19, 20, 21, 22]);
        let probes = discover(&endpoints, &quick(), 3).await;
        let found: Vec<(u8, Option<String>)> = probes
            .iter()
            .filter_map(|p| match (&p.outcome, p.addr.ip()) {
                (
                    ProbeOutcome::Projector {
                        serial,
                        problem: None,
                    },
                    IpAddr::V4(v4),
                ) => Some((v4.octets()[3], serial.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            found,
            [
                (17, Some("RNG0000017".to_owned())),
                (18, Some("RNG0000018".to_owned())),
                (20, Some("RNG0000020".to_owned())),
            ]
        );
        for p in probes.iter().filter(|p| !p.outcome.is_projector()) {
            assert_eq!(
                p.outcome,
                ProbeOutcome::Absent(CollectError::Refused),
                "{}",
                p.addr
            );
        }
        // The emulator on the broadcast address was never contacted.
        let bcast = fleet
            .projectors()
            .iter()
            .find(|p| p.tcp_addr().ip() == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 23)))
            .expect("emulator on .23");
        assert_eq!(bcast.commands_seen(), 0);
        fleet.shutdown().await;
    })
    .await;
}

/// Counts the connections open through it at once.
#[derive(Default)]
struct Gauge {
    open: AtomicUsize,
    peak: AtomicUsize,
}

impl Gauge {
    fn take_peak(&self) -> usize {
        self.peak.swap(0, Ordering::SeqCst)
    }
}

/// A TCP forwarder to `target` that counts in `gauge` the connections whose client has not
/// closed its side yet.
async fn counting_proxy(target: SocketAddr, gauge: Arc<Gauge>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((inbound, _)) = listener.accept().await {
            let gauge = gauge.clone();
            let now = gauge.open.fetch_add(1, Ordering::SeqCst) + 1;
            gauge.peak.fetch_max(now, Ordering::SeqCst);
            conns.spawn(async move {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    gauge.open.fetch_sub(1, Ordering::SeqCst);
                    return;
                };
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
                });
                let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
                // The client has closed its side.
                gauge.open.fetch_sub(1, Ordering::SeqCst);
                let _ = out_write.shutdown().await;
                let _ = back.await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_collection_keep_to_the_concurrency_limit() {
    bounded(async {
        const N: usize = 12;
        const LIMIT: usize = 3;
        // Slow answers make every session last long against the instant between one session
        // closing and the next opening, which is the only slack allowed below.
        let template = ProjectorConfig {
            hours_per_second: 0.0,
            start_on: true,
            faults: escvp::emulator::Faults {
                reply_delay: Duration::from_millis(30),
                ..Default::default()
            },
            ..ProjectorConfig::default()
        };
        let fleet = Fleet::spawn_consecutive("127.0.0.1:0".parse().expect("address"), N, template)
            .await
            .expect("fleet starts");
        let gauge = Arc::new(Gauge::default());
        let mut endpoints = Vec::new();
        let mut proxies = Vec::new();
        for p in fleet.projectors() {
            let (addr, task) = counting_proxy(p.tcp_addr(), gauge.clone()).await;
            endpoints.push(Endpoint::new(addr));
            proxies.push(task);
        }

        // The agent opens its next session only after the previous one has shut its side of
        // the connection down; the proxy may notice that shutdown a moment after the next
        // connection arrives, hence the slack up to twice the limit. Without a limit all 12
        // would be open at once; with a limit of one, the peak would be 1.
        let probes = discover(&endpoints, &quick(), LIMIT).await;
        assert!(
            probes
                .iter()
                .all(|p| matches!(p.outcome, ProbeOutcome::Projector { problem: None, .. }))
        );
        let peak = gauge.take_peak();
        assert!((LIMIT..=2 * LIMIT).contains(&peak), "discovery peak {peak}");

        let results = collect_all(&endpoints, &quick(), LIMIT).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let peak = gauge.take_peak();
        assert!(
            (LIMIT..=2 * LIMIT).contains(&peak),
            "collection peak {peak}"
        );

        for t in proxies {
            t.abort();
        }
        fleet.shutdown().await;
    })
    .await;
}
