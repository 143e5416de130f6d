//! The running server: the data directory's CA and certificates, the store, the embedded
//! MQTT/TLS ingest endpoint, order dispatch, revocation, and the HTTPS enrollment endpoint,
//! wired together. [`Server::start`] runs it in-process (tests start several on random
//! ports); the binary's `serve` command is a thin wrapper.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use epmc_proto::bounded::Timestamp;
use epmc_proto::topic::AgentId;
use epmc_proto::{Envelope, Message};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::ca::{self, CertSerial, CertificateAuthority, RevokedCert};
use crate::datadir::{self, DataDirError};
use crate::ingest::{
    Endpoint, Inbound, IngestConfig, IngestSink, Outcome, SecurityEvent, SinkError,
};
use crate::store::{IngestItem, IngestOutcome, Store, StoreError, StoreOptions};

mod enroll;
mod update;

pub use enroll::{EnrollRequest, EnrollResponse};

/// What [`Server::start`] needs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeConfig {
    /// The data directory made by `init` (CA, server certificate, SQLite database).
    pub data_dir: PathBuf,
    /// Where agents connect (MQTT over TLS).
    pub mqtt: SocketAddr,
    /// Where the HTTPS enrollment endpoint listens.
    pub https: SocketAddr,
    /// A database URL (`postgres://…` or `sqlite://…`); the data directory's SQLite file when
    /// `None`.
    pub database: Option<String>,
    /// Limits of the ingest endpoint.
    pub ingest: IngestConfig,
    /// How often queued orders and revocations are looked for (also woken at once when an
    /// order is created through [`Server::notify_orders`]).
    pub poll: Duration,
}

impl ServeConfig {
    /// Defaults: MQTT on 127.0.0.1:8883, HTTPS on 127.0.0.1:8443, the SQLite file, a 1 s poll.
    pub fn new(data_dir: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            data_dir: data_dir.into(),
            mqtt: SocketAddr::from(([127, 0, 0, 1], 8883)),
            https: SocketAddr::from(([127, 0, 0, 1], 8443)),
            database: None,
            ingest: IngestConfig::default(),
            poll: Duration::from_secs(1),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The data directory is missing a file, or a file is unsafe or inconsistent.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The CA or a certificate could not be used.
    #[error("certificates: {0}")]
    Pki(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running server. See the [module docs](self).
pub struct Server {
    store: Store,
    endpoint: Endpoint,
    mqtt_addr: SocketAddr,
    https_addr: SocketAddr,
    https: axum_server::Handle<SocketAddr>,
    orders_wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("mqtt", &self.mqtt_addr)
            .field("https", &self.https_addr)
            .finish()
    }
}

/// The agents' side of the store: commits batches, records presence and security events.
struct StoreSink {
    store: Store,
}

#[async_trait::async_trait]
impl IngestSink for StoreSink {
    async fn commit(&self, batch: Vec<Inbound>) -> Result<Vec<Outcome>, SinkError> {
        let items: Vec<IngestItem> = batch
            .into_iter()
            .map(|m| IngestItem {
                agent: m.agent,
                channel: m.channel,
                payload: m.payload,
            })
            .collect();
        let outcomes = self
            .store
            .ingest()
            .ingest_batch(&items)
            .await
            .map_err(|e| SinkError(e.to_string()))?;
        Ok(outcomes
            .into_iter()
            .map(|o| match o {
                IngestOutcome::Stored => Outcome::Stored,
                IngestOutcome::Duplicate => Outcome::Duplicate,
                IngestOutcome::Rejected(reason) => Outcome::Rejected(reason.to_string()),
            })
            .collect())
    }

    async fn agent_state(&self, agent: AgentId, online: bool) {
        let ingest = self.store.ingest();
        let now = Timestamp::now();
        let result = if online {
            ingest.set_online(agent, now).await
        } else {
            ingest.set_offline(agent, now).await
        };
        if let Err(e) = result {
            tracing::warn!(%agent, online, error = %e, "could not record agent state");
        }
    }

    async fn security_event(&self, event: SecurityEvent) {
        let (kind, agent, peer, detail) = describe(&event);
        tracing::warn!(kind, ?agent, %peer, detail, "security event");
        if let Err(e) = self
            .store
            .ingest()
            .record_security_event(kind, agent, Some(&peer.to_string()), &detail)
            .await
        {
            tracing::error!(error = %e, kind, "could not record a security event");
        }
    }
}

fn describe(event: &SecurityEvent) -> (&'static str, Option<AgentId>, SocketAddr, String) {
    match event {
        SecurityEvent::BadIdentity { peer, detail } => {
            ("bad_identity", None, *peer, detail.clone())
        }
        SecurityEvent::ClientIdMismatch {
            agent,
            client_id,
            peer,
        } => (
            "client_id_mismatch",
            Some(*agent),
            *peer,
            format!("client id {client_id:?}"),
        ),
        SecurityEvent::PublishOutsidePrefix { agent, topic, peer } => (
            "publish_outside_prefix",
            Some(*agent),
            *peer,
            format!("topic {topic:?}"),
        ),
        SecurityEvent::SubscribeOutsideOrders {
            agent,
            filter,
            peer,
        } => (
            "subscribe_outside_orders",
            Some(*agent),
            *peer,
            format!("filter {filter:?}"),
        ),
        SecurityEvent::MalformedPacket {
            agent,
            peer,
            detail,
        } => ("malformed_packet", *agent, *peer, detail.clone()),
        SecurityEvent::PacketTooLarge {
            agent,
            peer,
            size,
            max,
        } => (
            "packet_too_large",
            *agent,
            *peer,
            format!("{size} bytes, at most {max}"),
        ),
        SecurityEvent::Kicked { agent, peer } => {
            ("kicked", Some(*agent), *peer, "connection closed".into())
        }
        SecurityEvent::ConnectionLimit { peer } => {
            ("connection_limit", None, *peer, "refused".into())
        }
        SecurityEvent::ConnectDeadline { agent, peer } => (
            "connect_deadline",
            *agent,
            *peer,
            "no CONNECT in time".into(),
        ),
    }
}

/// The certificates and keys the listeners use, from the data directory.
struct Pki {
    ca: CertificateAuthority,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_pem: String,
}

impl Pki {
    fn key(&self) -> Result<PrivateKeyDer<'static>, ServeError> {
        PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .map_err(|e| ServeError::Pki(format!("server.key: {e}")))
    }

    fn crl(&self, revoked: &[String]) -> Result<CertificateRevocationListDer<'static>, ServeError> {
        let now = OffsetDateTime::now_utc();
        let revoked: Vec<RevokedCert> = revoked
            .iter()
            .filter_map(|s| match s.parse::<CertSerial>() {
                Ok(serial) => Some(serial),
                Err(e) => {
                    tracing::error!(error = %e, "a revoked serial in the database is unreadable");
                    None
                }
            })
            .map(|serial| RevokedCert {
                serial,
                revoked_at: now,
            })
            .collect();
        self.ca
            .crl(&revoked, now)
            .map_err(|e| ServeError::Pki(format!("CRL: {e}")))
    }

    fn mqtt_config(&self, revoked: &[String]) -> Result<Arc<rustls::ServerConfig>, ServeError> {
        ca::mqtt_server_config(
            self.ca.cert_der(),
            self.crl(revoked)?,
            self.server_chain.clone(),
            self.key()?,
        )
        .map_err(|e| ServeError::Pki(format!("MQTT TLS: {e}")))
    }
}

impl Server {
    /// Loads the data directory, opens (and migrates) the database, and starts every
    /// listener and background task.
    pub async fn start(config: ServeConfig) -> Result<Server, ServeError> {
        ca::install_crypto_provider();
        let loaded = datadir::load(&config.data_dir)?;
        let server_cert = CertificateDer::from_pem_slice(loaded.server.cert_pem.as_bytes())
            .map_err(|e| ServeError::Pki(format!("server.crt: {e}")))?;
        let pki = Arc::new(Pki {
            server_chain: vec![server_cert, loaded.ca.cert_der().clone()],
            server_key_pem: loaded.server.key_pem.clone(),
            ca: loaded.ca,
        });
        let store = match &config.database {
            Some(url) => Store::open(url).await?,
            None => Store::open_data_dir(&config.data_dir, StoreOptions::default()).await?,
        };
        let revoked = store.admin().revoked_serials().await?;
        let tls = pki.mqtt_config(&revoked)?;
        let sink = Arc::new(StoreSink {
            store: store.clone(),
        });
        let endpoint = Endpoint::bind(
            config.mqtt,
            tls,
            crate::ingest::agent_id_from_cn,
            sink,
            config.ingest.clone(),
        )
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.mqtt,
            source,
        })?;
        let mqtt_addr = endpoint.local_addr();
        let (stop, stop_rx) = watch::channel(false);
        let orders_wake = Arc::new(Notify::new());
        let tasks = vec![
            tokio::spawn(dispatch_orders(
                store.clone(),
                endpoint.clone(),
                orders_wake.clone(),
                config.poll,
                stop_rx.clone(),
            )),
            tokio::spawn(watch_revocations(
                store.clone(),
                endpoint.clone(),
                pki.clone(),
                revoked,
                config.poll,
                stop_rx.clone(),
            )),
        ];
        let updates = update::routes(config.data_dir.join(crate::release::RELEASES_DIR));
        let (https, https_addr) = enroll::serve(
            config.https,
            pki.clone(),
            store.clone(),
            mqtt_addr.port(),
            updates,
        )
        .await?;
        tracing::info!(%mqtt_addr, %https_addr, backend = ?store.backend(), "server started");
        Ok(Server {
            store,
            endpoint,
            mqtt_addr,
            https_addr,
            https,
            orders_wake,
            stop,
            tasks,
        })
    }

    /// Where agents connect.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Where the HTTPS enrollment endpoint listens.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The store (for the operator's commands and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The ingest endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Looks for queued orders now instead of at the next poll.
    pub fn notify_orders(&self) {
        self.orders_wake.notify_one();
    }

    /// Stops: no new connections, in-flight commits finish and are acknowledged, then
    /// connections close, background tasks end and the database closes.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.https.graceful_shutdown(Some(Duration::from_secs(5)));
        self.endpoint.shutdown().await;
        for task in self.tasks {
            let _ = task.await;
        }
        self.store.close().await;
        tracing::info!("server stopped");
    }
}

/// Sends queued orders to connected agents, marks them delivered on the agent's PUBACK, and
/// expires overdue ones.
async fn dispatch_orders(
    store: Store,
    endpoint: Endpoint,
    wake: Arc<Notify>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight: Arc<Mutex<HashSet<uuid::Uuid>>> = Arc::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = wake.notified() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let orders = store.orders();
        let now = Timestamp::now();
        match orders.expire_overdue(now).await {
            Ok((0, 0)) => {}
            Ok((expired, timed_out)) => tracing::info!(expired, timed_out, "orders expired"),
            Err(e) => tracing::warn!(error = %e, "expiring orders failed"),
        }
        let agents = match store.admin().agents(None).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "listing agents failed");
                continue;
            }
        };
        for agent in agents.into_iter().filter(|a| endpoint.is_connected(&a.id)) {
            let queued = match orders.queued_for_agent(agent.id, now).await {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, agent = %agent.id, "reading queued orders failed");
                    continue;
                }
            };
            for order in queued {
                if in_flight
                    .lock()
                    .map(|s| s.contains(&order.id))
                    .unwrap_or(true)
                {
                    continue;
                }
                let payload = match order.to_message().map_err(|e| e.to_string()).and_then(|o| {
                    Envelope::new(Message::Order(o))
                        .to_json()
                        .map_err(|e| e.to_string())
                }) {
                    Ok(p) => Bytes::from(p),
                    Err(e) => {
                        tracing::error!(order = %order.id, error = %e, "order cannot be encoded");
                        let _ = orders.mark_failed(order.id, None).await;
                        continue;
                    }
                };
                let ack = match endpoint.send_order(&agent.id, payload) {
                    Ok(ack) => ack,
                    // Not connected any more, or its window of unacknowledged orders is
                    // full: the order stays queued for the next round.
                    Err(_) => break,
                };
                if let Ok(mut s) = in_flight.lock() {
                    s.insert(order.id);
                }
                let orders = orders.clone();
                let in_flight = in_flight.clone();
                tokio::spawn(async move {
                    if ack.await.is_ok()
                        && let Err(e) = orders.mark_delivered(order.id).await
                    {
                        tracing::warn!(order = %order.id, error = %e, "marking delivered failed");
                    }
                    if let Ok(mut s) = in_flight.lock() {
                        s.remove(&order.id);
                    }
                });
            }
        }
    }
}

/// Rebuilds the MQTT listener's CRL when the store's revocations change, and closes the
/// connections of revoked agents.
async fn watch_revocations(
    store: Store,
    endpoint: Endpoint,
    pki: Arc<Pki>,
    mut known: Vec<String>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let revoked = match store.admin().revoked_serials().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading revocations failed");
                continue;
            }
        };
        if revoked == known {
            continue;
        }
        match pki.mqtt_config(&revoked) {
            Ok(tls) => endpoint.set_tls(tls),
            Err(e) => {
                tracing::error!(error = %e, "cannot rebuild the TLS configuration with the new CRL");
                continue;
            }
        }
        let newly: HashSet<&String> = revoked.iter().filter(|s| !known.contains(s)).collect();
        if let Ok(agents) = store.admin().agents(None).await {
            for agent in agents {
                if agent
                    .cert_serial
                    .as_ref()
                    .is_some_and(|s| newly.contains(s))
                    && endpoint.kick(&agent.id)
                {
                    tracing::warn!(agent = %agent.id, "revoked agent disconnected");
                }
            }
        }
        tracing::info!(
            revoked = revoked.len(),
            "certificate revocation list updated"
        );
        known = revoked;
    }
}
