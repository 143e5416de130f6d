//! Enrollment against a real `epmc-server` started in-process on loopback: the agent pins
//! the CA its token names, gets a certificate, writes a configuration that loads and whose
//! certificate connects over MQTT/TLS; a wrong fingerprint, a forged, reused or expired
//! token, an unreachable server or a refusing proxy fail clearly and write nothing.

#[path = "../../epmc-transport/tests/support/http_proxy.rs"]
mod http_proxy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use epmc_agent::cli::{Cli, run};
use epmc_agent::config::{AgentConfig, ProxyUrl};
use epmc_agent::enroll::{
    EnrollError, EnrollOptions, EnrollProxy, Enrolled, FILES, ServerAddress, Token, enroll,
};
use epmc_proto::topic;
use epmc_server::ca::EnrollmentToken;
use epmc_server::datadir;
use epmc_server::server::{ServeConfig, Server};
use epmc_transport::client::{HttpProxy, MqttClient, MqttOptions, ProxyCredentials, TlsIdentity};
use epmc_transport::mqtt::QoS;
use http_proxy::{Behaviour, ConnectProxy};

const BOUND: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

struct Fixture {
    dir: tempfile::TempDir,
    server: Server,
}

async fn start() -> Fixture {
    epmc_server::ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    datadir::init(&data, &[]).unwrap();
    let mut config = ServeConfig::new(&data);
    config.mqtt = "127.0.0.1:0".parse().unwrap();
    config.https = "127.0.0.1:0".parse().unwrap();
    config.poll = Duration::from_millis(100);
    let server = Server::start(config).await.unwrap();
    Fixture { dir, server }
}

impl Fixture {
    /// A fresh token for tenant "acme", valid for `valid_for` seconds (negative: expired).
    async fn token(&self, valid_for: i64) -> String {
        let admin = self.server.store().admin();
        let tenant = match admin
            .tenants()
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.name == "acme")
        {
            Some(t) => t.id,
            None => admin.add_tenant("acme").await.unwrap(),
        };
        let token = EnrollmentToken::generate(self.fingerprint()).unwrap();
        let expires = epmc_proto::bounded::Timestamp::from_unix(
            epmc_proto::bounded::Timestamp::now().unix() + valid_for,
        )
        .unwrap();
        admin
            .register_token(tenant, expires, &token.secret_hash().to_hex())
            .await
            .unwrap();
        token.to_token_string()
    }

    fn fingerprint(&self) -> epmc_server::ca::CaFingerprint {
        datadir::load(&self.dir.path().join("data"))
            .unwrap()
            .ca
            .fingerprint()
    }

    fn server_url(&self) -> String {
        format!("https://localhost:{}", self.server.https_addr().port())
    }

    fn options(&self, token: &str, dir: &Path) -> EnrollOptions {
        let mut o = EnrollOptions::new(
            self.server_url().parse().unwrap(),
            token.parse().unwrap(),
            dir,
        );
        o.timeout = Duration::from_secs(10);
        o
    }

    async fn security_events(&self) -> Vec<String> {
        self.server
            .store()
            .admin()
            .security_events(100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }
}

/// The directory holds none of the enrollment files and no temporary file.
fn assert_empty(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Loads the written configuration and connects over MQTT/TLS with it (through `proxy` when
/// given); returns the agent id the certificate carries.
async fn connect_with(config: &Path, enrolled: &Enrolled, server: &Server, proxy: bool) {
    let c = AgentConfig::load(config).expect("the written configuration loads");
    let dir = config.parent().unwrap();
    assert_eq!(c.server.ca_cert, dir.join("ca.crt"));
    assert_eq!(c.server.client_cert, dir.join("agent.crt"));
    assert_eq!(c.server.client_key, dir.join("agent.key"));
    assert_eq!(c.server.url.host, "localhost");
    assert_eq!(
        c.server.url.port,
        server.mqtt_addr().expect("embedded endpoint").port()
    );
    assert!(c.targets.is_empty());
    let tls = TlsIdentity::from_files(
        &c.server.ca_cert,
        &c.server.client_cert,
        &c.server.client_key,
    )
    .expect("the written files make a TLS identity");
    let id = enrolled.agent_id.to_string();
    let mut options = if proxy {
        let p = c.proxy.as_ref().expect("the proxy is configured");
        MqttOptions::via_proxy(
            p.to_http_proxy(),
            &c.server.url.host,
            c.server.url.port,
            &id,
        )
    } else {
        assert!(c.proxy.is_none());
        MqttOptions::new(
            server.mqtt_addr().expect("embedded endpoint"),
            &c.server.url.host,
            &id,
        )
    };
    options.keep_alive = Duration::from_secs(5);
    options.connect_timeout = Duration::from_secs(10);
    let (client, _, _) = within("MQTT connect", MqttClient::connect(&options, &tls))
        .await
        .expect("the issued certificate connects");
    let granted = within(
        "subscribe",
        client.subscribe(&[(&topic::orders(&enrolled.agent_id), QoS::AtLeastOnce)]),
    )
    .await
    .expect("subscribed");
    assert_eq!(granted, [Some(QoS::AtLeastOnce)]);
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_writes_a_working_configuration_and_refuses_to_overwrite_it() {
    let f = start().await;
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("agent");
    let token = f.token(3600).await;
    let mut options = f.options(&token, &dir);
    options.name = Some("Room 101 agent".into());
    let enrolled = within("enroll", enroll(&options)).await.expect("enrolled");
    assert_eq!(
        enrolled.ca_fingerprint.to_string(),
        f.fingerprint().to_string()
    );
    for name in FILES {
        assert!(dir.join(name).is_file(), "{name} written");
    }
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir.join("agent.key")), 0o600);
        assert_eq!(mode(&dir.join("agent.toml")), 0o600);
        assert_eq!(mode(&dir) & 0o077, 0, "the directory is owner-only");
    }
    let key = std::fs::read_to_string(dir.join("agent.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    connect_with(&enrolled.config, &enrolled, &f.server, false).await;

    // The server knows the agent under the name given.
    let agents = f.server.store().admin().agents(None).await.unwrap();
    assert!(
        agents.iter().any(
            |a| a.id.to_string() == enrolled.agent_id.to_string() && a.name == "Room 101 agent"
        ),
        "{agents:?}"
    );

    // A second enrollment into the same directory is refused before any request (the server
    // here is unreachable, yet the answer is about the directory), and changes nothing.
    let before: Vec<Vec<u8>> = FILES
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    let mut again = f.options(&f.token(3600).await, &dir);
    again.server = "https://127.0.0.1:1".parse().unwrap();
    let e = within("enroll again", enroll(&again)).await.unwrap_err();
    assert!(matches!(e, EnrollError::AlreadyEnrolled { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    let after: Vec<Vec<u8>> = FILES
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    assert_eq!(before, after);

    // --force with a token the server refuses leaves the enrollment as it was.
    let forged = EnrollmentToken::generate(f.fingerprint())
        .unwrap()
        .to_token_string();
    let mut refused = f.options(&forged, &dir);
    refused.force = true;
    let e = within("enroll --force, refused", enroll(&refused))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::TokenRefused { .. }), "{e}");
    let unchanged: Vec<Vec<u8>> = FILES
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    assert_eq!(before, unchanged);

    // With --force it is replaced by a new identity that works too.
    let mut forced = f.options(&f.token(3600).await, &dir);
    forced.force = true;
    let second = within("enroll --force", enroll(&forced))
        .await
        .expect("re-enrolled");
    assert_ne!(second.agent_id, enrolled.agent_id);
    assert_ne!(std::fs::read(dir.join("agent.key")).unwrap(), before[2]);
    connect_with(&second.config, &second, &f.server, false).await;
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "no temporary file left: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_stops_before_the_token_is_sent() {
    let f = start().await;
    let out = tempfile::tempdir().unwrap();
    let token = f.token(3600).await;
    // The same token naming another CA.
    let other = format!("{}{}", &token[..token.len() - 64], "ab".repeat(32));
    let e = within("enroll", enroll(&f.options(&other, out.path())))
        .await
        .unwrap_err();
    let EnrollError::CaMismatch { expected, actual } = &e else {
        panic!("expected a CA mismatch, got {e}");
    };
    assert_eq!(expected.to_string(), "ab".repeat(32));
    assert_eq!(actual.to_string(), f.fingerprint().to_string());
    let text = e.to_string();
    assert!(text.contains(&"ab".repeat(32)) && text.contains(&f.fingerprint().to_string()));
    assert!(text.contains("the token was not sent"), "{text}");
    assert_empty(out.path());
    // Had the token reached the server, it would have recorded a refusal.
    assert!(f.security_events().await.is_empty());
    // And it is still good with the right fingerprint.
    within("enroll", enroll(&f.options(&token, out.path())))
        .await
        .expect("the right token enrolls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_used_and_expired_tokens_are_refused_with_the_servers_message() {
    let f = start().await;
    let out = tempfile::tempdir().unwrap();
    // Forged: the right format and CA, an id and secret the server never issued.
    let forged = EnrollmentToken::generate(f.fingerprint())
        .unwrap()
        .to_token_string();
    let dir = out.path().join("forged");
    let e = within("forged", enroll(&f.options(&forged, &dir)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, EnrollError::TokenRefused { status: 403, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("unknown, already used, or expired"),
        "{e}"
    );
    assert_empty(&dir);

    // Used: the first enrollment takes it, the second is refused.
    let token = f.token(3600).await;
    within(
        "first",
        enroll(&f.options(&token, &out.path().join("first"))),
    )
    .await
    .expect("first use");
    let dir = out.path().join("reused");
    let e = within("reused", enroll(&f.options(&token, &dir)))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::TokenRefused { .. }), "{e}");
    assert_empty(&dir);

    // Expired.
    let expired = f.token(-60).await;
    let dir = out.path().join("expired");
    let e = within("expired", enroll(&f.options(&expired, &dir)))
        .await
        .unwrap_err();
    assert!(matches!(e, EnrollError::TokenRefused { .. }), "{e}");
    assert_empty(&dir);
    let events = f.security_events().await;
    assert_eq!(
        events
            .iter()
            .filter(|k| *k == "enroll_token_refused")
            .count(),
        3,
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named_and_nothing_is_written() {
    let out = tempfile::tempdir().unwrap();
    let closed = escvp::emulator::ClosedPort::on([127, 0, 0, 1].into()).unwrap();
    let gone = closed.addr();
    let token: Token = format!(
        "epmc1.{}.{}.{}",
        "01".repeat(8),
        "02".repeat(24),
        "03".repeat(32)
    )
    .parse()
    .unwrap();
    let server: ServerAddress = format!("https://127.0.0.1:{}", gone.port())
        .parse()
        .unwrap();
    let mut options = EnrollOptions::new(server, token, out.path().join("agent"));
    options.timeout = Duration::from_secs(5);
    let e = within("enroll", enroll(&options)).await.unwrap_err();
    assert!(matches!(e, EnrollError::Unreachable { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("cannot reach https://127.0.0.1:{}", gone.port())),
        "{e}"
    );
    assert!(!out.path().join("agent").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rename_leaves_no_partial_enrollment() {
    let f = start().await;
    let out = tempfile::tempdir().unwrap();
    // agent.toml is a non-empty directory: the last rename fails (with --force, which lets
    // the enrollment get that far).
    std::fs::create_dir_all(out.path().join("agent.toml/x")).unwrap();
    let mut options = f.options(&f.token(3600).await, out.path());
    options.force = true;
    let e = within("enroll", enroll(&options)).await.unwrap_err();
    assert!(matches!(e, EnrollError::Io { .. }), "{e}");
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["agent.toml"], "only the obstacle is left");
}

/// `Basic base64("enroller:tunnel-pw")`, computed independently.
const PROXY_AUTH: &str = "Basic ZW5yb2xsZXI6dHVubmVsLXB3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_and_connects_through_an_http_proxy() {
    let f = start().await;
    let proxy = ConnectProxy::start(Behaviour::RequireAuth(PROXY_AUTH)).await;
    let out = tempfile::tempdir().unwrap();
    let url = ProxyUrl {
        host: "127.0.0.1".into(),
        port: proxy.addr.port(),
        credentials: None,
    };

    // Wrong credentials: refused by the proxy, named as such, nothing written.
    let dir = out.path().join("wrong");
    let mut options = f.options(&f.token(3600).await, &dir);
    options.proxy = Some(EnrollProxy {
        url: url.clone(),
        credentials: Some(ProxyCredentials::new("enroller", "nope").unwrap()),
    });
    let e = within("enroll", enroll(&options)).await.unwrap_err();
    assert!(matches!(e, EnrollError::Unreachable { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&format!(
            "through the HTTP proxy 127.0.0.1:{}",
            proxy.addr.port()
        )),
        "{text}"
    );
    assert!(text.contains("proxy authorization required"), "{text}");
    assert_empty(&dir);
    assert_eq!(proxy.tunnels(), 0);

    // The right ones: enrollment and then MQTT go through the proxy.
    let dir = out.path().join("agent");
    let mut options = f.options(&f.token(3600).await, &dir);
    options.proxy = Some(EnrollProxy {
        url,
        credentials: Some(ProxyCredentials::new("enroller", "tunnel-pw").unwrap()),
    });
    let enrolled = within("enroll", enroll(&options)).await.expect("enrolled");
    let https = format!(
        "CONNECT localhost:{} HTTP/1.1",
        f.server.https_addr().port()
    );
    let tunnels = proxy.tunnels();
    assert!(tunnels >= 2, "the CA fetch and the enrollment: {tunnels}");
    connect_with(&enrolled.config, &enrolled, &f.server, true).await;
    assert_eq!(proxy.tunnels(), tunnels + 1, "MQTT went through the proxy");
    let requests = proxy.requests();
    assert!(
        requests.iter().filter(|r| **r == https).count() >= 2,
        "{requests:?}"
    );
    assert_eq!(
        requests.last().unwrap(),
        &format!(
            "CONNECT localhost:{} HTTP/1.1",
            f.server.mqtt_addr().expect("embedded endpoint").port()
        )
    );
    // The service started on that configuration reaches the server through the proxy too.
    let c = AgentConfig::load(&enrolled.config).unwrap();
    let before = proxy.tunnels();
    let service = epmc_agent::service::Service::start(
        c.clone(),
        epmc_agent::service::ServiceOptions::new(dir.join("state")),
    )
    .await
    .expect("the service starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !service.connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        service.connected(),
        "the service connected through the proxy"
    );
    assert_eq!(service.agent_id(), enrolled.agent_id);
    assert_eq!(proxy.tunnels(), before + 1);
    within("stop", service.stop()).await;
    let p = c.proxy.unwrap();
    assert_eq!(
        p.to_http_proxy(),
        HttpProxy::new("127.0.0.1", proxy.addr.port()).with_credentials(Some(
            ProxyCredentials::new("enroller", "tunnel-pw").unwrap()
        ))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_enrolls_and_explains_failures() {
    let f = start().await;
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("cli");
    let token = f.token(3600).await;
    let cli = |args: &[&str]| Cli::try_parse_from(args).expect("parses");
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let code = run(
        cli(&[
            "epmc-agent",
            "enroll",
            "--server",
            &f.server_url(),
            "--token",
            &token,
            "--dir",
            dir.to_str().unwrap(),
            "--name",
            "cli agent",
        ]),
        &mut o,
        &mut e,
    )
    .await;
    let (o, e) = (String::from_utf8(o).unwrap(), String::from_utf8(e).unwrap());
    assert_eq!(code, 0, "{o}{e}");
    assert!(o.starts_with("enrolled as agent "), "{o}");
    assert!(o.contains(&f.fingerprint().to_string()), "{o}");
    assert!(dir.join("agent.toml").is_file());
    assert!(o.contains("self-update is off"), "{o}");

    // Enrolling again with --force (and a release key, which turns self-update on) over a directory whose state belongs to the previous
    // agent says that `run` will refuse that state.
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(
        dir.join("state/agent-id"),
        "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f\n",
    )
    .unwrap();
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let code = run(
        cli(&[
            "epmc-agent",
            "enroll",
            "--server",
            &f.server_url(),
            "--token",
            &f.token(3600).await,
            "--dir",
            dir.to_str().unwrap(),
            "--force",
            "--release-key",
            &format!("ed25519:{}", "5a".repeat(32)),
        ]),
        &mut o,
        &mut e,
    )
    .await;
    let o = String::from_utf8(o).unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&e));
    assert!(
        o.contains("holds the state of the previous agent 6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"),
        "{o}"
    );
    assert!(!o.contains("self-update is off"), "{o}");
    let written = epmc_agent::config::AgentConfig::load(&dir.join("agent.toml")).unwrap();
    let update = written.update.expect("[update] written");
    assert_eq!(update.url.to_string(), f.server_url());
    assert_eq!(
        update.public_key.to_string(),
        format!("ed25519:{}", "5a".repeat(32))
    );

    // The check command accepts what was written.
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let config = dir.join("agent.toml");
    let code = run(
        cli(&["epmc-agent", "check", "--config", config.to_str().unwrap()]),
        &mut o,
        &mut e,
    )
    .await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&e));

    // A malformed token: a clear message that does not repeat it.
    let secret_bit = "5".repeat(40);
    let bad = format!("epmc1.{}.{secret_bit}.{}", "0".repeat(16), "1".repeat(64));
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let code = run(
        cli(&[
            "epmc-agent",
            "enroll",
            "--server",
            &f.server_url(),
            "--token",
            &bad,
            "--dir",
            out.path().join("bad").to_str().unwrap(),
        ]),
        &mut o,
        &mut e,
    )
    .await;
    let e = String::from_utf8(e).unwrap();
    assert_eq!(code, 1);
    assert!(
        e.contains("--token: the enrollment token's secret must be 48"),
        "{e}"
    );
    assert!(!e.contains(&secret_bit), "{e}");
    assert!(!out.path().join("bad").exists());

    // Through a proxy that wants credentials, given on the command line.
    let proxy = ConnectProxy::start(Behaviour::RequireAuth(PROXY_AUTH)).await;
    let dir = out.path().join("via-proxy");
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let code = run(
        cli(&[
            "epmc-agent",
            "enroll",
            "--server",
            &f.server_url(),
            "--token",
            &f.token(3600).await,
            "--dir",
            dir.to_str().unwrap(),
            "--proxy",
            &proxy.url(),
            "--proxy-user",
            "enroller",
            "--proxy-password",
            "tunnel-pw",
        ]),
        &mut o,
        &mut e,
    )
    .await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&e));
    assert!(proxy.tunnels() >= 2);
    let c = AgentConfig::load(&dir.join("agent.toml")).unwrap();
    let creds = c.proxy.unwrap().credentials.unwrap();
    assert_eq!(
        (creds.username(), creds.password()),
        ("enroller", "tunnel-pw")
    );
    // A proxy password needs a user, a user needs a proxy.
    for args in [
        &["--proxy", "http://127.0.0.1:1", "--proxy-password", "x"][..],
        &["--proxy-user", "u", "--proxy-password", "x"][..],
    ] {
        let mut argv = vec!["epmc-agent", "enroll", "--server", "https://localhost:1"];
        argv.extend(["--token", &token]);
        argv.extend(args);
        assert!(Cli::try_parse_from(&argv).is_err(), "{args:?}");
    }

    // A bad server URL is refused by the parser.
    assert!(
        Cli::try_parse_from([
            "epmc-agent",
            "enroll",
            "--server",
            "http://localhost:1",
            "--token",
            &token
        ])
        .is_err()
    );
}
