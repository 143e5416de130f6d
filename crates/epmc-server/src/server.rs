//! The running server: the data directory's CA and certificates, the store, the embedded
//! MQTT/TLS ingest endpoint (or, in scale mode, a consumer of an external broker, see
//! [`crate::broker`]), order dispatch, revocation, retention, and the HTTPS enrollment
//! endpoint, wired together. [`Server::start`] runs it in-process (tests start several on
//! random ports); the binary's `serve` command is a thin wrapper.

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

use crate::broker::{self, BrokerConfig, BrokerLink};
use crate::ca::{self, CertSerial, CertificateAuthority, RevokedCert};
use crate::datadir::{self, DataDirError};
use crate::ingest::{
    Endpoint, Inbound, IngestConfig, IngestSink, Outcome, Prepared, SecurityEvent, SinkError,
    stated_presence,
};
use crate::store::{
    DispatchLease, IngestItem, IngestOutcome, PreparedBatch, QueuedAgent, Store, StoreError,
    StoreOptions,
};

mod enroll;
mod security;
mod update;

pub use enroll::{EnrollRequest, EnrollResponse};
use security::SecurityLog;
pub use security::{SUPPRESSED, SecurityEventLimit};

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
    /// Scale mode: consume from this external broker instead of listening on `mqtt`.
    pub broker: Option<BrokerConfig>,
    /// History series, events, records of message ids and rejected messages older than this,
    /// and replicas' certificates expired for longer, are deleted (`None`: kept for ever).
    pub retention: Option<Duration>,
    /// How often retention is applied (and once at start).
    pub prune_every: Duration,
    /// How many security events are recorded one by one; the rest are counted.
    pub security_events: SecurityEventLimit,
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
            broker: None,
            retention: None,
            prune_every: Duration::from_secs(3600),
            security_events: SecurityEventLimit::default(),
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
    endpoint: Option<Endpoint>,
    broker: Option<BrokerLink>,
    mqtt_addr: Option<SocketAddr>,
    https_addr: SocketAddr,
    https: axum_server::Handle<SocketAddr>,
    orders_wake: Arc<Notify>,
    security: Arc<SecurityLog>,
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

/// A batch as [`StoreSink::prepare`] leaves it: the messages to store, decoded, and the
/// positions of the presence messages among all of them.
struct SinkBatch {
    data: PreparedBatch,
    presence: Vec<usize>,
}

/// The agents' side of the store: commits batches, records presence and security events.
/// The embedded endpoint and the broker consumer both write through it.
struct StoreSink {
    store: Store,
    security: Arc<SecurityLog>,
}

#[async_trait::async_trait]
impl IngestSink for StoreSink {
    async fn commit(&self, batch: Vec<Inbound>) -> Result<Vec<Outcome>, SinkError> {
        self.commit_prepared(self.prepare(batch)).await
    }

    /// Decodes the batch and computes what its statements bind, off the commit's path. An
    /// agent's `online`/`offline` on its `state` channel is presence, not data: the endpoint
    /// already records presence from the connection itself (and sends the last will only when
    /// the agent's current connection ends without DISCONNECT), so it is acknowledged and
    /// nothing more.
    fn prepare(&self, batch: Vec<Inbound>) -> Prepared {
        let len = batch.len();
        let mut presence = Vec::new();
        let items: Vec<IngestItem> = batch
            .into_iter()
            .enumerate()
            .filter_map(|(i, m)| {
                if stated_presence(m.channel, &m.payload).is_some() {
                    presence.push(i);
                    return None;
                }
                Some(IngestItem {
                    agent: m.agent,
                    channel: m.channel,
                    payload: m.payload,
                })
            })
            .collect();
        Prepared::new(
            len,
            SinkBatch {
                data: PreparedBatch::new(items),
                presence,
            },
        )
    }

    async fn commit_prepared(&self, batch: Prepared) -> Result<Vec<Outcome>, SinkError> {
        let len = batch.len();
        let SinkBatch { data, presence } = batch.take::<SinkBatch>()?;
        let stored = if data.is_empty() {
            Vec::new()
        } else {
            self.store
                .ingest()
                .ingest_prepared(&data)
                .await
                .map_err(|e| SinkError(e.to_string()))?
        };
        let mut stored = stored.into_iter().map(|o| match o {
            IngestOutcome::Stored => Outcome::Stored,
            IngestOutcome::Duplicate => Outcome::Duplicate,
            IngestOutcome::Rejected(reason) => Outcome::Rejected(reason.to_string()),
        });
        let mut presence = presence.into_iter().peekable();
        (0..len)
            .map(|i| {
                if presence.next_if_eq(&i).is_some() {
                    Ok(Outcome::Stored)
                } else {
                    stored
                        .next()
                        .ok_or_else(|| SinkError("the store returned too few outcomes".into()))
                }
            })
            .collect()
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

    /// One transaction for all of them: a burst of connections (a restart of many agents, a
    /// handshake storm) costs one sync per batch instead of two per connection.
    async fn agent_states(&self, changes: Vec<(AgentId, bool)>) {
        match self
            .store
            .ingest()
            .set_states(&changes, Timestamp::now())
            .await
        {
            Ok(unknown) => {
                for agent in unknown {
                    tracing::warn!(%agent, "could not record agent state: unknown agent");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, n = changes.len(), "recording agent states together failed; one by one");
                for (agent, online) in changes {
                    self.agent_state(agent, online).await;
                }
            }
        }
    }

    async fn security_event(&self, event: SecurityEvent) {
        let (kind, agent, peer, detail) = describe(&event);
        self.security
            .record(kind, agent, Some(&peer.to_string()), &detail)
            .await;
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
        SecurityEvent::TlsRefused {
            reason,
            agent,
            peer,
            detail,
        } => (reason.kind(), *agent, *peer, detail.clone()),
    }
}

/// The certificates and keys the listeners use, from the data directory.
struct Pki {
    ca: Arc<CertificateAuthority>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_pem: String,
}

impl Pki {
    fn key(&self) -> Result<PrivateKeyDer<'static>, ServeError> {
        PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .map_err(|e| ServeError::Pki(format!("server.key: {e}")))
    }

    fn crl(&self, revoked: &[String]) -> Result<CertificateRevocationListDer<'static>, ServeError> {
        self.ca
            .crl(&revoked_certs(revoked), OffsetDateTime::now_utc())
            .map_err(|e| ServeError::Pki(format!("CRL: {e}")))
    }

    /// Writes the revocation list for the broker (scale mode).
    fn write_crl(&self, revoked: &[String], path: &std::path::Path) -> Result<(), ServeError> {
        broker::write_crl(&self.ca, &revoked_certs(revoked), path).map_err(ServeError::Pki)
    }
}

/// The revoked serials as the CA lists them (an unreadable one is logged and left out).
fn revoked_certs(revoked: &[String]) -> Vec<RevokedCert> {
    let now = OffsetDateTime::now_utc();
    revoked
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
        .collect()
}

impl Pki {
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
    /// listener and background task. With [`ServeConfig::broker`] it listens for no agent:
    /// it consumes from the broker, publishes orders there and writes the CRL for it.
    pub async fn start(config: ServeConfig) -> Result<Server, ServeError> {
        ca::install_crypto_provider();
        let loaded = datadir::load(&config.data_dir)?;
        let server_cert = CertificateDer::from_pem_slice(loaded.server.cert_pem.as_bytes())
            .map_err(|e| ServeError::Pki(format!("server.crt: {e}")))?;
        let pki = Arc::new(Pki {
            server_chain: vec![server_cert, loaded.ca.cert_der().clone()],
            server_key_pem: loaded.server.key_pem.clone(),
            ca: Arc::new(loaded.ca),
        });
        let store = match &config.database {
            Some(url) => Store::open(url).await?,
            None => Store::open_data_dir(&config.data_dir, StoreOptions::default()).await?,
        };
        let revoked = store.admin().revoked_serials().await?;
        let security = Arc::new(SecurityLog::new(store.clone(), config.security_events));
        let sink = Arc::new(StoreSink {
            store: store.clone(),
            security: security.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let (outlet, endpoint, broker, mqtt_addr, agent_port) = match &config.broker {
            None => {
                let tls = pki.mqtt_config(&revoked)?;
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
                let addr = endpoint.local_addr();
                (
                    Outlet::Embedded(endpoint.clone()),
                    Some(endpoint),
                    None,
                    Some(addr),
                    addr.port(),
                )
            }
            Some(broker_config) => {
                // A client id the CA cannot issue a certificate for is refused now, not at
                // every connection attempt.
                pki.ca
                    .issue_service_client(
                        &broker_config.client_id,
                        time::Duration::minutes(1),
                        OffsetDateTime::now_utc(),
                    )
                    .map_err(|e| ServeError::Pki(format!("broker client id: {e}")))?;
                if let Some(path) = &broker_config.crl_file {
                    pki.write_crl(&revoked, path)?;
                }
                let (link, task) = broker::start(
                    broker_config.clone(),
                    pki.ca.clone(),
                    sink,
                    store.clone(),
                    stop_rx.clone(),
                );
                tasks.push(task);
                (
                    Outlet::Broker(link.clone()),
                    None,
                    Some(link),
                    None,
                    broker_config.port,
                )
            }
        };
        let orders_wake = Arc::new(Notify::new());
        tasks.push(tokio::spawn(dispatch_orders(
            store.clone(),
            outlet.clone(),
            orders_wake.clone(),
            config.poll,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(watch_revocations(
            store.clone(),
            outlet,
            config.broker.as_ref().and_then(|b| b.crl_file.clone()),
            pki.clone(),
            revoked,
            config.poll,
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn({
            let (security, stop) = (security.clone(), stop_rx.clone());
            async move { security.summarize_periodically(stop).await }
        }));
        if let Some(retention) = config.retention {
            tasks.push(tokio::spawn(prune_periodically(
                store.clone(),
                retention,
                config.prune_every,
                stop_rx.clone(),
            )));
        }
        let updates = update::routes(config.data_dir.join(crate::release::RELEASES_DIR));
        let (https, https_addr) = enroll::serve(
            config.https,
            pki.clone(),
            store.clone(),
            security.clone(),
            agent_port,
            updates,
        )
        .await?;
        tracing::info!(
            mqtt_addr = ?mqtt_addr,
            broker = ?config.broker.as_ref().map(|b| format!("{}:{}", b.host, b.port)),
            %https_addr,
            backend = ?store.backend(),
            "server started"
        );
        Ok(Server {
            store,
            endpoint,
            broker,
            mqtt_addr,
            https_addr,
            https,
            orders_wake,
            security,
            stop,
            tasks,
        })
    }

    /// Where agents connect to the embedded endpoint; `None` in scale mode.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
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

    /// The embedded ingest endpoint; `None` in scale mode.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.as_ref()
    }

    /// The broker consumer; `None` unless in scale mode.
    pub fn broker(&self) -> Option<&BrokerLink> {
        self.broker.as_ref()
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
        if let Some(endpoint) = &self.endpoint {
            endpoint.shutdown().await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
        // The counts of events over the rate, up to the last connection's.
        self.security.flush().await;
        self.store.close().await;
        tracing::info!("server stopped");
    }
}

/// Where orders leave: the embedded endpoint's connections, or the broker.
#[derive(Clone)]
enum Outlet {
    Embedded(Endpoint),
    Broker(BrokerLink),
}

type AckFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

impl Outlet {
    /// Whether an order for this agent can be handed over now: over the embedded endpoint,
    /// the agent must be connected; through the broker, the replica must be connected and the
    /// agent must have connected once (so the broker has its session to queue the order in;
    /// a publish to a topic nobody subscribes to is acknowledged and dropped).
    fn reachable(&self, queued: &QueuedAgent) -> bool {
        match self {
            Outlet::Embedded(e) => e.is_connected(&queued.agent),
            Outlet::Broker(b) => b.is_connected() && queued.ever_connected,
        }
    }

    /// Hands an order over; the future says whether the agent (embedded) or the broker
    /// acknowledged it. `None`: not now (not connected, or the window is full).
    async fn send(&self, agent: &AgentId, payload: Bytes) -> Option<AckFuture> {
        match self {
            Outlet::Embedded(e) => {
                let ack = e.send_order(agent, payload).ok()?;
                Some(Box::pin(async move { ack.await.is_ok() }))
            }
            Outlet::Broker(b) => match b.send_order(agent, payload).await {
                Ok(pending) => Some(Box::pin(async move { pending.acked().await.is_ok() })),
                Err(e) => {
                    tracing::debug!(%agent, error = %e, "order not published");
                    None
                }
            },
        }
    }
}

/// Sends queued orders (looking only at agents that have some), marks them delivered on the
/// agent's PUBACK (in scale mode: before publishing, put back in the queue if the broker does
/// not acknowledge), and expires overdue ones. In scale mode
/// only the replica holding the dispatch lease sends, so replicas do not publish each order
/// twice and one agent's orders leave in order.
async fn dispatch_orders(
    store: Store,
    outlet: Outlet,
    wake: Arc<Notify>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight: Arc<Mutex<HashSet<uuid::Uuid>>> = Arc::default();
    let mut lease: Option<DispatchLease> = None;
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
        if matches!(outlet, Outlet::Broker(_)) {
            if let Some(l) = &mut lease
                && !l.is_held().await
            {
                tracing::warn!("order dispatch lease lost");
                lease = None;
            }
            if lease.is_none() {
                match orders.try_dispatch_lease().await {
                    Ok(Some(l)) => {
                        tracing::info!("this replica dispatches orders");
                        lease = Some(l);
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "taking the order dispatch lease failed");
                        continue;
                    }
                }
            }
        }
        let agents = match orders.agents_with_queued(now).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "listing agents with queued orders failed");
                continue;
            }
        };
        for queued_agent in agents.into_iter().filter(|a| outlet.reachable(a)) {
            let agent = queued_agent.agent;
            let queued = match orders.queued_for_agent(agent, now).await {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, %agent, "reading queued orders failed");
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
                // Through the broker the order is claimed (marked delivered) before it is
                // published, so no other round or replica sends it again. The agent may still
                // answer before a mark (here, or after the embedded endpoint's PUBACK): order
                // states only move forward (`OrdersHandle::transition`), so its result is
                // applied to a queued order and a late mark changes nothing.
                let claimed = matches!(outlet, Outlet::Broker(_));
                if claimed {
                    match orders.mark_delivered(order.id).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::warn!(order = %order.id, error = %e, "claiming an order failed");
                            break;
                        }
                    }
                }
                // Not connected any more, or the window of unacknowledged orders is full:
                // the order stays queued for the next round.
                let Some(ack) = outlet.send(&agent, payload).await else {
                    if claimed && let Err(e) = orders.requeue(order.id).await {
                        tracing::warn!(order = %order.id, error = %e, "requeueing an order failed");
                    }
                    break;
                };
                if let Ok(mut s) = in_flight.lock() {
                    s.insert(order.id);
                }
                let orders = orders.clone();
                let in_flight = in_flight.clone();
                tokio::spawn(async move {
                    let acked = ack.await;
                    let done = match (acked, claimed) {
                        (true, false) => orders.mark_delivered(order.id).await.map(|_| ()),
                        (false, true) => orders.requeue(order.id).await.map(|_| ()),
                        _ => Ok(()),
                    };
                    if let Err(e) = done {
                        tracing::warn!(order = %order.id, error = %e, "updating the order's state failed");
                    }
                    if let Ok(mut s) = in_flight.lock() {
                        s.remove(&order.id);
                    }
                });
            }
        }
    }
}

/// How often the broker's CRL file is rewritten even without a new revocation: well before
/// the list's `nextUpdate` (seven days), after which the broker would refuse every client.
const CRL_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// When the store's revocations change: rebuilds the embedded listener's CRL and closes the
/// connections of revoked agents, or, in scale mode, rewrites the broker's CRL file (and
/// rewrites it daily so it never expires).
async fn watch_revocations(
    store: Store,
    outlet: Outlet,
    crl_file: Option<PathBuf>,
    pki: Arc<Pki>,
    mut known: Vec<String>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut written = tokio::time::Instant::now();
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
        let stale = written.elapsed() >= CRL_REFRESH;
        if revoked == known && !stale {
            continue;
        }
        match &outlet {
            Outlet::Embedded(endpoint) => {
                match pki.mqtt_config(&revoked) {
                    Ok(tls) => endpoint.set_tls(tls),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot rebuild the TLS configuration with the new CRL");
                        continue;
                    }
                }
                let newly: HashSet<&String> =
                    revoked.iter().filter(|s| !known.contains(s)).collect();
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
            }
            Outlet::Broker(_) => {
                if let Some(path) = &crl_file {
                    if let Err(e) = pki.write_crl(&revoked, path) {
                        tracing::error!(error = %e, "cannot write the broker's CRL");
                        continue;
                    }
                    written = tokio::time::Instant::now();
                    if revoked != known {
                        tracing::warn!(
                            file = %path.display(),
                            "CRL rewritten: the broker applies it once restarted (see deploy/scale/README.md)"
                        );
                    }
                }
            }
        }
        if revoked != known {
            tracing::info!(
                revoked = revoked.len(),
                "certificate revocation list updated"
            );
        }
        known = revoked;
    }
}

/// Applies retention ([`AdminHandle::prune`](crate::store::AdminHandle::prune)) with the cut
/// `retention` ago, at start and every `every`.
async fn prune_periodically(
    store: Store,
    retention: Duration,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let cutoff = Timestamp::now()
            .unix()
            .saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        match Timestamp::from_unix(cutoff) {
            Ok(cutoff) => match store.admin().prune(cutoff).await {
                Ok(report) => tracing::info!(
                    history = report.history,
                    events = report.events,
                    exception_logs = report.exception_logs,
                    message_ids = report.message_ids,
                    rejected = report.rejected,
                    service_certificates = report.service_certificates,
                    "retention applied"
                ),
                Err(e) => tracing::warn!(error = %e, "applying retention failed"),
            },
            Err(e) => tracing::warn!(error = %e, "retention cut-off out of range"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every.max(Duration::from_secs(1))) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Presence messages among data in one batch: acknowledged in their places, never
    /// stored or rejected; the data around them keeps its own outcomes, in order.
    #[tokio::test]
    async fn presence_in_a_batch_keeps_every_outcome_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        let tenant = store.admin().add_tenant("acme").await.unwrap();
        let agent = store.admin().create_agent(tenant, "a").await.unwrap();
        let sink = StoreSink {
            store: store.clone(),
            security: Arc::new(SecurityLog::new(
                store.clone(),
                SecurityEventLimit::default(),
            )),
        };
        let Message::Hello(mut hello) = epmc_proto::sample::sample(epmc_proto::Kind::Hello).message
        else {
            unreachable!()
        };
        hello.agent_id = agent.uuid();
        let hello = Envelope::new(Message::Hello(hello)).to_json().unwrap();
        let item = |channel, payload: &[u8]| Inbound {
            agent,
            channel,
            payload: Bytes::copy_from_slice(payload),
        };
        let batch = vec![
            item(epmc_proto::topic::Channel::State, b"online"),
            item(epmc_proto::topic::Channel::Hello, &hello),
            item(epmc_proto::topic::Channel::State, b"bogus"),
            item(epmc_proto::topic::Channel::State, b" offline\n"),
            item(epmc_proto::topic::Channel::Hello, &hello),
        ];
        let outcomes = sink.commit(batch).await.unwrap();
        assert_eq!(outcomes.len(), 5);
        assert_eq!(outcomes[0], Outcome::Stored);
        assert_eq!(outcomes[1], Outcome::Stored);
        assert!(matches!(&outcomes[2], Outcome::Rejected(_)), "{outcomes:?}");
        assert_eq!(outcomes[3], Outcome::Stored);
        assert_eq!(outcomes[4], Outcome::Duplicate);
        assert_eq!(store.admin().rejected_count().await.unwrap(), 1);
        // Only presence: no store call at all, every message acknowledged.
        let outcomes = sink
            .commit(vec![item(epmc_proto::topic::Channel::State, b"offline")])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Stored]);
        store.close().await;
    }
}
