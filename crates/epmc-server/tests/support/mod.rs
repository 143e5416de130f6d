//! The ingest endpoint on loopback with real certificates: a private CA (rcgen), a server
//! certificate for localhost/127.0.0.1, agent certificates whose CN is the agent id, a
//! rustls server configuration that requires client certificates, a recording sink that
//! can hold its commits, and raw TLS sockets for hostile agents.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use epmc_proto::topic::AgentId;
use epmc_server::ingest::{
    Endpoint, Inbound, IngestConfig, IngestSink, Outcome, Prepared, SecurityEvent, SinkError,
    agent_id_from_cn,
};
use epmc_transport::client::{MqttClient, MqttOptions, TlsIdentity};
use epmc_transport::mqtt::{Connect, ConnectReturn, DEFAULT_MAX_PACKET, Packet, PacketError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// How long any single step of a test may take before it counts as hung.
pub const BOUND: Duration = Duration::from_secs(15);

/// Awaits `f`, failing the test if it takes longer than [`BOUND`].
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("within the bound")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The agent's TLS identity for `MqttClient`.
    pub fn identity(&self, cn: &str) -> TlsIdentity {
        let (cert, key) = self.client(cn);
        TlsIdentity::from_pem(self.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    }

    /// A rustls client configuration for a raw socket with the agent certificate `cn`.
    pub fn raw_client(&self, cn: &str) -> Arc<rustls::ClientConfig> {
        let (cert, key) = self.client(cn);
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"mqtt".to_vec()];
        Arc::new(config)
    }

    /// The endpoint's TLS configuration: this CA's server certificate for localhost and
    /// 127.0.0.1, client certificates from this CA required.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.server(&["localhost", "127.0.0.1"]);
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"mqtt".to_vec()];
        Arc::new(config)
    }
}

/// What the endpoint told the sink.
#[derive(Default)]
pub struct Recorded {
    pub batches: Vec<Vec<Inbound>>,
    pub states: Vec<(AgentId, bool)>,
    pub events: Vec<SecurityEvent>,
    /// Messages handed to `prepare`, in order (before their commit).
    pub prepared: Vec<Inbound>,
    /// The name of the thread each commit ran on.
    pub commit_threads: Vec<Option<String>>,
    /// How many presence changes each `agent_states` call carried.
    pub state_batches: Vec<usize>,
}

/// A sink that records everything; `hold` makes commits wait until `release`, `fail` makes
/// them fail.
pub struct RecordingSink {
    pub log: Mutex<Recorded>,
    held: watch::Sender<bool>,
    fail: AtomicBool,
    /// Signals every recorded change.
    changed: watch::Sender<u64>,
    /// Every commit call as it starts.
    started: mpsc::UnboundedSender<usize>,
}

impl RecordingSink {
    pub fn new() -> (Arc<RecordingSink>, mpsc::UnboundedReceiver<usize>) {
        let (started, rx) = mpsc::unbounded_channel();
        (
            Arc::new(RecordingSink {
                log: Mutex::new(Recorded::default()),
                held: watch::channel(false).0,
                fail: AtomicBool::new(false),
                changed: watch::channel(0).0,
                started,
            }),
            rx,
        )
    }

    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    pub fn fail_commits(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits (bounded) until `f` holds on what was recorded.
    pub async fn until(&self, what: &str, f: impl Fn(&Recorded) -> bool) {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                if f(&self.log.lock().unwrap()) {
                    return;
                }
                rx.changed().await.unwrap();
            }
        };
        tokio::time::timeout(BOUND, wait)
            .await
            .unwrap_or_else(|_| panic!("never recorded: {what}"));
    }

    pub fn events(&self) -> Vec<SecurityEvent> {
        self.log.lock().unwrap().events.clone()
    }

    /// Every payload committed for `agent`, in commit order.
    pub fn payloads(&self, agent: AgentId) -> Vec<Bytes> {
        let log = self.log.lock().unwrap();
        log.batches
            .iter()
            .flatten()
            .filter(|m| m.agent == agent)
            .map(|m| m.payload.clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl IngestSink for RecordingSink {
    fn prepare(&self, batch: Vec<Inbound>) -> Prepared {
        self.log
            .lock()
            .unwrap()
            .prepared
            .extend(batch.iter().cloned());
        self.touch();
        Prepared::unprepared(batch)
    }

    async fn commit(&self, batch: Vec<Inbound>) -> Result<Vec<Outcome>, SinkError> {
        let _ = self.started.send(batch.len());
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|h| !*h).await;
        if self.fail.load(Ordering::SeqCst) {
            return Err(SinkError("the test made it fail".into()));
        }
        let outcomes = batch
            .iter()
            .map(|m| {
                if m.payload.starts_with(b"poison") {
                    Outcome::Rejected("poison".into())
                } else {
                    Outcome::Stored
                }
            })
            .collect();
        let thread = std::thread::current().name().map(str::to_owned);
        let mut log = self.log.lock().unwrap();
        log.batches.push(batch);
        log.commit_threads.push(thread);
        drop(log);
        self.touch();
        Ok(outcomes)
    }

    async fn agent_state(&self, agent: AgentId, online: bool) {
        self.log.lock().unwrap().states.push((agent, online));
        self.touch();
    }

    async fn agent_states(&self, changes: Vec<(AgentId, bool)>) {
        let mut log = self.log.lock().unwrap();
        log.state_batches.push(changes.len());
        log.states.extend(changes);
        drop(log);
        self.touch();
    }

    async fn security_event(&self, event: SecurityEvent) {
        self.log.lock().unwrap().events.push(event);
        self.touch();
    }
}

pub struct Server {
    pub ca: Ca,
    pub endpoint: Endpoint,
    pub sink: Arc<RecordingSink>,
    pub commits: mpsc::UnboundedReceiver<usize>,
}

impl Server {
    pub async fn start(config: IngestConfig) -> Server {
        let ca = Ca::new("EPMC Ingest Test CA");
        let (sink, commits) = RecordingSink::new();
        let endpoint = Endpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            ca.server_config(),
            agent_id_from_cn,
            sink.clone(),
            config,
        )
        .await
        .unwrap();
        Server {
            ca,
            endpoint,
            sink,
            commits,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    pub fn options(&self, agent: AgentId) -> MqttOptions {
        let mut o = MqttOptions::new(self.addr(), "localhost", &agent.to_string());
        o.clean_session = true;
        o
    }

    /// A healthy agent: `MqttClient` with its own certificate and client id.
    pub async fn agent(
        &self,
        agent: AgentId,
    ) -> (MqttClient, mpsc::Receiver<epmc_transport::ReceivedOrder>) {
        let (c, _, rx) = within(MqttClient::connect(
            &self.options(agent),
            &self.ca.identity(&agent.to_string()),
        ))
        .await
        .unwrap();
        (c, rx)
    }

    /// A raw TLS socket with the certificate `cn`, nothing sent yet.
    pub async fn raw(&self, cn: &str) -> Raw {
        self.raw_with(self.ca.raw_client(cn))
            .await
            .expect("a TLS connection")
    }

    /// A raw TLS socket with this client configuration; `None` if the handshake failed on
    /// the client's side (with TLS 1.3 the server's refusal of a client certificate only
    /// shows on the first read).
    pub async fn raw_with(&self, config: Arc<rustls::ClientConfig>) -> Option<Raw> {
        let tcp = TcpStream::connect(self.addr()).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = within(connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
            .await
            .ok()?;
        Some(Raw {
            tls,
            buf: Vec::new(),
        })
    }

    /// A raw socket that sent CONNECT with `client_id` and got CONNACK accepted.
    pub async fn raw_connected(&self, cn: &str, keep_alive: u16) -> Raw {
        let mut raw = self.raw(cn).await;
        raw.send(&connect(cn, keep_alive)).await;
        assert_eq!(
            raw.read().await,
            Some(Packet::ConnAck {
                session_present: false,
                code: ConnectReturn::Accepted
            })
        );
        raw
    }
}

pub fn connect(client_id: &str, keep_alive: u16) -> Packet {
    Packet::Connect(Connect {
        client_id: client_id.to_owned(),
        clean_session: true,
        keep_alive,
        will: None,
        username: None,
        password: None,
    })
}

pub fn new_agent() -> AgentId {
    AgentId::new(uuid::Uuid::new_v4())
}

pub struct Raw {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn send(&mut self, p: &Packet) {
        self.send_raw(&p.to_bytes().unwrap()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        // The server may already have closed: a failed write shows up as `read() == None`.
        let _ = self.tls.write_all(bytes).await;
        let _ = self.tls.flush().await;
    }

    /// The next packet from the server, `None` once it closed (bounded).
    pub async fn read(&mut self) -> Option<Packet> {
        within(async {
            loop {
                match Packet::decode(&self.buf, DEFAULT_MAX_PACKET) {
                    Ok((p, used)) => {
                        self.buf.drain(..used);
                        return Some(p);
                    }
                    Err(PacketError::Incomplete { .. }) => {}
                    Err(e) => panic!("the server sent a bad packet: {e}"),
                }
                let mut chunk = [0u8; 4096];
                match self.tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    /// The next packet or `None` if nothing comes within `wait` (the connection stays).
    pub async fn read_within(&mut self, wait: Duration) -> Option<Option<Packet>> {
        tokio::time::timeout(wait, self.read()).await.ok()
    }
}
