//! MQTT 3.1.1 over TLS with a client certificate (tokio + rustls, aws-lc-rs provider).
//!
//! - TLS 1.3 and 1.2; the server CA is pinned ([`ServerTrust::Pinned`]: only that CA is
//!   trusted) unless the operating system's roots are asked for ([`ServerTrust::SystemRoots`]);
//!   the server name is checked; ALPN `mqtt`; the client certificate and key come from PEM.
//! - [`MqttClient`]: one connection: CONNECT/CONNACK, QoS 1 publish resolving on PUBACK with
//!   an in-flight window, subscriptions, incoming publishes, keep-alive with dead-peer
//!   detection, last will.
//! - Incoming publishes are handed over as [`ReceivedOrder`]s and a QoS 1 one is acknowledged
//!   (PUBACK) only when the receiver calls [`ReceivedOrder::ack`], so the agent can record an
//!   order on disk first. The connection never waits for the receiver: it keeps reading,
//!   answering and sending keep-alives while orders wait to be read. What it holds is bounded:
//!   more than [`MqttOptions::incoming_window`] unacknowledged QoS 1 deliveries (a broker
//!   ignoring its own in-flight limit) end the connection with a protocol error, and QoS 0
//!   publishes beyond that many waiting are dropped (at most once, as QoS 0 allows).
//! - [`crate::session::MqttSession`] keeps one connected (reconnecting with back-off and
//!   re-subscribing) and is the agent's [`crate::Uplink`] and [`crate::OrderSource`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::mqtt::{
    Connect, ConnectReturn, DEFAULT_MAX_PACKET, Packet, PacketError, Publish, QoS, TopicFilter,
    TopicName, Will,
};
use crate::{InboundMessage, ReceivedOrder, TransportError};

/// Which server certificates to trust.
#[derive(Clone, Copy, Debug)]
pub enum ServerTrust<'a> {
    /// Only certificates issued by these CAs (PEM, one or more): the default for EPMC, whose
    /// server has a private CA.
    Pinned(&'a [u8]),
    /// The operating system's trust store (read with `rustls-native-certs`, which honours
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR`), for a broker with a publicly issued certificate.
    /// Only when asked for.
    SystemRoots,
}

/// TLS material: which server CA to trust and the client's certificate chain and key.
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
    /// Builds the client TLS configuration from PEM text, pinning the CA in `ca_pem`.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        TlsIdentity::new(ServerTrust::Pinned(ca_pem), cert_pem, key_pem)
    }

    /// Builds the client TLS configuration with the given server trust.
    pub fn new(trust: ServerTrust<'_>, cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let pem = |what, e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            detail: e.to_string(),
        };
        let mut roots = rustls::RootCertStore::empty();
        match trust {
            ServerTrust::Pinned(ca_pem) => {
                for ca in CertificateDer::pem_slice_iter(ca_pem) {
                    roots
                        .add(ca.map_err(|e| pem("CA certificate", e))?)
                        .map_err(TlsError::Config)?;
                }
            }
            ServerTrust::SystemRoots => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError::Pem {
                        what: "system trust store",
                        detail: found
                            .errors
                            .first()
                            .map_or_else(|| "no certificate found".into(), ToString::to_string),
                    });
                }
            }
        }
        if roots.is_empty() {
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
    /// Most incoming QoS 1 publishes handed over and not yet acknowledged; one more ends the
    /// connection with a protocol error rather than growing our memory. Orders dropped
    /// without `ack` count until the connection ends. A broker normally keeps to its own
    /// in-flight limit (Mosquitto's `max_inflight_messages`, 20), but Mosquitto 2.0.11 sends
    /// a resumed session's whole backlog at once (hundreds in the tests), so this must exceed
    /// the largest backlog of orders an agent can have waiting; above it the agent cannot
    /// get its orders (each connection ends before they are acknowledged).
    pub incoming_window: usize,
    /// Largest packet sent or accepted.
    pub max_packet: usize,
    /// TCP + TLS + CONNACK must complete within this.
    pub connect_timeout: Duration,
}

impl MqttOptions {
    /// Defaults: keep-alive 30 s, persistent session, 32 in flight, 1000 incoming
    /// unacknowledged, 1 MiB packets, 10 s connect timeout.
    pub fn new(addr: SocketAddr, server_name: &str, client_id: &str) -> Self {
        MqttOptions {
            addr,
            server_name: server_name.to_owned(),
            client_id: client_id.to_owned(),
            keep_alive: Duration::from_secs(30),
            clean_session: false,
            will: None,
            in_flight: 32,
            incoming_window: 1000,
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
    /// What we were asked to send cannot be sent (larger than the maximum packet size, or an
    /// invalid topic); the connection stays up.
    #[error("cannot send: {0}")]
    Unsendable(PacketError),
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
            MqttError::Unsendable(e) => TransportError::BadInput(e.to_string()),
            other => TransportError::Refused(other.to_string()),
        }
    }
}

type PubDone = oneshot::Sender<Result<(), MqttError>>;
type SubDone = oneshot::Sender<Result<Vec<Option<QoS>>, MqttError>>;

enum Request {
    /// The permit holds a place in the in-flight window until the PUBACK (or the end of the
    /// connection).
    Publish(Publish, PubDone, OwnedSemaphorePermit),
    Subscribe(Vec<(TopicFilter, QoS)>, SubDone),
}

/// One MQTT connection. Dropping every clone disconnects (without DISCONNECT when the
/// connection is already gone).
#[derive(Clone, Debug)]
pub struct MqttClient {
    tx: mpsc::Sender<Request>,
    window: Arc<Semaphore>,
    capacity: usize,
    alive: Arc<AtomicBool>,
}

/// A QoS 1 publish that has been handed to the connection, in order, and is waiting for its
/// PUBACK (see [`MqttClient::send_publish`]).
#[derive(Debug)]
#[must_use = "the PUBACK is only observed by awaiting `acked`"]
pub struct PendingAck(oneshot::Receiver<Result<(), MqttError>>);

impl PendingAck {
    /// Waits for the broker's PUBACK (QoS 1) or for the packet to be written (QoS 0).
    pub async fn acked(self) -> Result<(), MqttError> {
        self.0.await.map_err(|_| MqttError::Closed)?
    }
}

impl MqttClient {
    /// Connects: TCP, TLS (pinned CA, name check, client certificate), CONNECT, CONNACK.
    /// Returns the client, whether the broker resumed a session, and the receiver of incoming
    /// publishes, in arrival order. Each QoS 1 publish is acknowledged only by its
    /// [`ReceivedOrder::ack`]; one dropped unacknowledged comes again after a reconnection
    /// with the persistent session.
    pub async fn connect(
        options: &MqttOptions,
        tls: &TlsIdentity,
    ) -> Result<(MqttClient, bool, mpsc::Receiver<ReceivedOrder>), MqttError> {
        tokio::time::timeout(options.connect_timeout, Self::connect_inner(options, tls))
            .await
            .map_err(|_| MqttError::TimedOut)?
    }

    async fn connect_inner(
        options: &MqttOptions,
        tls: &TlsIdentity,
    ) -> Result<(MqttClient, bool, mpsc::Receiver<ReceivedOrder>), MqttError> {
        let name = ServerName::try_from(options.server_name.clone())
            .map_err(|_| MqttError::ServerName(options.server_name.clone()))?;
        let connect = Packet::Connect(Connect {
            client_id: options.client_id.clone(),
            clean_session: options.clean_session,
            keep_alive: u16::try_from(options.keep_alive.as_secs()).unwrap_or(u16::MAX),
            will: options.will.clone(),
            username: None,
            password: None,
        });
        let mut out = Vec::new();
        connect
            .encode(&mut out, options.max_packet)
            .map_err(MqttError::Unsendable)?;
        let tcp = TcpStream::connect(options.addr).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let mut stream = connector.connect(name, tcp).await?;
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
        let window = options.incoming_window.max(1);
        // QoS 1 deliveries waiting here are at most `window` (each is unacknowledged); QoS 0
        // ones use the other half. So handing over never waits.
        let (in_tx, in_rx) = mpsc::channel(window.saturating_mul(2));
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let alive = Arc::new(AtomicBool::new(true));
        let driver = Driver {
            rx,
            incoming: in_tx,
            incoming_window: window,
            unacked: HashMap::new(),
            next_delivery: 0,
            ack_tx,
            ack_rx,
            pending_pub: HashMap::new(),
            pending_sub: HashMap::new(),
            next_id: 1,
            keep_alive: options.keep_alive,
            max_packet: options.max_packet,
            alive: alive.clone(),
        };
        tokio::spawn(driver.run(stream, buf));
        let capacity = options.in_flight.max(1);
        Ok((
            MqttClient {
                tx,
                window: Arc::new(Semaphore::new(capacity)),
                capacity,
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

    /// Resolves once the connection has ended (for whatever reason).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// How many QoS 1 publishes are waiting for their PUBACK now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.window.available_permits()
    }

    /// Publishes; for QoS 1 returns once the broker's PUBACK arrived.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), MqttError> {
        self.send_publish(topic, payload, qos, retain)
            .await?
            .acked()
            .await
    }

    /// Hands a publish to the connection and returns without waiting for its PUBACK, so a
    /// caller can pipeline several in order (they are written in call order). Waits first
    /// while the in-flight window is full.
    pub async fn send_publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<PendingAck, MqttError> {
        let topic = TopicName::new(topic).map_err(MqttError::Unsendable)?;
        let permit = self
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| MqttError::Closed)?;
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
            .send(Request::Publish(publish, done, permit))
            .await
            .map_err(|_| MqttError::Closed)?;
        Ok(PendingAck(wait))
    }

    /// Subscribes and returns the granted QoS per filter (`None`: refused by the broker).
    pub async fn subscribe(&self, filters: &[(&str, QoS)]) -> Result<Vec<Option<QoS>>, MqttError> {
        let filters = filters
            .iter()
            .map(|(f, q)| Ok((TopicFilter::new(*f)?, *q)))
            .collect::<Result<Vec<_>, PacketError>>()
            .map_err(MqttError::Unsendable)?;
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

/// An incoming QoS 1 publish to acknowledge: its packet id and which delivery it was (a
/// packet id is reused once acknowledged, so a late second `ack` must not acknowledge a newer
/// publish).
type AckRequest = (u16, u64);

struct Driver {
    rx: mpsc::Receiver<Request>,
    incoming: mpsc::Sender<ReceivedOrder>,
    incoming_window: usize,
    /// Incoming QoS 1 packet ids handed over and not yet acknowledged → their delivery number.
    unacked: HashMap<u16, u64>,
    next_delivery: u64,
    ack_tx: mpsc::UnboundedSender<AckRequest>,
    ack_rx: mpsc::UnboundedReceiver<AckRequest>,
    pending_pub: HashMap<u16, (PubDone, OwnedSemaphorePermit)>,
    pending_sub: HashMap<u16, (SubDone, usize)>,
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

    /// Turns a request into bytes to write, or answers it at once when it cannot be sent.
    fn prepare(&mut self, req: Request, out: &mut Vec<u8>) {
        match req {
            Request::Publish(mut p, done, permit) => {
                let id = (p.qos == QoS::AtLeastOnce).then(|| self.packet_id());
                p.packet_id = id;
                if let Err(e) = Packet::Publish(p).encode(out, self.max_packet) {
                    let _ = done.send(Err(MqttError::Unsendable(e)));
                    return;
                }
                match id {
                    Some(id) => {
                        self.pending_pub.insert(id, (done, permit));
                    }
                    None => {
                        let _ = done.send(Ok(()));
                    }
                }
            }
            Request::Subscribe(filters, done) => {
                let id = self.packet_id();
                let n = filters.len();
                if let Err(e) = Packet::Subscribe(id, filters).encode(out, self.max_packet) {
                    let _ = done.send(Err(MqttError::Unsendable(e)));
                    return;
                }
                self.pending_sub.insert(id, (done, n));
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
        let mut out = Vec::new();
        let result: Result<(), MqttError> = async {
            loop {
                // Everything already buffered first.
                loop {
                    match Packet::decode(&buf, self.max_packet) {
                        Ok((packet, used)) => {
                            buf.drain(..used);
                            if let Some(reply) = self.handle(packet)? {
                                out.clear();
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
                            // Acknowledgements asked for before the client went away first.
                            out.clear();
                            while let Ok(ack) = self.ack_rx.try_recv() {
                                self.acknowledge(ack, &mut out)?;
                            }
                            out.extend_from_slice(&[0xE0, 0]); // DISCONNECT
                            let _ = wr.write_all(&out).await;
                            return Ok(());
                        };
                        out.clear();
                        self.prepare(req, &mut out);
                        // Whatever else is queued goes out in the same write.
                        while let Ok(req) = self.rx.try_recv() {
                            self.prepare(req, &mut out);
                        }
                        if !out.is_empty() {
                            wr.write_all(&out).await?;
                            last_sent = Instant::now();
                        }
                    }
                    Some(ack) = self.ack_rx.recv() => {
                        out.clear();
                        self.acknowledge(ack, &mut out)?;
                        while let Ok(ack) = self.ack_rx.try_recv() {
                            self.acknowledge(ack, &mut out)?;
                        }
                        if !out.is_empty() {
                            wr.write_all(&out).await?;
                            last_sent = Instant::now();
                        }
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
        for (_, (done, _)) in self.pending_pub.drain() {
            let _ = done.send(Err(MqttError::Closed));
        }
        for (_, (done, _)) in self.pending_sub.drain() {
            let _ = done.send(Err(MqttError::Closed));
        }
    }

    /// Appends the PUBACK the receiver asked for, unless it is stale (already sent).
    fn acknowledge(
        &mut self,
        (id, delivery): AckRequest,
        out: &mut Vec<u8>,
    ) -> Result<(), MqttError> {
        if self.unacked.get(&id) == Some(&delivery) {
            self.unacked.remove(&id);
            Packet::PubAck(id).encode(out, self.max_packet)?;
        }
        Ok(())
    }

    /// Hands an incoming publish to the receiver without waiting; a QoS 1 one is
    /// acknowledged when the receiver says so.
    fn deliver(&mut self, p: Publish) -> Result<(), MqttError> {
        let message = InboundMessage {
            topic: p.topic.as_str().to_owned(),
            payload: p.payload,
        };
        let order = match p.packet_id {
            None => {
                // QoS 0: at most once. Dropped rather than held when the receiver is far
                // behind, so that QoS 1 deliveries always find room.
                if self.incoming.capacity() <= self.incoming_window {
                    tracing::warn!(topic = %message.topic, "QoS 0 publish dropped: the receiver is behind");
                    return Ok(());
                }
                ReceivedOrder::new(message, p.dup, || {})
            }
            Some(id) => {
                if self.unacked.contains_key(&id) {
                    // The broker may not resend within a connection (MQTT 3.1.1 4.4); the
                    // first delivery stands and its `ack` answers both.
                    tracing::debug!(id, "duplicate of an unacknowledged publish ignored");
                    return Ok(());
                }
                if self.unacked.len() >= self.incoming_window {
                    return Err(MqttError::Protocol(PacketError::Malformed(
                        "more unacknowledged incoming publishes than the incoming window",
                    )));
                }
                let delivery = self.next_delivery;
                self.next_delivery += 1;
                self.unacked.insert(id, delivery);
                let acks = self.ack_tx.clone();
                ReceivedOrder::new(message, p.dup, move || {
                    // Fails only once the connection has ended: nothing to acknowledge then.
                    let _ = acks.send((id, delivery));
                })
            }
        };
        match self.incoming.try_send(order) {
            Ok(()) => Ok(()),
            // Nobody reads incoming publishes: they stay unacknowledged.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(MqttError::Protocol(
                PacketError::Malformed("incoming publishes beyond the receiver's room"),
            )),
        }
    }

    /// Handles one incoming packet; returns a packet to send back, if any.
    fn handle(&mut self, packet: Packet) -> Result<Option<Packet>, MqttError> {
        match packet {
            Packet::PubAck(id) => {
                // The permit is dropped with the entry: a place in the window opens.
                if let Some((done, _permit)) = self.pending_pub.remove(&id) {
                    let _ = done.send(Ok(()));
                }
                Ok(None)
            }
            Packet::SubAck(id, codes) => {
                if let Some((done, n)) = self.pending_sub.remove(&id) {
                    if codes.len() != n {
                        let e =
                            PacketError::Malformed("SUBACK code count differs from the SUBSCRIBE");
                        let _ = done.send(Err(MqttError::Protocol(e.clone())));
                        return Err(MqttError::Protocol(e));
                    }
                    let _ = done.send(Ok(codes));
                }
                Ok(None)
            }
            Packet::Publish(p) => {
                self.deliver(p)?;
                Ok(None)
            }
            Packet::PingResp | Packet::UnsubAck(_) => Ok(None),
            // A broker never sends these to a client.
            Packet::Connect(_)
            | Packet::ConnAck { .. }
            | Packet::Subscribe(..)
            | Packet::Unsubscribe(..)
            | Packet::PingReq
            | Packet::Disconnect => Err(MqttError::Protocol(PacketError::Malformed(
                "a packet only a client sends",
            ))),
        }
    }
}
