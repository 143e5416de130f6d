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
//! - Optionally through an HTTP proxy ([`HttpProxy`], [`MqttOptions::proxy`]): the client
//!   opens TCP to the proxy, asks it to `CONNECT` to the server (with Basic credentials when
//!   given), checks for a 2xx answer (headers bounded by [`MAX_PROXY_HEADER`], within the
//!   connect timeout), then does TLS end to end through the tunnel; the proxy sees only
//!   ciphertext.
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
    /// Published by an [`crate::session::MqttSession`] after each connection is up and
    /// subscribed, before the session reports it connected: e.g. a retained `online` on the
    /// agent's state topic, which the broker replaces with the last will's `offline` when the
    /// connection dies. A plain [`MqttClient::connect`] does not send it.
    pub birth: Option<Will>,
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
    /// TCP + TLS + CONNACK must complete within this (and the proxy's answer, with a proxy).
    pub connect_timeout: Duration,
    /// An HTTP proxy to tunnel through (`CONNECT`), or `None` to connect directly. Through a
    /// proxy the client asks it to connect to [`MqttOptions::server_name`] at the port of
    /// [`MqttOptions::addr`]; the proxy resolves the name, so `addr`'s IP is not used (see
    /// [`MqttOptions::via_proxy`]).
    pub proxy: Option<HttpProxy>,
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
            birth: None,
            in_flight: 32,
            incoming_window: 1000,
            max_packet: DEFAULT_MAX_PACKET,
            connect_timeout: Duration::from_secs(10),
            proxy: None,
        }
    }

    /// Options for a connection through `proxy` to `server_name:port`, with the defaults of
    /// [`MqttOptions::new`]. The proxy resolves `server_name`, so the agent needs no DNS
    /// answer for it (behind a proxy there is often none); [`MqttOptions::addr`] is set to
    /// the unspecified address with that port and only its port is used.
    pub fn via_proxy(proxy: HttpProxy, server_name: &str, port: u16, client_id: &str) -> Self {
        let mut options = MqttOptions::new(
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
            server_name,
            client_id,
        );
        options.proxy = Some(proxy);
        options
    }

    /// What the proxy is asked to connect to: `server_name:port` (an IPv6 address in
    /// brackets).
    pub fn tunnel_target(&self) -> String {
        authority(&self.server_name, self.addr.port())
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Largest proxy answer header read (status line and headers together).
pub const MAX_PROXY_HEADER: usize = 8 * 1024;

/// Basic credentials for an HTTP proxy. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyCredentials {
    username: String,
    password: String,
}

impl std::fmt::Debug for ProxyCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCredentials")
            .field("username", &self.username)
            .field("password", &"[hidden]")
            .finish()
    }
}

/// Why proxy credentials were refused before use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// The user name is empty.
    #[error("the proxy user name is empty")]
    EmptyUsername,
    /// The user name contains `:` (Basic authentication separates it from the password with
    /// one).
    #[error("the proxy user name may not contain ':'")]
    ColonInUsername,
    /// A control character in the user name or password.
    #[error("the proxy {0} contains a control character")]
    ControlCharacter(&'static str),
    /// Longer than [`ProxyCredentials::MAX_LEN`] bytes.
    #[error("the proxy {0} is longer than {max} bytes", max = ProxyCredentials::MAX_LEN)]
    TooLong(&'static str),
}

impl ProxyCredentials {
    /// Longest user name or password accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Checks and wraps a user name and password for Basic authentication.
    pub fn new(username: &str, password: &str) -> Result<Self, CredentialsError> {
        if username.is_empty() {
            return Err(CredentialsError::EmptyUsername);
        }
        if username.contains(':') {
            return Err(CredentialsError::ColonInUsername);
        }
        for (what, v) in [("user name", username), ("password", password)] {
            if v.len() > Self::MAX_LEN {
                return Err(CredentialsError::TooLong(what));
            }
            if v.chars().any(char::is_control) {
                return Err(CredentialsError::ControlCharacter(what));
            }
        }
        Ok(ProxyCredentials {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The `Proxy-Authorization` header value: `Basic base64(user:password)`.
    fn header_value(&self) -> String {
        format!(
            "Basic {}",
            base64(format!("{}:{}", self.username, self.password).as_bytes())
        )
    }
}

/// Standard base64 with padding (RFC 4648 section 4), for the Basic credentials.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An HTTP proxy that connections tunnel through with `CONNECT` (RFC 9110 section 9.3.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProxy {
    /// The proxy's host name or address.
    pub host: String,
    /// The proxy's port.
    pub port: u16,
    /// Basic credentials, sent with the `CONNECT` when present.
    pub credentials: Option<ProxyCredentials>,
}

/// Why a tunnel through an HTTP proxy could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The proxy could not be reached (TCP).
    #[error("cannot reach the HTTP proxy {proxy}: {source}")]
    Unreachable {
        /// `host:port` of the proxy.
        proxy: String,
        /// Why.
        source: std::io::Error,
    },
    /// The proxy wants credentials (407) and none were configured.
    #[error(
        "the HTTP proxy {proxy} requires authentication (407 {reason}); configure a user name and password for it"
    )]
    AuthenticationRequired {
        /// `host:port` of the proxy.
        proxy: String,
        /// The reason phrase it gave.
        reason: String,
    },
    /// The proxy refused the configured credentials (407).
    #[error("the HTTP proxy {proxy} refused the credentials of user {username:?} (407 {reason})")]
    CredentialsRefused {
        /// `host:port` of the proxy.
        proxy: String,
        /// The user name sent.
        username: String,
        /// The reason phrase it gave.
        reason: String,
    },
    /// The proxy answered with another non-2xx status (403: not allowed to go there, 502:
    /// could not reach the server, ...).
    #[error("the HTTP proxy {proxy} refused to connect to {target}: {status} {reason}")]
    Refused {
        /// `host:port` of the proxy.
        proxy: String,
        /// What it was asked to connect to.
        target: String,
        /// The status code.
        status: u16,
        /// The reason phrase.
        reason: String,
    },
    /// The answer is not HTTP.
    #[error("the HTTP proxy {proxy} did not answer with HTTP: {detail}")]
    Garbage {
        /// `host:port` of the proxy.
        proxy: String,
        /// What was wrong.
        detail: String,
    },
    /// The answer's header exceeded [`MAX_PROXY_HEADER`].
    #[error("the HTTP proxy {proxy} sent a header longer than {MAX_PROXY_HEADER} bytes")]
    HeaderTooLarge {
        /// `host:port` of the proxy.
        proxy: String,
    },
    /// The proxy closed the connection before answering completely.
    #[error("the HTTP proxy {proxy} closed the connection before answering the CONNECT")]
    Closed {
        /// `host:port` of the proxy.
        proxy: String,
    },
    /// No complete answer within the timeout.
    #[error("the HTTP proxy {proxy} did not answer the CONNECT within {timeout:?}")]
    TimedOut {
        /// `host:port` of the proxy.
        proxy: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Reading or writing failed after the connection was open.
    #[error("talking to the HTTP proxy {proxy}: {source}")]
    Io {
        /// `host:port` of the proxy.
        proxy: String,
        /// Why.
        source: std::io::Error,
    },
}

impl HttpProxy {
    /// A proxy without credentials.
    pub fn new(host: &str, port: u16) -> Self {
        HttpProxy {
            host: host.to_owned(),
            port,
            credentials: None,
        }
    }

    /// Sets the credentials.
    pub fn with_credentials(mut self, credentials: Option<ProxyCredentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// `host:port` of the proxy.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }

    /// Opens a tunnel to `target` (`host:port`): TCP to the proxy, `CONNECT target`, a 2xx
    /// answer; all within `timeout`. The stream returned carries the caller's bytes to
    /// `target` and back.
    pub async fn connect(&self, target: &str, timeout: Duration) -> Result<TcpStream, ProxyError> {
        tokio::time::timeout(timeout, self.connect_inner(target))
            .await
            .map_err(|_| ProxyError::TimedOut {
                proxy: self.authority(),
                timeout,
            })?
    }

    async fn connect_inner(&self, target: &str) -> Result<TcpStream, ProxyError> {
        let proxy = self.authority();
        let io = |source| ProxyError::Io {
            proxy: proxy.clone(),
            source,
        };
        if target.is_empty() || target.chars().any(|c| c.is_control() || c == ' ') {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{target:?} is not a host:port to CONNECT to"),
            )));
        }
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ProxyError::Unreachable {
                proxy: proxy.clone(),
                source,
            })?;
        stream.set_nodelay(true).map_err(io)?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = &self.credentials {
            request.push_str("Proxy-Authorization: ");
            request.push_str(&c.header_value());
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        // Read up to the end of the header. TLS speaks first from our side, so a proxy that
        // followed the protocol has sent nothing after its header yet.
        let mut header = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        let end = loop {
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err(ProxyError::Closed { proxy });
            }
            let from = header.len().saturating_sub(3);
            header.extend_from_slice(&chunk[..n]);
            if let Some(i) = header[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                break from + i + 4;
            }
            if header.len() > MAX_PROXY_HEADER {
                return Err(ProxyError::HeaderTooLarge { proxy });
            }
            if !header.starts_with(&b"HTTP/"[..header.len().min(5)]) {
                return Err(ProxyError::Garbage {
                    proxy,
                    detail: "the answer does not start with HTTP/".into(),
                });
            }
        };
        if end > MAX_PROXY_HEADER {
            return Err(ProxyError::HeaderTooLarge { proxy });
        }
        let (status, reason) =
            parse_status_line(&header[..end]).map_err(|detail| ProxyError::Garbage {
                proxy: proxy.clone(),
                detail,
            })?;
        match status {
            200..=299 if end == header.len() => Ok(stream),
            200..=299 => Err(ProxyError::Garbage {
                proxy,
                detail: format!(
                    "{} bytes after the {status} answer, before the TLS handshake",
                    header.len() - end
                ),
            }),
            407 => Err(match &self.credentials {
                None => ProxyError::AuthenticationRequired { proxy, reason },
                Some(c) => ProxyError::CredentialsRefused {
                    proxy,
                    username: c.username.clone(),
                    reason,
                },
            }),
            status => Err(ProxyError::Refused {
                proxy,
                target: target.to_owned(),
                status,
                reason,
            }),
        }
    }
}

/// `HTTP/1.x NNN reason` from the first line of `header`: the status code and the reason
/// phrase (sanitised, at most 100 characters).
fn parse_status_line(header: &[u8]) -> Result<(u16, String), String> {
    let line_end = header
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(header.len());
    let line = std::str::from_utf8(&header[..line_end])
        .map_err(|_| "the status line is not text".to_owned())?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(format!(
            "the status line {:?} is not HTTP/1.x",
            truncate(line)
        ));
    }
    let code = parts.next().unwrap_or("");
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|c| code.len() == 3 && (100..=599).contains(c))
        .ok_or_else(|| format!("the status line {:?} has no status code", truncate(line)))?;
    let reason = parts.next().unwrap_or("").trim();
    Ok((status, truncate(reason)))
}

fn truncate(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
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
    /// The HTTP proxy could not open a tunnel to the server.
    #[error("{0}")]
    Proxy(#[from] ProxyError),
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
    /// Connects: TCP (or a tunnel through [`MqttOptions::proxy`]), TLS (pinned CA, name
    /// check, client certificate), CONNECT, CONNACK.
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
        let tcp = match &options.proxy {
            None => TcpStream::connect(options.addr).await?,
            Some(proxy) => {
                proxy
                    .connect(&options.tunnel_target(), options.connect_timeout)
                    .await?
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_answers() {
        // RFC 4648 section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        // RFC 7617 section 2.
        let c = ProxyCredentials::new("Aladdin", "open sesame").unwrap();
        assert_eq!(c.header_value(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(!format!("{c:?}").contains("sesame"));
    }

    #[test]
    fn credentials_are_checked() {
        assert_eq!(
            ProxyCredentials::new("", "x"),
            Err(CredentialsError::EmptyUsername)
        );
        assert_eq!(
            ProxyCredentials::new("a:b", "x"),
            Err(CredentialsError::ColonInUsername)
        );
        assert_eq!(
            ProxyCredentials::new("a", "x\r\nHost: evil"),
            Err(CredentialsError::ControlCharacter("password"))
        );
        assert_eq!(
            ProxyCredentials::new(&"u".repeat(257), "x"),
            Err(CredentialsError::TooLong("user name"))
        );
        assert!(ProxyCredentials::new("user", "p:a:s").is_ok());
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok((200, "Connection established".into()))
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 407\r\n\r\n"),
            Ok((407, String::new()))
        );
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 20 OK\r\n\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
    }

    #[test]
    fn tunnel_targets_bracket_ipv6() {
        let o = MqttOptions::new("127.0.0.1:8883".parse().unwrap(), "epmc.example", "a");
        assert_eq!(o.tunnel_target(), "epmc.example:8883");
        let o = MqttOptions::via_proxy(HttpProxy::new("proxy", 3128), "::1", 443, "a");
        assert_eq!(o.tunnel_target(), "[::1]:443");
        assert_eq!(
            o.proxy.as_ref().map(HttpProxy::authority).as_deref(),
            Some("proxy:3128")
        );
    }
}
