//! The embedded MQTT 3.1.1 / TLS ingest endpoint (issue 9).
//!
//! Agents connect with their client certificate; the certificate's CN is their agent id and
//! the CONNECT client id must be the same. Each agent may publish (QoS 0/1) only to its own
//! `epmc/v1/agents/{id}/{hello,telemetry,events,results,state}` and subscribe only to its own
//! `…/orders`; a violation closes that connection without acknowledging and records a
//! [`SecurityEvent`]. QoS 1 publishes from every connection go to one writer task that
//! commits what is waiting as one batch ([`IngestSink::commit`]) and only then lets each
//! connection send its PUBACKs, in order. Orders go back with [`Endpoint::send_order`].
//!
//! The packets are read and written with `epmc_transport::mqtt`; the store, the CA and the
//! audit log stay behind [`IngestSink`] and the [`IdentityFn`].
//!
//! Not kept: MQTT persistent sessions (CONNACK always says "no session"; orders are kept by
//! the store and re-sent after a reconnect), retained messages (the retain flag is ignored)
//! and QoS 2 (the codec refuses it: the connection closes as for a malformed packet).

mod conn;
mod identity;
mod sink;
mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use epmc_proto::topic::AgentId;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use identity::{IdentityError, IdentityFn, agent_id_from_cn};
pub use sink::{
    Inbound, IngestSink, Outcome, Prepared, SecurityEvent, SinkError, TlsRefusal, stated_presence,
};

/// Limits and timeouts of the endpoint.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct IngestConfig {
    /// TLS handshake plus CONNECT must complete within this.
    pub connect_timeout: Duration,
    /// Largest packet accepted or sent.
    pub max_packet: usize,
    /// Most connections open at once; more are refused before TLS.
    pub max_connections: usize,
    /// Most messages in one commit.
    pub max_batch: usize,
    /// Most publishes of one connection waiting for their commit; the connection reads no
    /// further packet until one is committed.
    pub max_in_flight: usize,
    /// Most orders sent to one agent and not yet acknowledged by it.
    pub max_unacked_orders: usize,
    /// Most bytes queued for one connection and not yet written; beyond this the agent is a
    /// slow reader and its connection closes.
    pub max_outgoing_bytes: usize,
    /// A write to one connection that takes longer than this closes it.
    pub write_timeout: Duration,
    /// On shutdown, how long connections get to receive their last commits' answers.
    pub shutdown_grace: Duration,
    /// Whether the group-commit writer runs on a thread of its own (a single-threaded
    /// runtime) instead of among the connection tasks. Each statement of a commit is a round
    /// trip to the database; on its own thread the writer is polled again as soon as the
    /// answer is there, instead of queueing behind hundreds of connection tasks: on a loaded
    /// 2-core machine that made SQLite ingest ~20 % faster. A sink's sockets opened on that
    /// thread end with it: the store's PostgreSQL ingest pool opens its connections there and
    /// replaces one whose runtime has ended before its next use.
    pub own_writer_thread: bool,
    /// How long a connection's or disconnection's presence change waits for more before it
    /// is committed, when no message is waiting (a message ends the wait at once). Nobody
    /// waits for presence, and a burst of connections (agents coming back after an outage)
    /// then takes one commit every few milliseconds instead of one per connection or two.
    pub presence_linger: Duration,
}

impl Default for IngestConfig {
    /// Connect timeout 10 s, 1 MiB packets, 10 000 connections, batches of 1 024, 64 in
    /// flight per connection, 16 unacknowledged orders, 4 MiB outgoing, write timeout 10 s,
    /// shutdown grace 10 s, the writer on its own thread, presence changes gathered for 5 ms.
    fn default() -> Self {
        IngestConfig {
            connect_timeout: Duration::from_secs(10),
            max_packet: epmc_transport::mqtt::DEFAULT_MAX_PACKET,
            max_connections: 10_000,
            max_batch: 1024,
            max_in_flight: 64,
            max_unacked_orders: 16,
            max_outgoing_bytes: 4 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            own_writer_thread: true,
            presence_linger: Duration::from_millis(5),
        }
    }
}

impl IngestConfig {
    /// The defaults ([`IngestConfig::default`]).
    pub fn new() -> Self {
        IngestConfig::default()
    }
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections open now (from TCP accept to close).
    pub connections: u64,
    /// Connections whose CONNECT was accepted.
    pub sessions: u64,
    /// Messages in successful commits (including duplicates and rejected ones).
    pub committed: u64,
    /// Successful commits.
    pub batches: u64,
    /// Messages the sink rejected (still acknowledged).
    pub rejected: u64,
    /// Messages the sink already had.
    pub duplicates: u64,
    /// TCP connections refused over the connection limit.
    pub refused: u64,
    /// Connections closed for a security reason (each also a [`SecurityEvent`]).
    pub violations: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    sessions: AtomicU64,
    committed: AtomicU64,
    batches: AtomicU64,
    rejected: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    violations: AtomicU64,
}

/// Why [`Endpoint::send_order`] could not hand an order over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendOrderError {
    /// The agent has no open connection.
    #[error("the agent is not connected")]
    NotConnected,
    /// The agent already has the maximum of unacknowledged orders.
    #[error("the agent has too many unacknowledged orders")]
    TooManyUnacknowledged,
}

/// Why a sent order was not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The connection closed before the agent's PUBACK.
    #[error("the connection closed before the agent acknowledged the order")]
    Closed,
    /// The order does not fit in a packet.
    #[error("the order cannot be sent: {0}")]
    Unsendable(epmc_transport::mqtt::PacketError),
}

/// Resolves when the agent acknowledges the order (PUBACK), or fails when its connection
/// closes first.
#[derive(Debug)]
#[must_use = "the agent's PUBACK is only observed by awaiting this"]
pub struct OrderAck(oneshot::Receiver<Result<(), OrderError>>);

impl Future for OrderAck {
    type Output = Result<(), OrderError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(OrderError::Closed)))
    }
}

/// Why a connection is told to close from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseReason {
    Kicked,
    Replaced,
}

pub(crate) struct Order {
    pub(crate) payload: Bytes,
    pub(crate) done: oneshot::Sender<Result<(), OrderError>>,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// An accepted connection as others reach it.
pub(crate) struct Registered {
    pub(crate) conn: u64,
    pub(crate) close: watch::Sender<Option<CloseReason>>,
    /// Boxed: the channel allocates its first block of slots when it is made, for every
    /// connection, and a boxed order keeps that block small.
    pub(crate) orders: mpsc::Sender<Box<Order>>,
    pub(crate) order_window: Arc<Semaphore>,
}

pub(crate) struct Shared {
    pub(crate) config: IngestConfig,
    pub(crate) sink: Arc<dyn IngestSink>,
    pub(crate) identity: IdentityFn,
    pub(crate) counters: Arc<Counters>,
    pub(crate) registry: Mutex<HashMap<AgentId, Registered>>,
    pub(crate) next_conn: AtomicU64,
    pub(crate) data: mpsc::Sender<writer::Pending>,
    pub(crate) control: mpsc::UnboundedSender<writer::Control>,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) slots: Arc<Semaphore>,
    /// The TLS configuration for the next handshakes (replaced when the CRL changes).
    pub(crate) tls: Mutex<Arc<rustls::ServerConfig>>,
}

impl Shared {
    pub(crate) fn registry(&self) -> MutexGuard<'_, HashMap<AgentId, Registered>> {
        // A panic while holding the lock leaves a consistent map (every update is one call).
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) async fn violation(&self, event: SecurityEvent) {
        self.counters.violations.fetch_add(1, Ordering::Relaxed);
        // The sink logs what it records (the server's at a bounded rate).
        tracing::debug!(?event, "ingest security event");
        self.sink.security_event(event).await;
    }
}

struct Tasks {
    accept: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// Ends (`None`) once the accept loop and every connection task have finished.
    done: mpsc::Receiver<()>,
}

/// A running ingest endpoint. Clones share it.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    tasks: Arc<tokio::sync::Mutex<Option<Tasks>>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Listens on `addr` and serves until [`Endpoint::shutdown`]. `tls` must require client
    /// certificates (e.g. `WebPkiClientVerifier` over the agents' CA); `identity` maps a
    /// verified chain to the agent id.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        identity: IdentityFn,
        sink: Arc<dyn IngestSink>,
        config: IngestConfig,
    ) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        // Every connection has at most `max_in_flight` messages queued, so this never fills
        // below the connection limit; it is a bound, not a buffer that matters.
        let (data_tx, data_rx) = mpsc::channel(
            config
                .max_in_flight
                .max(1)
                .saturating_mul(config.max_connections.max(1))
                .clamp(1, 1 << 20),
        );
        // At most three items per accepted connection (online, will, offline), and
        // connections are bounded by `max_connections`.
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let writer = writer::run(
            sink.clone(),
            counters.clone(),
            config.max_batch,
            config.presence_linger,
            data_rx,
            control_rx,
        );
        let writer = if config.own_writer_thread {
            spawn_on_own_thread(writer)?
        } else {
            tokio::spawn(writer)
        };
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            sink,
            identity,
            counters,
            registry: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            data: data_tx,
            control: control_tx,
            shutdown: watch::channel(false).0,
            tls: Mutex::new(tls),
        });
        let (done_tx, done_rx) = mpsc::channel(1);
        let accept = tokio::spawn(accept_loop(shared.clone(), listener, done_tx));
        Ok(Endpoint {
            shared,
            local_addr,
            tasks: Arc::new(tokio::sync::Mutex::new(Some(Tasks {
                accept,
                writer,
                done: done_rx,
            }))),
        })
    }

    /// Replaces the TLS configuration for the handshakes from now on (e.g. with a new CRL
    /// after a revocation); open connections keep theirs (see [`Endpoint::kick`]).
    pub fn set_tls(&self, tls: Arc<rustls::ServerConfig>) {
        *self
            .shared
            .tls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether `agent` has an accepted connection now.
    pub fn is_connected(&self, agent: &AgentId) -> bool {
        self.shared.registry().contains_key(agent)
    }

    /// Publishes `payload` at QoS 1 on the agent's orders topic. The returned future resolves
    /// on the agent's PUBACK, or fails when the connection closes first.
    pub fn send_order(&self, agent: &AgentId, payload: Bytes) -> Result<OrderAck, SendOrderError> {
        let registry = self.shared.registry();
        let r = registry.get(agent).ok_or(SendOrderError::NotConnected)?;
        let permit = r
            .order_window
            .clone()
            .try_acquire_owned()
            .map_err(|_| SendOrderError::TooManyUnacknowledged)?;
        let (done, wait) = oneshot::channel();
        // The channel holds as many orders as the window has permits: only a closed
        // connection refuses.
        r.orders
            .try_send(Box::new(Order {
                payload,
                done,
                permit,
            }))
            .map_err(|_| SendOrderError::NotConnected)?;
        Ok(OrderAck(wait))
    }

    /// Closes the agent's open connection (e.g. its certificate was revoked) and records a
    /// [`SecurityEvent::Kicked`]. Returns whether it had one.
    pub fn kick(&self, agent: &AgentId) -> bool {
        match self.shared.registry().get(agent) {
            Some(r) => {
                r.close.send_replace(Some(CloseReason::Kicked));
                true
            }
            None => false,
        }
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            connections: (self.shared.config.max_connections
                - self.shared.slots.available_permits()) as u64,
            sessions: get(&c.sessions),
            committed: get(&c.committed),
            batches: get(&c.batches),
            rejected: get(&c.rejected),
            duplicates: get(&c.duplicates),
            refused: get(&c.refused),
            violations: get(&c.violations),
        }
    }

    /// Stops accepting, lets every connection receive the answers of its commits in flight
    /// (and send those PUBACKs) for up to `shutdown_grace`, closes the connections, commits
    /// what is still queued and stops the writer. Calling it again does nothing.
    pub async fn shutdown(&self) {
        let Some(mut tasks) = self.tasks.lock().await.take() else {
            return;
        };
        self.shared.shutdown.send_replace(true);
        let grace = self.shared.config.shutdown_grace;
        // The accept loop stops at once unless the sink is stuck recording a refusal.
        if tokio::time::timeout(grace, &mut tasks.accept)
            .await
            .is_err()
        {
            tasks.accept.abort();
        }
        // Each connection bounds its own wind-down by the grace and the write timeout.
        let bound = grace + self.shared.config.write_timeout + Duration::from_secs(1);
        if tokio::time::timeout(bound, tasks.done.recv())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the shutdown grace");
        }
        let _ = self.shared.control.send(writer::Control::Stop);
        // A sink that never returns must not hold the shutdown forever.
        if tokio::time::timeout(grace, &mut tasks.writer)
            .await
            .is_err()
        {
            tracing::warn!("the ingest sink did not finish its last commits in time");
            tasks.writer.abort();
        }
    }
}

/// Runs `task` on a thread of its own (a single-threaded runtime; see
/// [`IngestConfig::own_writer_thread`]). The handle ends when `task` does; aborting it drops
/// `task` on its thread.
fn spawn_on_own_thread(
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("epmc-ingest-writer".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = task => {}
                    _ = cancel_rx => {}
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok(tokio::spawn(async move {
        // Dropped when this task is aborted, which cancels `task`.
        let _cancel = cancel_tx;
        let _ = done_rx.await;
    }))
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, done: mpsc::Sender<()>) {
    let mut stop = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => match shared.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let tls = shared
                        .tls
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    tokio::spawn(conn::serve(
                        shared.clone(),
                        tokio_rustls::TlsAcceptor::from(tls),
                        tcp,
                        peer,
                        slot,
                        done.clone(),
                    ));
                }
                Err(_) => {
                    drop(tcp);
                    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                    shared
                        .violation(SecurityEvent::ConnectionLimit { peer })
                        .await;
                }
            },
            Err(e) => {
                // E.g. out of file descriptors: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
