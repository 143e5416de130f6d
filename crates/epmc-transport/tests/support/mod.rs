//! A real Mosquitto for tests: a private CA, a server certificate for localhost/127.0.0.1,
//! agent certificates (CN = agent id), a foreign CA, and a broker on a free loopback port
//! run with the configuration and ACL that ship in `deploy/mosquitto/` (paths and port
//! substituted, see [`render_config`]): client certificates required, the CN is the user name
//! and the client id, each agent limited to its own topics, the server identity
//! [`SERVER`] reading everything.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use epmc_transport::client::{MqttOptions, TlsIdentity};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// The CN of the server's own certificate in the shipped ACL.
pub const SERVER: &str = "epmc-server";

/// The configuration and ACL that ship for Mosquitto.
pub const SHIPPED_CONFIG: &str = include_str!("../../../../deploy/mosquitto/mosquitto.conf");
pub const SHIPPED_ACL: &str = include_str!("../../../../deploy/mosquitto/acl");

/// The shipped configuration for a test broker: its files in `dir`, listening on
/// `127.0.0.1:port`, running as the current user and logging to stderr. Only paths and the
/// port change; each substitution must find its line, so the harness cannot drift from the
/// file silently.
pub fn render_config(shipped: &str, dir: &Path, port: u16) -> String {
    let dir = dir.display().to_string();
    let mut out = String::new();
    let mut found = [false; 3];
    for line in shipped.lines() {
        let line = if line == "listener 8883" {
            found[0] = true;
            format!("listener {port} 127.0.0.1")
        } else if line.contains("/etc/mosquitto/epmc/") {
            found[1] = true;
            line.replace("/etc/mosquitto/epmc/", &format!("{dir}/"))
        } else if line == "persistence_location /var/lib/mosquitto/" {
            found[2] = true;
            format!("persistence_location {dir}/")
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push('\n');
    }
    assert_eq!(found, [true; 3], "the shipped mosquitto.conf changed shape");
    assert!(
        !out.contains("/etc/") && !out.contains("/var/"),
        "a path the harness does not substitute:\n{out}"
    );
    out.push_str("# test only\nuser root\nlog_dest stderr\n");
    out
}

/// How long any single step of a test may take before it counts as hung.
pub const BOUND: Duration = Duration::from_secs(15);

/// Awaits `f`, failing the test if it takes longer than [`BOUND`].
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("within the bound")
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate revocation list signed by this CA revoking these serial numbers, PEM.
    pub fn crl(&self, revoked: &[u64]) -> String {
        // rcgen's default validity (1975 to 4096) without naming the `time` crate.
        let validity = CertificateParams::default();
        let revoked_certs = revoked
            .iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(*serial),
                revocation_time: validity.not_before,
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        rcgen::CertificateRevocationListParams {
            this_update: validity.not_before,
            next_update: validity.not_after,
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }

    /// `(certificate PEM, key PEM)` for a server with these names.
    pub fn server(&self, names: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// `(certificate PEM, key PEM)` for an agent whose CN is `cn`.
    pub fn client(&self, cn: &str) -> (String, String) {
        self.client_with_serial(cn, None)
    }

    /// Same, with a chosen serial number (to revoke it).
    pub fn client_with_serial(&self, cn: &str, serial: Option<u64>) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn identity(&self, cn: &str) -> TlsIdentity {
        let (cert, key) = self.client(cn);
        TlsIdentity::from_pem(self.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    }
}

/// A Mosquitto for one test; its log goes to the test's stderr when `EPMC_BROKER_LOG` is set.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    config: PathBuf,
}

fn mosquitto() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run scripts/setup (it installs the Debian package)");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("EPMC Test CA");
        let (cert, key) = ca.server(&["localhost", "127.0.0.1"]);
        let d = dir.path();
        std::fs::write(d.join("ca.crt"), &ca.pem).unwrap();
        std::fs::write(d.join("server.crt"), cert).unwrap();
        std::fs::write(d.join("server.key"), key).unwrap();
        std::fs::write(d.join("crl.pem"), ca.crl(&[])).unwrap();
        std::fs::write(d.join("acl"), SHIPPED_ACL).unwrap();
        let port = free_port();
        let config = d.join("mosquitto.conf");
        std::fs::write(&config, render_config(SHIPPED_CONFIG, d, port)).unwrap();
        let mut broker = Broker {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            ca,
            config,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("EPMC_BROKER_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker gracefully (SIGTERM, so it saves its sessions) and starts it again on
    /// the same port and state.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.launch();
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port with its saved state
    /// deleted: every session and subscription is forgotten, as after losing its disk.
    pub fn restart_forgetting(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "db") {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        self.launch();
    }

    /// Publishes a revocation list revoking these serial numbers; it applies from the next
    /// [`Broker::restart`].
    pub fn revoke(&self, serials: &[u64]) {
        std::fs::write(self.dir.path().join("crl.pem"), self.ca.crl(serials)).unwrap();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn options(&self, client_id: &str) -> MqttOptions {
        MqttOptions::new(self.addr, "localhost", client_id)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP forwarder whose connections can be cut at once, so a client "dies" without sending
/// DISCONNECT.
pub struct Proxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    Ok((mut inbound, _)) = listener.accept() => {
                        conns.spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Proxy { addr, task }
    }

    /// Drops every forwarded connection (both sockets close without an MQTT DISCONNECT).
    pub fn cut(self) {
        self.task.abort();
    }
}

/// Collects the payloads published on `topic` through a persistent session (the server's
/// identity and client id, reconnecting after broker restarts), de-duplicated, in arrival
/// order, until `last` has arrived or 60 s have passed.
pub async fn collect_until(
    broker: SocketAddr,
    identity: epmc_transport::client::TlsIdentity,
    topic: &str,
    last: &[u8],
) -> Vec<bytes::Bytes> {
    use epmc_transport::client::MqttClient;
    use epmc_transport::mqtt::QoS;
    let mut opts = MqttOptions::new(broker, "localhost", SERVER);
    opts.clean_session = false;
    // Mosquitto 2.0.11 sends a resumed session's whole backlog at once (hundreds here, after
    // the restart), regardless of its in-flight limit.
    opts.incoming_window = 100_000;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut got: Vec<bytes::Bytes> = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let Ok((c, _, mut rx)) = MqttClient::connect(&opts, &identity).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if c.subscribe(&[(topic, QoS::AtLeastOnce)]).await.is_err() {
            continue;
        }
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            let payload = m.message.payload.clone();
            m.ack();
            if !got.contains(&payload) {
                got.push(payload.clone());
            }
            if &payload[..] == last {
                return got;
            }
        }
    }
    got
}
