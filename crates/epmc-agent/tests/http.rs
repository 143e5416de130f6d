//! The HTTP json_query collector and the fallback, against the `escvp` emulator's HTTP side
//! on 127.0.0.1: values equal those read over ESC/VP.net; Digest with the right password
//! works (MD5 and SHA-256), a wrong or missing one is a clear typed error; items the
//! interface refuses or does not expose are absent, never zero; garbage, slow, silent,
//! busy and closed peers give typed errors within bounds; a projector whose 3629 is closed
//! is collected over HTTP by `collect_once` / `collect_all`; UDP HELLO discovery; the CLI
//! says which interface it used. Every test runs under an outer bound.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use epmc_agent::cli::{Cli, run};
use epmc_agent::collect::{
    CollectError, CollectOptions, Collected, Interface, Stage, collect_all, collect_once,
};
use epmc_agent::config::{AgentConfig, DEFAULT_HTTP_PORT, Endpoint};
use epmc_agent::discover::{
    HelloOptions, HttpProbe, ProbeOutcome, devices, discover_combined, hello_sweep,
};
use epmc_agent::http::{HttpError, HttpProjector, QueryAnswer, collect_http, status_http};
use epmc_proto::model::PowerState;
use escvp::emulator::{
    ClosedPort, DigestAlgorithm, Faults, Fleet, HttpConfig, ProjectorConfig, ProjectorHandle,
    TcpService,
};
use escvp::event::Warnings;
use escvp::net::Password;
use escvp::value::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BOUND: Duration = Duration::from_secs(30);

/// Whether an error is the expected one.
type Verdict = fn(&HttpError) -> bool;

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the test did not finish within its bound")
}

/// Query timeout 0.3 s (3 s × 0.1).
fn quick() -> CollectOptions {
    CollectOptions {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_millis(500),
        command_timeout_scale: 0.1,
        deadline: Duration::from_secs(10),
    }
}

fn pw(s: &str) -> Password {
    Password::new(s).expect("password")
}

fn healthy() -> ProjectorConfig {
    ProjectorConfig {
        serial: "WEB00000042".into(),
        model: "EB-L1755U".into(),
        lamp_hours: vec![1633, 1620],
        on_time_hours: 5021,
        hours_per_second: 0.0,
        start_on: true,
        ..ProjectorConfig::default()
    }
}

async fn one(config: ProjectorConfig) -> (Fleet, ProjectorHandle) {
    let fleet = Fleet::spawn([("127.0.0.1:0".parse::<SocketAddr>().expect("addr"), config)])
        .await
        .expect("emulator starts");
    let p = fleet.projectors()[0].clone();
    (fleet, p)
}

fn http_port(p: &ProjectorHandle) -> u16 {
    p.http_addr().expect("the emulator serves HTTP").port()
}

/// The endpoint of `p` with its HTTP port and a password.
fn endpoint(p: &ProjectorHandle, password: Option<&str>) -> Endpoint {
    Endpoint::new(p.tcp_addr())
        .with_password(password.map(pw))
        .with_http_port(p.http_addr().map(|a| a.port()))
}

/// The parts of a collection that do not depend on when or through which interface it was
/// read.
fn essence(c: &Collected) -> impl PartialEq + std::fmt::Debug {
    let col = &c.collection;
    (
        col.device_id.clone(),
        col.info.clone(),
        col.status.clone(),
        col.settings.clone(),
        col.agent_settings.clone(),
        c.snapshot.status.clone(),
        c.report.clone(),
    )
}

#[tokio::test]
async fn http_reads_exactly_what_escvp_net_reads() {
    bounded(async {
        for algorithm in [DigestAlgorithm::Md5, DigestAlgorithm::Sha256] {
            let (_f, p) = one(healthy()
                .with_password(pw("web-pw"))
                .with_http(HttpConfig::default().with_algorithm(algorithm)))
            .await;
            p.set_error(ErrorCode::new(0x04));
            p.set_warnings(Warnings::AIR_FILTER);
            let e = endpoint(&p, Some("web-pw"));
            let over_tcp = collect_once(&e, &quick()).await.expect("ESC/VP.net read");
            assert_eq!(over_tcp.via, Interface::EscVpNet);
            let over_http = collect_http(&e, http_port(&p), &quick())
                .await
                .expect("HTTP read");
            assert_eq!(over_http.via, Interface::Http);
            assert_eq!(over_http.addr, p.http_addr().expect("http"));
            assert_eq!(essence(&over_http), essence(&over_tcp), "{algorithm}");
            // And the values are the emulator's, not merely equal to each other.
            let col = &over_http.collection;
            assert_eq!(col.device_id.as_str(), "WEB00000042");
            assert_eq!(
                col.info.model.as_ref().map(|m| m.as_str()),
                Some("EB-L1755U")
            );
            let st = &col.status;
            assert_eq!(st.power, Some(PowerState::On));
            assert_eq!(st.error_code.map(|c| c.get()), Some(0x04));
            assert_eq!(
                st.light_up_time_hours
                    .as_ref()
                    .map(|h| h.as_slice().to_vec()),
                Some(vec![1633, 1620])
            );
            assert_eq!(st.total_operation_time_hours, Some(5021));
            assert_eq!(
                st.source
                    .as_ref()
                    .and_then(|s| s.name.as_ref().map(|n| n.as_str())),
                Some("HDMI1")
            );
            assert_eq!(col.settings.volume, Some(120));
            assert_eq!(
                col.settings.ip_address,
                Some("127.0.0.1".parse().expect("ip"))
            );
            // VER? and NWPNAME? are refused by the emulator: absent, listed.
            assert_eq!(col.info.firmware_version, None);
            assert_eq!(over_http.report.unsupported, vec!["VER", "NWPNAME"]);
        }
    })
    .await;
}

#[tokio::test]
async fn a_digest_round_trip_per_query_after_the_first() {
    bounded(async {
        let (_f, p) = one(healthy()
            .with_password(pw("web-pw"))
            .with_http(HttpConfig::default()))
        .await;
        let mut h = HttpProjector::new(p.http_addr().expect("http"), Some(pw("web-pw")), &quick())
            .expect("client");
        assert_eq!(
            h.query("PWR").await.expect("PWR"),
            QueryAnswer::Value("01".into())
        );
        // The first query needed the challenge (2 requests); later ones answer it
        // pre-emptively with a growing nonce count (1 request each).
        assert_eq!(p.http_requests_seen(), 2);
        for _ in 0..5 {
            h.query("SNO").await.expect("SNO");
        }
        assert_eq!(p.http_requests_seen(), 7);
        let status = h.read_status().await.expect("status");
        assert_eq!(status.snapshot.device_id.as_str(), "WEB00000042");
        assert_eq!(status.snapshot.status.power, Some(PowerState::On));
    })
    .await;
}

#[tokio::test]
async fn wrong_or_missing_password_is_a_clear_error() {
    bounded(async {
        let (_f, p) = one(healthy()
            .with_password(pw("web-pw"))
            .with_http(HttpConfig::default()))
        .await;
        let port = http_port(&p);
        let err = collect_http(&endpoint(&p, Some("nope")), port, &quick())
            .await
            .unwrap_err();
        assert_eq!(err, HttpError::WrongPassword);
        assert_eq!(err.code(), "http_wrong_password");
        assert!(err.to_string().contains("wrong password"), "{err}");
        let err = collect_http(&endpoint(&p, None), port, &quick())
            .await
            .unwrap_err();
        assert_eq!(err, HttpError::PasswordRequired);
        assert!(err.to_string().contains("password required"), "{err}");
        // A wrong password costs two requests (challenge, refused answer), not a loop.
        let before = p.http_requests_seen();
        let mut h = HttpProjector::new(p.http_addr().expect("http"), Some(pw("nope")), &quick())
            .expect("client");
        assert_eq!(h.query("PWR").await, Err(HttpError::WrongPassword));
        assert_eq!(p.http_requests_seen() - before, 2);
    })
    .await;
}

#[tokio::test]
async fn items_the_interface_refuses_or_hides_are_absent_not_zero() {
    bounded(async {
        // Only these queries are exposed (403 for the rest), and the projector is in
        // standby, so SOURCE/MUTE/... are refused with ERR as well.
        let (_f, p) = one(ProjectorConfig {
            start_on: false,
            ..healthy()
        }
        .with_http(HttpConfig::default().with_allowed_queries(["PWR", "SNO", "SOURCE", "PJINFO"])))
        .await;
        let c = collect_http(&endpoint(&p, None), http_port(&p), &quick())
            .await
            .expect("read");
        let st = &c.collection.status;
        assert_eq!(st.power, Some(PowerState::StandbyNetworkOn));
        assert_eq!(c.collection.device_id.as_str(), "WEB00000042");
        assert_eq!(
            c.collection.info.model.as_ref().map(|m| m.as_str()),
            Some("EB-L1755U")
        );
        // Hidden (403) or refused (ERR): absent, never zero.
        assert_eq!(st.error_code, None);
        assert_eq!(st.light_up_time_hours, None);
        assert_eq!(st.total_operation_time_hours, None);
        assert_eq!(st.warnings, None);
        assert_eq!(st.source, None);
        assert_eq!(st.av_mute, None);
        assert_eq!(c.collection.settings.volume, None);
        assert_eq!(c.collection.settings.luminance_constant_level, None);
        for hidden in ["ERR", "LAMP", "ONTIME", "PWSTATUS", "VOL", "SOURCE"] {
            assert!(
                c.report.unsupported.contains(&hidden),
                "{hidden} in {:?}",
                c.report.unsupported
            );
        }
        // The JSON form leaves them out instead of writing zeros.
        let json = serde_json::to_value(&c.collection.status).expect("json");
        assert!(
            json.get("light_up_time_hours")
                .is_none_or(serde_json::Value::is_null)
        );
    })
    .await;
}

#[tokio::test]
async fn faulty_http_sides_give_typed_errors_within_bounds() {
    bounded(async {
        let cases: Vec<(Faults, Verdict)> = vec![
            (
                Faults {
                    garbage: b"\x00\x01\x02 not http at all ".to_vec(),
                    ..Faults::default()
                },
                |e| matches!(e, HttpError::Garbage(_)),
            ),
            (
                Faults {
                    reply_delay: Duration::from_secs(2),
                    ..Faults::default()
                },
                |e| *e == HttpError::TimedOut(Stage::Command("SNO")),
            ),
            (
                Faults {
                    silent: true,
                    ..Faults::default()
                },
                |e| *e == HttpError::TimedOut(Stage::Command("SNO")),
            ),
            (
                Faults {
                    drop_after: Some(0),
                    ..Faults::default()
                },
                |e| *e == HttpError::Dropped,
            ),
            (
                Faults {
                    busy: true,
                    ..Faults::default()
                },
                |e| *e == HttpError::Busy,
            ),
        ];
        for (faults, expected) in cases {
            let (_f, p) =
                one(healthy().with_http(HttpConfig::default().with_faults(faults.clone()))).await;
            let started = tokio::time::Instant::now();
            let err = collect_http(&endpoint(&p, None), http_port(&p), &quick())
                .await
                .unwrap_err();
            assert!(expected(&err), "{faults:?} gave {err:?}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{faults:?} took {:?}",
                started.elapsed()
            );
        }
        // A slow but timely projector, answering in small pieces: read completely.
        let (_f, p) = one(
            healthy().with_http(HttpConfig::default().with_faults(Faults {
                reply_delay: Duration::from_millis(20),
                chunk_size: Some(9),
                chunk_pause: Duration::from_millis(1),
                ..Faults::default()
            })),
        )
        .await;
        let c = collect_http(&endpoint(&p, None), http_port(&p), &quick())
            .await
            .expect("slow but in time");
        assert_eq!(c.collection.status.total_operation_time_hours, Some(5021));
    })
    .await;
}

fn ok(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A web server that is not a projector: a page, a huge body, a 404, a 500, a redirect.
#[tokio::test]
async fn other_web_servers_are_not_projectors() {
    bounded(async {
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            100_000,
            "{".repeat(100_000)
        );
        let bodies: Vec<(String, Verdict)> = vec![
            (
                ok("<html></html>"),
                |e| matches!(e, HttpError::Garbage(_)),
            ),
            (huge, |e| {
                matches!(e, HttpError::Garbage(m) if m.contains("over"))
            }),
            (
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(),
                |e| *e == HttpError::Status(404),
            ),
            (
                "HTTP/1.1 302 Found\r\nLocation: http://192.0.2.1/\r\nContent-Length: 0\r\n\r\n"
                    .into(),
                |e| *e == HttpError::Status(302),
            ),
            (
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n".into(),
                |e| matches!(e, HttpError::UnsupportedAuth(_)),
            ),
            (
                ok(r#"{"projector":{"feature":{"name":"esc/vp21","query":"PWR?","reply":"01","error":false}}}"#),
                |e| matches!(e, HttpError::Garbage(m) if m.contains("PWR?")),
            ),
        ];
        for (response, expected) in bodies {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    let response = response.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 2048];
                        let _ = s.read(&mut buf).await;
                        let _ = s.write_all(response.as_bytes()).await;
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    });
                }
            });
            let err = collect_http(&Endpoint::new(addr), addr.port(), &quick())
                .await
                .unwrap_err();
            assert!(expected(&err), "got {err:?}");
            server.abort();
        }
    })
    .await;
}

#[tokio::test]
async fn a_projector_with_3629_closed_is_collected_over_http() {
    bounded(async {
        for tcp in [
            TcpService::Closed,
            TcpService::AcceptAndClose,
            TcpService::Protected,
        ] {
            let (_f, p) = one(healthy()
                .with_password(pw("web-pw"))
                .with_http(HttpConfig::default())
                .with_tcp(tcp))
            .await;
            let e = endpoint(&p, Some("web-pw"));
            let c = collect_once(&e, &quick()).await.expect("collected");
            assert_eq!(c.via, Interface::Http, "{tcp:?}");
            assert_eq!(c.collection.device_id.as_str(), "WEB00000042");
            assert_eq!(c.collection.status.power, Some(PowerState::On));
            assert_eq!(c.collection.status.total_operation_time_hours, Some(5021));
            let status = status_http(&e, http_port(&p), &quick())
                .await
                .expect("status over HTTP");
            assert_eq!(status.snapshot.status, c.collection.status);
            // A wrong password over HTTP is reported as such, with the ESC/VP.net context.
            let err = collect_once(&endpoint(&p, Some("nope")), &quick())
                .await
                .unwrap_err();
            assert_eq!(err, CollectError::Http(HttpError::WrongPassword));
            assert_eq!(err.code(), "http_wrong_password");
            // Without an HTTP port, or with nothing on it, the ESC/VP.net error stands.
            let no_http = endpoint(&p, Some("web-pw")).with_http_port(None);
            let expected = match tcp {
                TcpService::Closed => CollectError::Refused,
                TcpService::Protected => CollectError::NotAllowed,
                _ => CollectError::Dropped,
            };
            assert_eq!(
                collect_once(&no_http, &quick()).await.unwrap_err(),
                expected
            );
            let closed = ClosedPort::on([127, 0, 0, 1].into()).expect("reserve a port");
            let dead_http = endpoint(&p, Some("web-pw")).with_http_port(Some(closed.addr().port()));
            assert_eq!(
                collect_once(&dead_http, &quick()).await.unwrap_err(),
                expected
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_open_3629_is_preferred_and_escvp_refusals_do_not_fall_back() {
    bounded(async {
        let (_f, p) = one(healthy()
            .with_password(pw("web-pw"))
            .with_http(HttpConfig::default()))
        .await;
        let c = collect_once(&endpoint(&p, Some("web-pw")), &quick())
            .await
            .expect("collected");
        assert_eq!(c.via, Interface::EscVpNet);
        assert_eq!(p.http_requests_seen(), 0, "HTTP is not touched");
        // A wrong ESC/VP.net password is not a reason to try HTTP.
        let err = collect_once(&endpoint(&p, Some("nope")), &quick())
            .await
            .unwrap_err();
        assert_eq!(err, CollectError::WrongPassword);
        assert_eq!(p.http_requests_seen(), 0);
    })
    .await;
}

#[tokio::test]
async fn collect_all_mixes_both_interfaces() {
    bounded(async {
        let both = healthy().with_http(HttpConfig::default());
        let web_only = ProjectorConfig {
            serial: "WEB00000099".into(),
            ..healthy()
        }
        .with_http(HttpConfig::default())
        .with_tcp(TcpService::Closed);
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let fleet = Fleet::spawn([(addr, both), (addr, web_only)])
            .await
            .expect("fleet");
        let endpoints: Vec<Endpoint> = fleet
            .projectors()
            .iter()
            .map(|p| endpoint(p, None))
            .collect();
        let results = collect_all(&endpoints, &quick(), 4).await;
        let via: Vec<_> = results
            .iter()
            .map(|r| {
                r.as_ref()
                    .map(|c| (c.via, c.collection.device_id.to_string()))
            })
            .collect();
        assert_eq!(
            via,
            vec![
                Ok((Interface::EscVpNet, "WEB00000042".to_owned())),
                Ok((Interface::Http, "WEB00000099".to_owned())),
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn udp_hello_discovery_combined_with_the_sweep() {
    bounded(async {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let normal = ProjectorConfig {
            name: "ROOM-101".into(),
            serial: "HEL00000001".into(),
            ..ProjectorConfig::default()
        };
        let web_only = ProjectorConfig {
            name: "ROOM-102".into(),
            serial: "HEL00000002".into(),
            ..ProjectorConfig::default()
        }
        .with_http(HttpConfig::default())
        .with_tcp(TcpService::Closed);
        let hello_only = ProjectorConfig {
            name: "ROOM-103".into(),
            serial: "HEL00000003".into(),
            ..ProjectorConfig::default()
        }
        .with_tcp(TcpService::Closed);
        let fleet = Fleet::spawn([(addr, normal), (addr, web_only), (addr, hello_only)])
            .await
            .expect("fleet");
        let p = fleet.projectors();
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let nobody = closed.local_addr().expect("addr");
        drop(closed);
        let mut endpoints: Vec<Endpoint> = p.iter().map(|p| endpoint(p, None)).collect();
        endpoints.push(Endpoint::new(nobody).with_http_port(None));

        // HELLO alone: unicast to each configured address, replies by address.
        let hellos = hello_sweep(
            &endpoints,
            &HelloOptions {
                timeout: Duration::from_millis(800),
                attempts: 2,
            },
        )
        .await
        .expect("UDP socket");
        let names: Vec<(SocketAddr, Option<String>)> =
            hellos.iter().map(|(a, h)| (*a, h.name.clone())).collect();
        let mut expected: Vec<(SocketAddr, Option<String>)> = p
            .iter()
            .map(|p| (p.udp_addr(), Some(p.name().to_owned())))
            .collect();
        expected.sort();
        assert_eq!(names, expected);

        // Combined with the TCP sweep and the HTTP probe.
        let sightings = discover_combined(
            &endpoints,
            &quick(),
            8,
            Some(&HelloOptions {
                timeout: Duration::from_millis(800),
                attempts: 2,
            }),
        )
        .await;
        assert_eq!(sightings.len(), 4);
        assert!(matches!(
            &sightings[0].tcp,
            ProbeOutcome::Projector { serial: Some(s), .. } if s == "HEL00000001"
        ));
        assert_eq!(sightings[0].http, None, "no HTTP probe where 3629 answers");
        assert_eq!(
            sightings[1].tcp,
            ProbeOutcome::Absent(CollectError::Refused)
        );
        assert_eq!(
            sightings[1].http,
            Some(HttpProbe::Projector {
                serial: Some("HEL00000002".into())
            })
        );
        assert_eq!(sightings[2].http, None, "no HTTP port configured");
        assert_eq!(
            sightings[2].hello.as_ref().and_then(|h| h.name.as_deref()),
            Some("ROOM-103")
        );
        assert!(sightings[2].is_projector());
        assert_eq!(sightings[2].device_id().as_str(), "ip:127.0.0.1");
        assert!(!sightings[3].is_projector());
        assert_eq!(sightings[3].hello, None);
        let ids: Vec<String> = devices(&sightings)
            .iter()
            .map(|d| d.device_id.to_string())
            .collect();
        assert_eq!(ids, ["HEL00000001", "HEL00000002", "ip:127.0.0.1"]);
    })
    .await;
}

#[tokio::test]
async fn one_serial_at_two_addresses_is_one_device() {
    bounded(async {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let same = ProjectorConfig {
            serial: "TWIN0000001".into(),
            ..ProjectorConfig::default()
        };
        let fleet = Fleet::spawn([(addr, same.clone()), (addr, same)])
            .await
            .expect("fleet");
        let endpoints: Vec<Endpoint> = fleet
            .projectors()
            .iter()
            .map(|p| Endpoint::new(p.tcp_addr()).with_http_port(None))
            .collect();
        let sightings = discover_combined(&endpoints, &quick(), 4, None).await;
        let found = devices(&sightings);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].device_id.as_str(), "TWIN0000001");
        assert_eq!(
            found[0]
                .sightings
                .iter()
                .map(|s| s.addr)
                .collect::<Vec<_>>(),
            endpoints.iter().map(|e| e.addr).collect::<Vec<_>>()
        );
    })
    .await;
}

async fn run_cli(args: &[&str]) -> (u8, String, String) {
    let mut argv = vec!["epmc-agent"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("valid command line");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = bounded(run(cli, &mut out, &mut err)).await;
    (
        code,
        String::from_utf8(out).expect("utf-8"),
        String::from_utf8(err).expect("utf-8"),
    )
}

#[tokio::test]
async fn the_cli_says_which_interface_it_used() {
    let (_f, web) = one(healthy()
        .with_password(pw("web-pw"))
        .with_http(HttpConfig::default())
        .with_tcp(TcpService::Closed))
    .await;
    let (_g, tcp) = one(healthy()).await;
    let target = web.tcp_addr().to_string();
    let port = http_port(&web).to_string();
    let (code, out, err) = run_cli(&[
        "collect",
        "--once",
        "--target",
        &target,
        "--password",
        "web-pw",
        "--http-port",
        &port,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let http = web.http_addr().expect("http");
    assert!(
        out.contains(&format!("  interface        HTTP json_query ({http})\n")),
        "{out}"
    );
    assert!(out.contains("  operation hours  5021\n"), "{out}");
    let t = tcp.tcp_addr().to_string();
    let (code, out, _) = run_cli(&["collect", "--once", "--target", &t]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("  interface        ESC/VP.net ({t})\n")),
        "{out}"
    );
    // JSON mode: envelopes on stdout, the interface on stderr.
    let (code, out, err) = run_cli(&[
        "collect",
        "--once",
        "--json",
        "--target",
        &target,
        "--password",
        "web-pw",
        "--http-port",
        &port,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2);
    assert_eq!(
        err,
        format!("{target}: read over HTTP json_query at {http}\n")
    );
    // Wrong password: a clear message naming HTTP.
    let (code, _, err) = run_cli(&[
        "collect",
        "--once",
        "--target",
        &target,
        "--password",
        "nope",
        "--http-port",
        &port,
    ])
    .await;
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "{target}: ESC/VP.net port closed; over HTTP: HTTP wrong password (401 after the Digest answer) (http_wrong_password)\n"
        )
    );
    // --no-http: the ESC/VP.net error alone.
    let (code, _, err) = run_cli(&["collect", "--once", "--target", &target, "--no-http"]).await;
    assert_eq!(code, 1);
    assert_eq!(err, format!("{target}: connection refused (refused)\n"));
    // discover shows the HTTP-only projector and the HELLO name.
    let (code, out, err) = run_cli(&[
        "discover",
        "--range",
        &target,
        "--password",
        "web-pw",
        "--http-port",
        &port,
        "--hello-timeout-ms",
        "500",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "{target}  projector  WEB00000042  (over HTTP json_query; ESC/VP.net: refused)\n1 of 1 addresses answered ESC/VP.net\n"
        )
    );
}

#[test]
fn http_port_in_the_configuration() {
    let base = "[server]\nurl = \"mqtts://s.example\"\nca_cert = \"c\"\nclient_cert = \"a\"\nclient_key = \"k\"\n";
    let c = AgentConfig::parse(&format!(
        "{base}[[target]]\naddress = \"192.168.1.10\"\nhttp_port = 8080\n[[target]]\naddress = \"192.168.1.11\"\n"
    ))
    .expect("valid");
    assert_eq!(c.targets[0].http_port, 8080);
    assert_eq!(c.targets[1].http_port, DEFAULT_HTTP_PORT);
    let ports: Vec<Option<u16>> = c.endpoints().iter().map(|e| e.http_port).collect();
    assert_eq!(ports, [Some(8080), Some(80)]);
    for bad in ["0", "65536", "\"80\""] {
        let err = AgentConfig::parse(&format!(
            "{base}[[target]]\naddress = \"192.168.1.10\"\nhttp_port = {bad}\n"
        ))
        .expect_err(bad);
        assert_eq!(err.line, Some(8), "{bad}: {err}");
        assert!(
            err.to_string().contains("http_port") || bad.starts_with('"'),
            "{bad}: {err}"
        );
    }
}

/// HELLO replies are taken only from the configured addresses: a reply that comes from
/// another address or port (a spoofer, or a device that was not asked) is ignored.
#[tokio::test]
async fn hello_replies_from_addresses_not_configured_are_ignored() {
    bounded(async {
        use escvp::net::{Info, Message};
        let asked = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let other = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let asked_addr = asked.local_addr().expect("addr");
        let answering = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = asked.recv_from(&mut buf).await {
                if Message::decode(&buf[..n]).is_ok() {
                    let reply =
                        Message::hello_reply(Info::new(b"SPOOF").expect("info"), 0x30).to_bytes();
                    // From another port than the one asked.
                    let _ = other.send_to(&reply, from).await;
                }
            }
        });
        let (_f, real) = one(ProjectorConfig::default()).await;
        let endpoints = [
            Endpoint::new(asked_addr).with_http_port(None),
            Endpoint::new(real.tcp_addr()).with_http_port(None),
        ];
        let found = hello_sweep(
            &endpoints,
            &HelloOptions {
                timeout: Duration::from_millis(600),
                attempts: 2,
            },
        )
        .await
        .expect("UDP socket");
        assert_eq!(
            found.keys().copied().collect::<Vec<_>>(),
            vec![real.udp_addr()]
        );
        answering.abort();
    })
    .await;
}

/// A mixed fleet: ESC/VP.net projectors, HTTP-only ones with a password, and HTTP-only ones
/// with a faulty web side. `collect_all` reads every healthy one through the right
/// interface with the right values and reports each faulty one with its own error.
#[tokio::test]
async fn mixed_fleet_is_collected_through_the_right_interfaces() {
    bounded(async {
        const N: usize = 30;
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let faults = [
            Faults {
                silent: true,
                ..Faults::default()
            },
            Faults {
                garbage: b"garbage".to_vec(),
                ..Faults::default()
            },
            Faults {
                drop_after: Some(0),
                ..Faults::default()
            },
            Faults {
                busy: true,
                ..Faults::default()
            },
        ];
        let plan: Vec<(SocketAddr, ProjectorConfig)> = (0..N)
            .map(|i| {
                let base = ProjectorConfig {
                    serial: format!("MIX{i:08}"),
                    on_time_hours: 1000 + i as u32,
                    ..healthy()
                };
                let config = match i % 3 {
                    0 => base
                        .with_password(pw("web-pw"))
                        .with_http(HttpConfig::default())
                        .with_tcp(TcpService::Closed),
                    1 => base,
                    _ => base
                        .with_http(HttpConfig::default().with_faults(faults[(i / 3) % 4].clone()))
                        .with_tcp(TcpService::Closed),
                };
                (addr, config)
            })
            .collect();
        let fleet = Fleet::spawn(plan).await.expect("fleet");
        let endpoints: Vec<Endpoint> = fleet
            .projectors()
            .iter()
            .enumerate()
            .map(|(i, p)| endpoint(p, (i % 3 == 0).then_some("web-pw")))
            .collect();
        let results = collect_all(&endpoints, &quick(), 32).await;
        for (i, r) in results.iter().enumerate() {
            match i % 3 {
                0 | 1 => {
                    let c = r.as_ref().unwrap_or_else(|e| panic!("#{i}: {e}"));
                    let via = if i % 3 == 0 {
                        Interface::Http
                    } else {
                        Interface::EscVpNet
                    };
                    assert_eq!(c.via, via, "#{i}");
                    assert_eq!(c.collection.device_id.to_string(), format!("MIX{i:08}"));
                    assert_eq!(
                        c.collection.status.total_operation_time_hours,
                        Some(1000 + i as u32)
                    );
                }
                _ => {
                    let err = r.as_ref().expect_err("faulty");
                    let expected = match (i / 3) % 4 {
                        0 => "http_timeout",
                        1 => "http_garbage",
                        2 => "http_dropped",
                        _ => "http_busy",
                    };
                    assert_eq!(err.code(), expected, "#{i}: {err}");
                }
            }
        }
    })
    .await;
}

/// When the projector forgets the nonce the agent keeps answering (it issues new ones to
/// other clients), it answers `401` with `stale=true`; the agent takes the new challenge and
/// the query succeeds, instead of reporting a wrong password.
#[tokio::test]
async fn a_stale_nonce_is_renewed_not_reported_as_a_wrong_password() {
    bounded(async {
        let (_f, p) = one(healthy()
            .with_password(pw("web-pw"))
            .with_http(HttpConfig::default()))
        .await;
        let http = p.http_addr().expect("http");
        let mut h = HttpProjector::new(http, Some(pw("web-pw")), &quick()).expect("client");
        assert_eq!(
            h.query("PWR").await.expect("PWR"),
            QueryAnswer::Value("01".into())
        );
        // Other clients make the emulator issue (and remember) 300 newer nonces; it keeps
        // 256, so ours is forgotten.
        for _ in 0..300 {
            let mut s = tokio::net::TcpStream::connect(http).await.expect("connect");
            s.write_all(
                b"GET /cgi-bin/json_query?jsoncallback=PWR? HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await
            .expect("write");
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.expect("read");
            assert!(out.starts_with(b"HTTP/1.1 401"));
        }
        let before = p.http_requests_seen();
        assert_eq!(
            h.query("SNO").await.expect("SNO after a stale nonce"),
            QueryAnswer::Value("WEB00000042".into())
        );
        // The stale answer, then the retry with the new challenge.
        assert_eq!(p.http_requests_seen() - before, 2);
    })
    .await;
}
