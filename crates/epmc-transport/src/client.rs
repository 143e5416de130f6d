//! MQTT 3.1.1 over TLS with a client certificate (tokio + rustls, aws-lc-rs provider).
//!
//! - TLS 1.3 and 1.2; the server CA is pinned (only that CA is trusted, no system roots);
//!   the server name is checked; ALPN `mqtt`; the client certificate and key come from PEM.
//! - [`MqttClient`]: one connection: CONNECT/CONNACK, QoS 1 publish resolving on PUBACK with
//!   an in-flight window, subscriptions, incoming publishes (acknowledged after delivery to
//!   the receiver), keep-alive with dead-peer detection, last will.
//! - [`MqttUplink`]: an [`Uplink`] that (re)connects on demand with exponential back-off and
//!   jitter, so an outbox can drain through it across broker restarts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::mqtt::{
    Connect, ConnectReturn, DEFAULT_MAX_PACKET, Packet, PacketError, Publish, QoS, TopicFilter,
    TopicName, Will,
};
use crate::{InboundMessage, OutboundMessage, TransportError, Uplink};

/// TLS material: the pinned server CA and the client's certificate chain and key, in PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity")
    }
}

/// TLS set-up errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("bad PEM in {what}: {detail}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the material (e.g. key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsIdentity {
    /// Builds the client TLS configuration from PEM text.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let pem = |what, e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            detail: e.to_string(),
        };
        let mut roots = rustls::RootCertStore::empty();
        let mut any_ca = false;
        for ca in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(ca.map_err(|e| pem("CA certificate", e))?)
                .map_err(TlsError::Config)?;
            any_ca = true;
        }
        if !any_ca {
            return Err(TlsError::Pem {
                what: "CA certificate",
                detail: "no certificate found".into(),
            });
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem("client certificate", e))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "client certificate",
                detail: "no certificate found".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem("client key", e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"mqtt".to_vec()];
        Ok(TlsIdentity {
            config: Arc::new(config),
        })
    }

    /// Reads the three PEM files.
    pub fn from_files(
        ca: impl AsRef<std::path::Path>,
        cert: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> Result<Self, TlsError> {
        let read = |what, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| TlsError::Pem {
                what,
                detail: format!("{}: {e}", p.display()),
            })
        };
        TlsIdentity::from_pem(
            &read("CA certificate", ca.as_ref())?,
            &read("client certificate", cert.as_ref())?,
            &read("client key", key.as_ref())?,
        )
    }
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct MqttOptions {
    /// Broker address.
    pub addr: SocketAddr,
    /// Name the server certificate must carry (DNS name or IP).
    pub server_name: String,
    /// Client id (the agent id; the broker checks it against the certificate).
    pub client_id: String,
    /// Keep-alive; a PINGREQ is sent after this much silence and the connection is dropped
    /// if nothing arrives for 1.5 × this.
    pub keep_alive: Duration,
    /// `false` keeps a persistent session (orders queued while offline are delivered).
    pub clean_session: bool,
    /// Last will.
    pub will: Option<Will>,
    /// Most QoS 1 publishes awaiting PUBACK at once.
    pub in_flight: usize,
    /// Largest packet sent or accepted.
    pub max_packet: usize,
    /// TCP + TLS + CONNACK must complete within this.
    pub connect_timeout: Duration,
}

impl MqttOptions {
    /// Defaults: keep-alive 30 s, persistent session, 32 in flight, 1 MiB packets, 10 s
    /// connect timeout.
    pub fn new(addr: SocketAddr, server_name: &str, client_id: &str) -> Self {
        MqttOptions {
            addr,
            server_name: server_name.to_owned(),
            client_id: client_id.to_owned(),
            keep_alive: Duration::from_secs(30),
            clean_session: false,
            will: None,
            in_flight: 32,
            max_packet: DEFAULT_MAX_PACKET,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Connection errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// TCP or TLS failed (including an unknown server CA, a wrong server name, or the server
    /// refusing our certificate).
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// CONNACK refused.
    #[error("CONNECT refused: {0:?}")]
    Refused(ConnectReturn),
    /// The broker sent something that is not MQTT, or too large.
    #[error("protocol error: {0}")]
    Protocol(#[from] PacketError),
    /// Timed out.
    #[error("timed out")]
    TimedOut,
    /// The connection closed.
    #[error("connection closed")]
    Closed,
}

impl From<MqttError> for TransportError {
    fn from(e: MqttError) -> Self {
        match e {
            MqttError::Refused(c) => TransportError::Refused(format!("{c:?}")),
            MqttError::TimedOut => TransportError::TimedOut(Duration::ZERO),
            MqttError::Io(e) => TransportError::Io(e),
            MqttError::Closed => TransportError::Closed,
            other => TransportError::Refused(other.to_string()),
        }
    }
}

type PubDone = oneshot::Sender<Result<(), MqttError>>;
type SubDone = oneshot::Sender<Result<Vec<Option<QoS>>, MqttError>>;

enum Request {
    Publish(Publish, PubDone),
    Subscribe(Vec<(TopicFilter, QoS)>, SubDone),
}

/// One MQTT connection. Dropping every clone disconnects (without DISCONNECT when the
/// connection is already gone).
#[derive(Clone, Debug)]
pub struct MqttClient {
    tx: mpsc::Sender<Request>,
    window: Arc<Semaphore>,
    alive: Arc<AtomicBool>,
}

impl MqttClient {
    /// Connects: TCP, TLS (pinned CA, name check, client certificate), CONNECT, CONNACK.
    /// Returns the client, whether the broker resumed a session, and the receiver of incoming
    /// publishes.
    pub async fn connect(
        options: &MqttOptions,
        tls: &TlsIdentity,
    ) -> Result<(MqttClient, bool, mpsc::Receiver<InboundMessage>), MqttError> {
        tokio::time::timeout(options.connect_timeout, Self::connect_inner(options, tls))
            .await
            .map_err(|_| MqttError::TimedOut)?
    }

    async fn connect_inner(
        options: &MqttOptions,
        tls: &TlsIdentity,
    ) -> Result<(MqttClient, bool, mpsc::Receiver<InboundMessage>), MqttError> {
        let name = ServerName::try_from(options.server_name.clone())
            .map_err(|_| MqttError::ServerName(options.server_name.clone()))?;
        let tcp = TcpStream::connect(options.addr).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let mut stream = connector.connect(name, tcp).await?;
        let connect = Packet::Connect(Connect {
            client_id: options.client_id.clone(),
            clean_session: options.clean_session,
            keep_alive: u16::try_from(options.keep_alive.as_secs()).unwrap_or(u16::MAX),
            will: options.will.clone(),
            username: None,
            password: None,
        });
        let mut out = Vec::new();
        connect.encode(&mut out, options.max_packet)?;
        stream.write_all(&out).await?;
        let mut buf = Vec::with_capacity(4096);
        let (packet, used) = read_packet(&mut stream, &mut buf, options.max_packet).await?;
        buf.drain(..used);
        let session_present = match packet {
            Packet::ConnAck {
                session_present,
                code: ConnectReturn::Accepted,
            } => session_present,
            Packet::ConnAck { code, .. } => return Err(MqttError::Refused(code)),
            _ => {
                return Err(MqttError::Protocol(PacketError::Malformed(
                    "expected CONNACK",
                )));
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(256);
        let alive = Arc::new(AtomicBool::new(true));
        let driver = Driver {
            rx,
            incoming: in_tx,
            pending_pub: HashMap::new(),
            pending_sub: HashMap::new(),
            next_id: 1,
            keep_alive: options.keep_alive,
            max_packet: options.max_packet,
            alive: alive.clone(),
        };
        tokio::spawn(driver.run(stream, buf));
        Ok((
            MqttClient {
                tx,
                window: Arc::new(Semaphore::new(options.in_flight.max(1))),
                alive,
            },
            session_present,
            in_rx,
        ))
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.tx.is_closed()
    }

    /// Publishes; for QoS 1 returns once the broker's PUBACK arrived.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), MqttError> {
        let topic = TopicName::new(topic)?;
        let _permit = self.window.acquire().await.map_err(|_| MqttError::Closed)?;
        let (done, wait) = oneshot::channel();
        let publish = Publish {
            topic,
            qos,
            packet_id: None,
            retain,
            dup: false,
            payload,
        };
        self.tx
            .send(Request::Publish(publish, done))
            .await
            .map_err(|_| MqttError::Closed)?;
        wait.await.map_err(|_| MqttError::Closed)?
    }

    /// Subscribes and returns the granted QoS per filter (`None`: refused by the broker).
    pub async fn subscribe(&self, filters: &[(&str, QoS)]) -> Result<Vec<Option<QoS>>, MqttError> {
        let filters = filters
            .iter()
            .map(|(f, q)| Ok((TopicFilter::new(*f)?, *q)))
            .collect::<Result<Vec<_>, PacketError>>()?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request::Subscribe(filters, done))
            .await
            .map_err(|_| MqttError::Closed)?;
        wait.await.map_err(|_| MqttError::Closed)?
    }
}

async fn read_packet<S: AsyncReadExt + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(Packet, usize), MqttError> {
    loop {
        match Packet::decode(buf, max) {
            Ok(x) => return Ok(x),
            Err(PacketError::Incomplete { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(MqttError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct Driver {
    rx: mpsc::Receiver<Request>,
    incoming: mpsc::Sender<InboundMessage>,
    pending_pub: HashMap<u16, PubDone>,
    pending_sub: HashMap<u16, SubDone>,
    next_id: u16,
    keep_alive: Duration,
    max_packet: usize,
    alive: Arc<AtomicBool>,
}

impl Driver {
    fn packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.pending_pub.contains_key(&id) && !self.pending_sub.contains_key(&id) {
                return id;
            }
        }
    }

    async fn run<S>(mut self, stream: S, mut buf: Vec<u8>)
    where
        S: AsyncReadExt + AsyncWriteExt + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let keep_alive = if self.keep_alive.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.keep_alive
        };
        let mut last_sent = Instant::now();
        let mut last_heard = Instant::now();
        let mut chunk = vec![0u8; 16 * 1024];
        let result: Result<(), MqttError> = async {
            loop {
                // Everything already buffered first.
                loop {
                    match Packet::decode(&buf, self.max_packet) {
                        Ok((packet, used)) => {
                            buf.drain(..used);
                            if let Some(reply) = self.handle(packet).await {
                                let mut out = Vec::new();
                                reply.encode(&mut out, self.max_packet)?;
                                wr.write_all(&out).await?;
                                last_sent = Instant::now();
                            }
                        }
                        Err(PacketError::Incomplete { .. }) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                let ping_at = last_sent + keep_alive;
                let dead_at = last_heard + keep_alive.mul_f32(1.5);
                tokio::select! {
                    n = rd.read(&mut chunk) => {
                        let n = n?;
                        if n == 0 { return Err(MqttError::Closed); }
                        buf.extend_from_slice(&chunk[..n]);
                        last_heard = Instant::now();
                    }
                    req = self.rx.recv() => {
                        let Some(req) = req else {
                            let _ = wr.write_all(&[0xE0, 0]).await; // DISCONNECT
                            return Ok(());
                        };
                        let packet = match req {
                            Request::Publish(mut p, done) => {
                                if p.qos == QoS::AtLeastOnce {
                                    let id = self.packet_id();
                                    p.packet_id = Some(id);
                                    self.pending_pub.insert(id, done);
                                } else {
                                    let _ = done.send(Ok(()));
                                }
                                Packet::Publish(p)
                            }
                            Request::Subscribe(filters, done) => {
                                let id = self.packet_id();
                                self.pending_sub.insert(id, done);
                                Packet::Subscribe(id, filters)
                            }
                        };
                        let mut out = Vec::new();
                        packet.encode(&mut out, self.max_packet)?;
                        wr.write_all(&out).await?;
                        last_sent = Instant::now();
                    }
                    _ = tokio::time::sleep_until(ping_at.min(dead_at)) => {
                        if Instant::now() >= dead_at {
                            return Err(MqttError::TimedOut);
                        }
                        wr.write_all(&[0xC0, 0]).await?; // PINGREQ
                        last_sent = Instant::now();
                    }
                }
            }
        }
        .await;
        self.alive.store(false, Ordering::SeqCst);
        if let Err(e) = &result {
            tracing::debug!(error = %e, "MQTT connection ended");
        }
        for (_, done) in self.pending_pub.drain() {
            let _ = done.send(Err(MqttError::Closed));
        }
        for (_, done) in self.pending_sub.drain() {
            let _ = done.send(Err(MqttError::Closed));
        }
    }

    /// Handles one incoming packet; returns a packet to send back, if any.
    async fn handle(&mut self, packet: Packet) -> Option<Packet> {
        match packet {
            Packet::PubAck(id) => {
                if let Some(done) = self.pending_pub.remove(&id) {
                    let _ = done.send(Ok(()));
                }
                None
            }
            Packet::SubAck(id, codes) => {
                if let Some(done) = self.pending_sub.remove(&id) {
                    let _ = done.send(Ok(codes));
                }
                None
            }
            Packet::Publish(p) => {
                let ack = p.packet_id.map(Packet::PubAck);
                // Deliver before acknowledging: an order is PUBACKed only once the agent has it.
                let _ = self
                    .incoming
                    .send(InboundMessage {
                        topic: p.topic.as_str().to_owned(),
                        payload: p.payload,
                    })
                    .await;
                ack
            }
            _ => None,
        }
    }
}

/// An [`Uplink`] over MQTT that connects on demand, backing off exponentially (with jitter)
/// after failures, so a caller draining an outbox simply retries later.
pub struct MqttUplink {
    options: MqttOptions,
    tls: TlsIdentity,
    state: tokio::sync::Mutex<UplinkState>,
    incoming: Mutex<Option<mpsc::Receiver<InboundMessage>>>,
}

struct UplinkState {
    client: Option<MqttClient>,
    failures: u32,
    next_attempt: Instant,
}

impl std::fmt::Debug for MqttUplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUplink")
            .field("addr", &self.options.addr)
            .finish()
    }
}

/// Back-off after `failures` consecutive failures: 0.5 s doubling to at most 60 s, plus up to
/// 25 % jitter.
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1u32 << failures.min(7));
    let base = base.min(Duration::from_secs(60));
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

impl MqttUplink {
    /// An uplink that will connect with these settings.
    pub fn new(options: MqttOptions, tls: TlsIdentity) -> Self {
        MqttUplink {
            options,
            tls,
            state: tokio::sync::Mutex::new(UplinkState {
                client: None,
                failures: 0,
                next_attempt: Instant::now(),
            }),
            incoming: Mutex::new(None),
        }
    }

    /// The receiver of incoming publishes of the current connection (taken once per
    /// connection).
    pub fn take_incoming(&self) -> Option<mpsc::Receiver<InboundMessage>> {
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The connected client, connecting first if needed and allowed by the back-off.
    pub async fn client(&self) -> Result<MqttClient, TransportError> {
        let mut state = self.state.lock().await;
        if let Some(c) = &state.client {
            if c.is_connected() {
                return Ok(c.clone());
            }
            state.client = None;
        }
        if Instant::now() < state.next_attempt {
            return Err(TransportError::Unavailable);
        }
        match MqttClient::connect(&self.options, &self.tls).await {
            Ok((client, _, incoming)) => {
                state.failures = 0;
                state.client = Some(client.clone());
                *self.incoming.lock().unwrap_or_else(|e| e.into_inner()) = Some(incoming);
                Ok(client)
            }
            Err(e) => {
                state.failures = state.failures.saturating_add(1);
                state.next_attempt = Instant::now() + backoff(state.failures);
                tracing::debug!(error = %e, failures = state.failures, "MQTT connect failed");
                Err(e.into())
            }
        }
    }
}

#[async_trait]
impl Uplink for MqttUplink {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        let client = self.client().await?;
        client
            .publish(
                &message.topic,
                message.payload.clone(),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .map_err(TransportError::from)
    }

    fn is_connected(&self) -> bool {
        self.state
            .try_lock()
            .map(|s| s.client.as_ref().is_some_and(MqttClient::is_connected))
            .unwrap_or(true)
    }
}
