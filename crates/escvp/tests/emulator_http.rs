//! The emulator's HTTP control interface at the byte level: json_query answers from the same
//! state as ESC/VP21, Digest authentication (401 on bad credentials, MD5 and SHA-256), the
//! query whitelist (403), directsend sets, faults, and a closed ESC/VP.net port.
#![cfg(feature = "emulator")]

use std::net::SocketAddr;
use std::time::Duration;

use escvp::client::{Client, ClientConfig};
use escvp::emulator::{
    ClosedPort, DigestAlgorithm, Faults, Fleet, HttpConfig, ProjectorConfig, ProjectorHandle,
    TcpService,
};
use escvp::http::{Authorization, Challenge, DIGEST_USER, JsonQueryReply};
use escvp::net::Password;
use escvp::value::{ErrorCode, Lamp, Power, PowerCode, SerialNumber, Source, SourceCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOUND: Duration = Duration::from_secs(10);

async fn start(config: ProjectorConfig) -> (Fleet, ProjectorHandle) {
    let fleet = Fleet::spawn([("127.0.0.1:0".parse::<SocketAddr>().unwrap(), config)])
        .await
        .unwrap();
    let p = fleet.projectors()[0].clone();
    (fleet, p)
}

/// A response: status, headers (lower-case names), body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw bytes on a new connection and reads to EOF (the request asks to close).
async fn raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut out))
        .await
        .expect("the emulator answered within the bound")
        .ok();
    out
}

fn parse(bytes: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Resp {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    }
}

async fn get(addr: SocketAddr, target: &str, authorization: Option<&str>) -> Resp {
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nReferer: http://{addr}/cgi-bin/webconf\r\nConnection: close\r\n"
    );
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    parse(&raw(addr, req.as_bytes()).await)
}

/// GET with Digest: the first request gets the challenge, the second answers it.
async fn get_digest(addr: SocketAddr, target: &str, password: &str) -> Resp {
    let first = get(addr, target, None).await;
    assert_eq!(first.status, 401, "a challenge first");
    let challenge = &Challenge::parse_header(first.header("www-authenticate").unwrap()).unwrap()[0];
    let auth = Authorization::respond(challenge, DIGEST_USER, password, "GET", target, "c0ffee", 1);
    get(addr, target, Some(&auth.to_header())).await
}

fn json(resp: &Resp) -> JsonQueryReply {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    JsonQueryReply::parse(&resp.body).expect("a json_query body")
}

fn q(cmd: &str) -> String {
    format!("/cgi-bin/json_query?jsoncallback={cmd}?")
}

#[tokio::test]
async fn json_query_answers_from_the_same_state_as_escvp21() {
    let (_f, p) = start(
        ProjectorConfig {
            serial: "HTTP00000042".into(),
            model: "EB-HTTP".into(),
            lamp_hours: vec![1633, 1620],
            hours_per_second: 0.0,
            warm_up: Duration::from_millis(50),
            ..ProjectorConfig::default()
        }
        .with_http(HttpConfig::default()),
    )
    .await;
    let http = p.http_addr().expect("HTTP is served");
    assert_eq!(http.ip(), p.tcp_addr().ip());
    assert_ne!(http.port(), p.tcp_addr().port());

    let r = json(&get(http, &q("PWR"), None).await);
    assert_eq!((r.query(), r.reply(), r.is_error()), ("PWR?", "04", false));
    assert_eq!(
        json(&get(http, &q("SNO"), None).await).reply(),
        "HTTP00000042"
    );
    assert_eq!(
        json(&get(http, &q("PJINFO"), None).await).reply(),
        "EB-HTTP"
    );
    assert_eq!(
        json(&get(http, &q("LAMP"), None).await).reply(),
        "1633 1620"
    );
    // The web UI's variant path with a cache buster, and a percent-encoded `?`.
    let r = json(
        &get(
            http,
            "/cgi-bin/Remote/json_query?jsoncallback=ERR%3F&_=1700000000000",
            None,
        )
        .await,
    );
    assert_eq!(r.reply(), "00");
    // Refused in standby, as on ESC/VP21: ERR with error true.
    let r = json(&get(http, &q("SOURCE"), None).await);
    assert_eq!((r.reply(), r.is_error()), ("ERR", true));
    // A missing `?` is a set on json_query: ERR.
    let r = json(&get(http, "/cgi-bin/json_query?jsoncallback=PWR", None).await);
    assert!(r.is_error());
    // The error code and power set through the handle / directsend show on both sides.
    p.set_error(ErrorCode::new(0x04));
    assert_eq!(json(&get(http, &q("ERR"), None).await).reply(), "04");
    let set = get(http, "/cgi-bin/directsend?PWR=ON", None).await;
    assert_eq!((set.status, set.body.len()), (200, 0));
    tokio::time::timeout(BOUND, async {
        while p.power_code() != PowerCode::ON {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("warm-up ends");
    let set = get(http, "/cgi-bin/directsend?SOURCE=A0", None).await;
    assert_eq!(set.status, 200);
    assert_eq!(json(&get(http, &q("SOURCE"), None).await).reply(), "A0");
    assert_eq!(json(&get(http, &q("PWR"), None).await).reply(), "01");
    let client = Client::connect(p.tcp_addr(), ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.get::<Source>().await.unwrap(), SourceCode::HDMI2);
    assert_eq!(client.get::<Power>().await.unwrap(), PowerCode::ON);
    assert_eq!(
        client.get::<SerialNumber>().await.unwrap().as_str(),
        "HTTP00000042"
    );
    assert_eq!(client.get::<Lamp>().await.unwrap().hours(), &[1633, 1620]);
    // The null probe.
    assert_eq!(get(http, "/cgi-bin/directsend?=", None).await.status, 200);
    // Unknown paths, methods and bad requests.
    assert_eq!(get(http, "/index.html", None).await.status, 404);
    assert_eq!(get(http, "/cgi-bin/json_query", None).await.status, 400);
    let post = parse(
        &raw(
            http,
            b"POST /cgi-bin/json_query HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    assert_eq!(post.status, 405);
    let bad = parse(&raw(http, b"\x16\x03\x01 not http\r\n\r\n").await);
    assert_eq!(bad.status, 400);
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(parse(&raw(http, huge.as_bytes()).await).status, 431);
}

#[tokio::test]
async fn digest_auth_with_the_projectors_password() {
    for algorithm in [DigestAlgorithm::Md5, DigestAlgorithm::Sha256] {
        let (_f, p) = start(
            ProjectorConfig::default()
                .with_password(Password::new("s3cret").unwrap())
                .with_http(HttpConfig::default().with_algorithm(algorithm)),
        )
        .await;
        let http = p.http_addr().unwrap();
        let target = q("PWR");
        // No credentials: 401 with a challenge of the configured algorithm.
        let r = get(http, &target, None).await;
        assert_eq!(r.status, 401);
        let challenges = Challenge::parse_header(r.header("www-authenticate").unwrap()).unwrap();
        assert_eq!(challenges.len(), 1);
        assert_eq!(challenges[0].algorithm(), algorithm);
        assert!(challenges[0].offers_qop_auth());
        // The right password.
        let ok = get_digest(http, &target, "s3cret").await;
        assert_eq!(json(&ok).reply(), "04", "{algorithm}");
        // A wrong password, a wrong user, a response for another URI: 401, not stale.
        let wrong = get_digest(http, &target, "s3cre7").await;
        assert_eq!(wrong.status, 401);
        let again = &Challenge::parse_header(wrong.header("www-authenticate").unwrap()).unwrap()[0];
        assert!(!again.is_stale());
        let c = &Challenge::parse_header(
            get(http, &target, None)
                .await
                .header("www-authenticate")
                .unwrap(),
        )
        .unwrap()[0];
        let other_user = Authorization::respond(c, "admin", "s3cret", "GET", &target, "c", 1);
        assert_eq!(
            get(http, &target, Some(&other_user.to_header()))
                .await
                .status,
            401
        );
        let other_uri = Authorization::respond(c, DIGEST_USER, "s3cret", "GET", &q("SNO"), "c", 1);
        assert_eq!(
            get(http, &target, Some(&other_uri.to_header()))
                .await
                .status,
            401
        );
        // Garbage and Basic credentials: 401.
        assert_eq!(get(http, &target, Some("Digest ,,,\"")).await.status, 401);
        assert_eq!(
            get(http, &target, Some("Basic RVBTT05XRUI6czNjcmV0"))
                .await
                .status,
            401
        );
        // The right password on a nonce the projector never issued: 401, stale.
        let forged = Challenge::new("EPSONWEB", "00112233", algorithm);
        let auth = Authorization::respond(&forged, DIGEST_USER, "s3cret", "GET", &target, "c", 1);
        let stale = get(http, &target, Some(&auth.to_header())).await;
        assert_eq!(stale.status, 401);
        assert!(
            Challenge::parse_header(stale.header("www-authenticate").unwrap()).unwrap()[0]
                .is_stale()
        );
        // Sets are protected too.
        assert_eq!(get(http, "/cgi-bin/directsend?=", None).await.status, 401);
        assert_eq!(
            get_digest(http, "/cgi-bin/directsend?=", "s3cret")
                .await
                .status,
            200
        );
        // And the ESC/VP.net side uses the same password.
        let mut cfg = ClientConfig::default();
        cfg.session.password = Some(Password::new("s3cret").unwrap());
        let client = Client::connect(p.tcp_addr(), cfg).await.unwrap();
        assert_eq!(
            client.get::<Power>().await.unwrap(),
            PowerCode::STANDBY_NETWORK_ON
        );
    }
}

#[tokio::test]
async fn keep_alive_answers_several_requests_on_one_connection() {
    let (_f, p) = start(ProjectorConfig::default().with_http(HttpConfig::default())).await;
    let http = p.http_addr().unwrap();
    let mut s = TcpStream::connect(http).await.unwrap();
    let two = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\n\r\nGET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        q("PWR"),
        q("SNO")
    );
    s.write_all(two.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.contains(r#""reply":"04""#) && text.contains(r#""reply":"EMU0000001""#));
    assert_eq!(p.http_requests_seen(), 2);
}

#[tokio::test]
async fn whitelisted_queries_only() {
    let (_f, p) = start(
        ProjectorConfig::default()
            .with_http(HttpConfig::default().with_allowed_queries(["PWR", "SNO"])),
    )
    .await;
    let http = p.http_addr().unwrap();
    assert_eq!(json(&get(http, &q("PWR"), None).await).reply(), "04");
    assert_eq!(get(http, &q("LAMP"), None).await.status, 403);
    assert_eq!(get(http, &q("ERR"), None).await.status, 403);
}

#[tokio::test]
async fn http_faults() {
    let (_f, p) = start(ProjectorConfig::default().with_http(HttpConfig::default())).await;
    let http = p.http_addr().unwrap();
    let target = q("PWR");
    // Garbage before the status line.
    p.set_http_faults(Faults {
        garbage: b"\x00\xffjunk".to_vec(),
        ..Faults::default()
    });
    let bytes = raw(
        http,
        format!("GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(bytes.starts_with(b"\x00\xffjunkHTTP/1.1 200"), "{bytes:?}");
    // Drop: closed without an answer.
    p.set_http_faults(Faults {
        drop_after: Some(0),
        ..Faults::default()
    });
    let bytes = raw(http, format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes()).await;
    assert!(bytes.is_empty(), "{bytes:?}");
    // Busy: 503.
    p.set_http_faults(Faults {
        busy: true,
        ..Faults::default()
    });
    assert_eq!(get(http, &target, None).await.status, 503);
    // ERR for the next query only.
    p.set_http_faults(Faults {
        err_next: 1,
        ..Faults::default()
    });
    assert!(json(&get(http, &target, None).await).is_error());
    assert!(!json(&get(http, &target, None).await).is_error());
    // Slow: the answer comes after the delay, in small chunks.
    p.set_http_faults(Faults {
        reply_delay: Duration::from_millis(300),
        chunk_size: Some(7),
        chunk_pause: Duration::from_millis(5),
        ..Faults::default()
    });
    let t = tokio::time::Instant::now();
    assert_eq!(json(&get(http, &target, None).await).reply(), "04");
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Silent: nothing comes back.
    p.set_http_faults(Faults {
        silent: true,
        ..Faults::default()
    });
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut b = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s.read(&mut b))
            .await
            .is_err(),
        "a silent projector sends nothing"
    );
    // The ESC/VP.net side is not affected by HTTP faults.
    let client = Client::connect(p.tcp_addr(), ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(
        client.get::<Power>().await.unwrap(),
        PowerCode::STANDBY_NETWORK_ON
    );
}

async fn assert_reserved(addr: SocketAddr) {
    let taken = tokio::net::TcpListener::bind(addr).await;
    assert_eq!(
        taken.map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::AddrInUse),
        "the closed port {addr} was free for another listener"
    );
}

#[tokio::test]
async fn closed_escvp_port() {
    let (_f, p) = start(
        ProjectorConfig::default()
            .with_http(HttpConfig::default())
            .with_tcp(TcpService::Closed),
    )
    .await;
    let err = TcpStream::connect(p.tcp_addr()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(
        json(&get(p.http_addr().unwrap(), &q("PWR"), None).await).reply(),
        "04"
    );
    // The closed port stays the projector's: no other listener (another projector's HTTP
    // side, say) can take it, so connecting there can never reach someone else. A plain
    // `bind` sets SO_REUSEADDR, as every tokio listener does.
    assert_reserved(p.tcp_addr()).await;

    // The same reservation, for tests of unreachable targets.
    let closed = ClosedPort::on("127.0.0.1".parse().unwrap()).unwrap();
    let err = TcpStream::connect(closed.addr()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_reserved(closed.addr()).await;

    // Protected: ESC/VP.net 1.0 CONNECT refused with 0x45, then closed.
    let (_f, p) = start(ProjectorConfig::default().with_tcp(TcpService::Protected)).await;
    let mut s = TcpStream::connect(p.tcp_addr()).await.unwrap();
    s.write_all(&escvp::net::Message::connect(None).to_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut out))
        .await
        .unwrap();
    let (_, reply) = escvp::net::Message::decode(&out).unwrap();
    assert_eq!(reply.status(), escvp::net::Status::NOT_ALLOWED);

    let (_f, p) = start(ProjectorConfig::default().with_tcp(TcpService::AcceptAndClose)).await;
    assert_eq!(p.http_addr(), None);
    let mut s = TcpStream::connect(p.tcp_addr()).await.unwrap();
    let _ = s
        .write_all(&escvp::net::Message::connect(None).to_bytes())
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty(), "closed before any reply: {out:?}");
}

#[tokio::test]
async fn fleet_shifts_a_fixed_http_port_and_serves_each_state() {
    // Find two free consecutive-ish ports by asking for one and using the next ones: if they
    // are taken, spawning fails, and the test retries a bounded number of times.
    for _ in 0..20 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if base > 60_000 {
            continue;
        }
        let template =
            ProjectorConfig::default().with_http(HttpConfig::default().with_port(base + 100));
        let Ok(fleet) = Fleet::spawn(escvp::emulator::fleet_plan(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            3,
            false,
            &template,
        ))
        .await
        else {
            continue;
        };
        let ports: Vec<u16> = fleet
            .projectors()
            .iter()
            .map(|p| p.http_addr().unwrap().port())
            .collect();
        assert_eq!(ports, vec![base + 100, base + 101, base + 102]);
        for (i, p) in fleet.projectors().iter().enumerate() {
            let r = json(&get(p.http_addr().unwrap(), &q("SNO"), None).await);
            assert_eq!(r.reply(), format!("EMU000{:04}", i + 1));
        }
        return;
    }
    panic!("no free ports found in 20 tries");
}
