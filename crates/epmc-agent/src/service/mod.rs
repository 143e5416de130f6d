//! The agent service (`epmc-agent run`): every configured projector watched, everything it
//! learns sent durably to the server, and the server's orders executed.
//!
//! ```text
//! targets ──> device tasks (one per address) ──> Publisher ──> outbox (disk) ──> Forwarder ──> MqttSession ──> server
//!                  ^                                                                              │
//!                  └──── Registry (device id → task) <── intake <── journal (disk) <── orders ─────┘
//! ```
//!
//! - Identity: the agent id is the CN of its certificate ([`crate::identity`]); every topic
//!   is built from it, and the state directory must belong to it.
//! - Device tasks ([`device`]): status reads on schedule, a full collection on first contact
//!   and then on its own schedule, IMEVENT notifications forwarded at once on held sessions,
//!   orders for the device one after another, back-off for projectors that do not answer.
//! - Everything sent goes through the durable outbox ([`outbound`]): a server outage loses
//!   nothing; the forwarder sends the backlog, oldest first, once the connection is back.
//! - Orders ([`orders`]): written to the journal before they are acknowledged to the broker,
//!   run once, their result sent through the outbox, then marked finished.
//! - A hello on every connection; the agent's exception log every minute when it has
//!   entries; the agent screen's data ([`status`]) written to `status.json` every few
//!   seconds.

pub mod device;
pub mod orders;
pub mod outbound;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use epmc_proto::bounded::{BoundedVec, Timestamp};
use epmc_proto::model::{
    AgentDeviceSettings, AgentExceptionLog, AgentHello, ExceptionEntry, Severity,
};
use epmc_proto::order::{FailureReason, Order, OrderAction, OrderOutcome, OrderResult};
use epmc_proto::topic::{self, AgentId};
use epmc_proto::{Envelope, Message};
use epmc_transport::client::{MqttOptions, TlsIdentity};
use epmc_transport::forward::{Forwarder, Running};
use epmc_transport::mqtt::{QoS, TopicName, Will};
use epmc_transport::outbox::{Limits, Outbox, OutboxError};
use epmc_transport::session::MqttSession;
use epmc_transport::{OrderSource, Uplink};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::collect::CollectOptions;
use crate::config::{AgentConfig, Mode, Schedule};
use crate::identity;
use device::{DeviceTask, Work};
use orders::{Journal, Recorded};
use outbound::{PublishError, Publisher};
use status::{AgentStatus, Reach, StatusTable, TargetStatus};

/// Settings of the service that are not in the configuration file.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Where the outbox, the order journal and `status.json` live.
    pub state_dir: PathBuf,
    /// Timeouts of projector sessions.
    pub collect: CollectOptions,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Pause before an order for an unreachable projector is tried again.
    pub order_retry: Duration,
    /// How often `status.json` is written.
    pub status_every: Duration,
    /// How often the exception log is sent (when it has entries).
    pub exceptions_every: Duration,
    /// Pause between forwarding attempts while the server is unreachable.
    pub forward_retry: Duration,
    /// The first reads are spread over this long (so a big fleet does not start in step).
    pub spread_start: Duration,
    /// The longest a projector may keep one of the `concurrency` slots without answering:
    /// after that it gives its slot up and goes on waiting outside them, so silent or very
    /// slow projectors wait in parallel instead of holding up the rest of a round. Once
    /// replies have been seen the wait is shorter, a few typical reply times (this is its
    /// upper bound).
    pub slow_grace: Duration,
    /// Whether the first contact with a projector is a full collection (the server then knows
    /// what the device is at once) rather than a status read.
    pub full_on_first_contact: bool,
    /// The configuration file (the self-test of an update loads it).
    pub config_file: Option<PathBuf>,
    /// The binary an update replaces (default: this executable).
    pub binary: Option<PathBuf>,
}

impl ServiceOptions {
    /// Defaults, with the state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> ServiceOptions {
        ServiceOptions {
            state_dir: state_dir.into(),
            collect: CollectOptions::default(),
            keep_alive: Duration::from_secs(30),
            order_retry: Duration::from_secs(5),
            status_every: Duration::from_secs(2),
            exceptions_every: Duration::from_secs(60),
            forward_retry: Duration::from_secs(1),
            spread_start: Duration::from_secs(2),
            slow_grace: Duration::from_millis(500),
            full_on_first_contact: true,
            config_file: None,
            binary: None,
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The certificate or the state directory's owner.
    #[error("{0}")]
    Identity(#[from] identity::IdentityError),
    /// The certificate, key or CA files.
    #[error("TLS files: {0}")]
    Tls(String),
    /// The server's name does not resolve.
    #[error("cannot resolve the server {host}:{port}: {detail}")]
    Resolve {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Why.
        detail: String,
    },
    /// The outbox or the journal cannot be opened.
    #[error("state directory {dir}: {detail}")]
    State {
        /// Which directory.
        dir: String,
        /// Why.
        detail: String,
    },
    /// The MQTT session could not start.
    #[error("MQTT: {0}")]
    Mqtt(String),
    /// The `[update]` section cannot be used.
    #[error("self-update: {0}")]
    Update(String),
}

/// Writes a file atomically: a temporary file beside it, synced, renamed over it, and the
/// directory synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The agent's exception log: entries wait here until the next send.
#[derive(Clone, Debug, Default)]
pub struct ExceptionLog(Arc<Mutex<Vec<ExceptionEntry>>>);

impl ExceptionLog {
    /// Records an entry (the oldest go first when more than a message holds are waiting).
    pub fn record(&self, severity: Severity, component: &str, message: &str) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() >= epmc_proto::model::MAX_LOG_ENTRIES {
            v.remove(0);
        }
        v.push(ExceptionEntry {
            at: Timestamp::now(),
            severity,
            component: orders::text(component),
            message: orders::text(message),
        });
    }

    fn take(&self) -> Vec<ExceptionEntry> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Which device task serves which device id.
#[derive(Debug)]
pub(crate) struct Registry {
    inner: Mutex<RegistryInner>,
    first_pending: watch::Sender<usize>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    tasks: HashMap<SocketAddr, mpsc::UnboundedSender<Box<Work>>>,
    ids: HashMap<String, SocketAddr>,
}

impl Registry {
    fn new(tasks: usize) -> Registry {
        Registry {
            inner: Mutex::default(),
            first_pending: watch::Sender::new(tasks),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_task(&self, addr: SocketAddr, tx: mpsc::UnboundedSender<Box<Work>>) {
        let mut r = self.lock();
        r.tasks.insert(addr, tx);
        r.ids
            .insert(crate::collect::device_id(None, addr).to_string(), addr);
    }

    /// The device at `addr` is `id` (an address serves one device; a serial moves with its
    /// projector when its address changes).
    pub(crate) fn register(&self, id: &str, addr: SocketAddr) {
        let mut r = self.lock();
        r.ids.retain(|k, a| *a != addr || k.starts_with("ip:"));
        r.ids.insert(id.to_owned(), addr);
    }

    pub(crate) fn first_attempt_done(&self) {
        self.first_pending.send_modify(|n| *n = n.saturating_sub(1));
    }

    fn find(&self, id: &str) -> Option<mpsc::UnboundedSender<Box<Work>>> {
        let r = self.lock();
        r.ids.get(id).and_then(|a| r.tasks.get(a)).cloned()
    }

    /// The task for a device id; until every target has been tried once (the serial numbers
    /// are learnt then), waits for that, at most `wait`.
    async fn lookup(&self, id: &str, wait: Duration) -> Option<mpsc::UnboundedSender<Box<Work>>> {
        if let Some(tx) = self.find(id) {
            return Some(tx);
        }
        let mut rx = self.first_pending.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|n| *n == 0)).await;
        self.find(id)
    }
}

/// What the device tasks and the order intake share.
pub(crate) struct Ctx {
    publisher: Publisher,
    status: StatusTable,
    permits: Arc<Semaphore>,
    collect: CollectOptions,
    schedule: Schedule,
    registry: Registry,
    exceptions: ExceptionLog,
    journal: Arc<Mutex<Journal>>,
    stop: watch::Receiver<bool>,
    order_retry: Duration,
    mode: Mode,
    pace: Pace,
    full_on_first_contact: bool,
    updates: Option<Updates>,
}

/// What self-update needs: the updater (from `[update]`), the binary it replaces, the
/// self-test, and where a successful installation is announced (the service then ends so
/// that its supervisor starts the new binary).
struct Updates {
    updater: crate::update::Updater,
    binary: PathBuf,
    test: crate::update::SelfTest,
    installed: watch::Sender<Option<String>>,
}

impl Ctx {
    /// Waits for one of the `concurrency` slots. Taken before the work's future is made, so a
    /// fleet waiting for slots holds only small waiting tasks, not thousands of built reads.
    async fn slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        // The semaphore is never closed.
        match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => unreachable!("the slot semaphore is never closed"),
        }
    }

    /// Runs `f` (talking to a projector) in the `slot` taken for it. `answers` counts the
    /// projector's answers (see [`crate::collect::Projector::count_answers`]); once it has
    /// gone [`Pace::grace`] without one, the slot is given up and `f` finishes outside the
    /// concurrency limit. A `suspect` (its last attempt timed out) gets the short grace.
    async fn talking<F: std::future::Future>(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
        mut answers: watch::Receiver<u32>,
        suspect: bool,
        f: F,
    ) -> F::Output {
        tokio::pin!(f);
        // Answers counted before this slot (a held session's earlier work) are not samples.
        let _ = answers.borrow_and_update();
        let mut last = tokio::time::Instant::now();
        let mut counted = true;
        loop {
            let give_up = last + self.pace.grace(suspect);
            tokio::select! {
                out = &mut f => return out,
                changed = answers.changed(), if counted => {
                    if changed.is_err() {
                        counted = false;
                        continue;
                    }
                    let now = tokio::time::Instant::now();
                    self.pace.observe(now - last);
                    last = now;
                }
                () = tokio::time::sleep_until(give_up) => break,
            }
        }
        drop(permit);
        f.await
    }

    /// Queues a message. While the outbox cannot take it (its disk full or failing, or it is
    /// full of more important messages), it is held in memory and queued later (see
    /// [`Publisher`]); the first hold of a spell is kept in the exception log. Any other
    /// failure is logged and kept in the exception log.
    async fn publish(&self, message: Message) {
        let kind = message.kind();
        match self.publisher.publish(message).await {
            Ok(_) => {}
            Err(PublishError::Held { id, reason }) => {
                tracing::warn!(?kind, %id, %reason, "message held in memory until the outbox takes it");
                if self.publisher.held() == 1 {
                    self.exceptions.record(
                        Severity::Warning,
                        "outbox",
                        &format!("{kind:?} held in memory, the outbox cannot take it: {reason}"),
                    );
                }
            }
            Err(e) => {
                tracing::error!(?kind, error = %e, "message not queued");
                self.exceptions.record(
                    Severity::Error,
                    "outbox",
                    &format!("{kind:?} not queued: {e}"),
                );
            }
        }
    }

    /// Sends an order's final result, then marks the order finished in the journal. While the
    /// result cannot be queued (a full disk, an outbox full of results) it is tried again with
    /// back-off and the order stays in the journal (so it runs again after a restart); the
    /// device's next orders wait behind it.
    async fn complete(&self, order: &Order, result: OrderResult) {
        let queued = self
            .publisher
            .publish_persistently(Message::OrderResult(result), |e| {
                tracing::error!(order = %order.order_id, error = %e, "order result not queued; trying again");
                self.exceptions.record(
                    Severity::Error,
                    "orders",
                    &format!("result of order {} not queued (trying again): {e}", order.order_id),
                );
            })
            .await;
        if let Err(e) = queued {
            tracing::error!(order = %order.order_id, error = %e, "order result not queued");
            self.exceptions.record(
                Severity::Error,
                "orders",
                &format!("result of order {} not queued: {e}", order.order_id),
            );
            return;
        }
        let journal = self.journal.clone();
        let o = order.clone();
        let finished = tokio::task::spawn_blocking(move || {
            journal.lock().unwrap_or_else(|e| e.into_inner()).finish(&o)
        })
        .await;
        if !matches!(finished, Ok(Ok(()))) {
            tracing::error!(order = %order.order_id, ?finished, "order not marked finished");
        }
    }

    async fn accepted(&self, order: &Order) {
        self.publish(Message::OrderResult(orders::result(
            order,
            OrderOutcome::Accepted,
            None,
        )))
        .await;
    }
}

/// How fast the projectors answer, learnt from every answer in every session: how long a
/// projector may keep a concurrency slot without answering.
///
/// The typical reply time is a moving average (weight 1/8) of the gaps between a session's
/// answers (the first from taking the slot to the CONNECT reply). A projector keeps its slot
/// while it answers within [`Pace::GRACE_REPLIES`] typical reply times (at least
/// [`Pace::MIN_GRACE`]); one whose last attempt timed out (a suspect) only within one. Before
/// any answer, and at most ever, the grace is the configured `slow_grace`. A grace that is too
/// short only lets a slow but healthy projector finish outside the limit.
#[derive(Debug)]
pub(crate) struct Pace {
    /// Typical reply time, µs; 0 until the first answer.
    typical_us: std::sync::atomic::AtomicU64,
    max: Duration,
}

impl Pace {
    /// A projector keeps its slot this many typical reply times without answering.
    pub(crate) const GRACE_REPLIES: u32 = 4;
    /// The shortest grace for a projector not suspected of being silent.
    pub(crate) const MIN_GRACE: Duration = Duration::from_millis(50);
    /// The shortest grace for a suspect.
    pub(crate) const MIN_SUSPECT_GRACE: Duration = Duration::from_millis(10);

    pub(crate) fn new(max: Duration) -> Pace {
        Pace {
            typical_us: std::sync::atomic::AtomicU64::new(0),
            max,
        }
    }

    /// Records the time one answer took.
    pub(crate) fn observe(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let sample = u64::try_from(took.min(self.max).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        // Racing updates may lose a sample; the average does not need them all.
        let old = self.typical_us.load(Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 7 + sample + 4) / 8
        };
        self.typical_us.store(new.max(1), Relaxed);
    }

    /// The typical reply time, once one answer has been seen.
    pub(crate) fn typical(&self) -> Option<Duration> {
        match self.typical_us.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// How long a projector may keep its slot without answering.
    pub(crate) fn grace(&self, suspect: bool) -> Duration {
        let Some(typical) = self.typical() else {
            return self.max;
        };
        let grace = if suspect {
            typical.max(Self::MIN_SUSPECT_GRACE)
        } else {
            typical
                .saturating_mul(Self::GRACE_REPLIES)
                .max(Self::MIN_GRACE)
        };
        grace.min(self.max)
    }
}

/// How long a copy-settings order waits for its source device's settings.
pub const COPY_WAIT: Duration = Duration::from_secs(180);

/// Sends an order where it runs, or answers it at once.
async fn dispatch(ctx: &Arc<Ctx>, order: Order) {
    if ctx.mode == Mode::MonitorOnly {
        let r = orders::failed(
            &order,
            FailureReason::NotPermitted,
            "this agent runs in monitor-only mode and refuses every order",
            None,
        );
        return ctx.complete(&order, r).await;
    }
    if let Some(r) = orders::precheck(&order, Timestamp::now()) {
        return ctx.complete(&order, r).await;
    }
    if order.action == OrderAction::CheckAgentUpdate {
        let r = match &ctx.updates {
            None => orders::failed(
                &order,
                FailureReason::NotPermitted,
                "self-update is not configured on this agent (no [update] section)",
                None,
            ),
            Some(u) => {
                ctx.accepted(&order).await;
                update_now(u, &order).await
            }
        };
        return ctx.complete(&order, r).await;
    }
    let Some(device) = order.device_id.clone() else {
        let r = orders::failed(
            &order,
            FailureReason::NotPermitted,
            "the order names no device",
            None,
        );
        return ctx.complete(&order, r).await;
    };
    let wait = ctx.collect.deadline.min(Duration::from_secs(60));
    let unknown = |id: &str| {
        orders::failed(
            &order,
            FailureReason::NotPermitted,
            &format!("device {id} is not managed by this agent"),
            None,
        )
    };
    let Some(target) = ctx.registry.lookup(device.as_str(), wait).await else {
        let r = unknown(device.as_str());
        return ctx.complete(&order, r).await;
    };
    if let OrderAction::CopySettings { source_device, .. } = &order.action {
        let Some(source) = ctx.registry.lookup(source_device.as_str(), wait).await else {
            let r = unknown(source_device.as_str());
            return ctx.complete(&order, r).await;
        };
        ctx.accepted(&order).await;
        // Read the source's settings, then hand them to the target's task. A separate task:
        // the intake goes on, and two copies in opposite directions cannot wait on each other.
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let source_id = source_device_of(&order);
            let (tx, rx) = tokio::sync::oneshot::channel();
            if source.send(Box::new(Work::ReadProfile(Some(tx)))).is_err() {
                return; // stopping: the order stays in the journal
            }
            let profile = match tokio::time::timeout(COPY_WAIT, rx).await {
                Ok(Ok(Ok(p))) => p,
                Ok(Ok(Err(why))) => {
                    let r = orders::failed(
                        &order,
                        FailureReason::DeviceUnreachable,
                        &format!("the source device {source_id}: {why}"),
                        None,
                    );
                    return ctx.complete(&order, r).await;
                }
                Ok(Err(_)) => return, // stopping
                Err(_) => {
                    let r = orders::failed(
                        &order,
                        FailureReason::TimedOut,
                        &format!("the source device {source_id} was not read within {COPY_WAIT:?}"),
                        None,
                    );
                    return ctx.complete(&order, r).await;
                }
            };
            if let Err(mpsc::error::SendError(work)) =
                target.send(Box::new(Work::Apply(order, profile)))
                && let Work::Apply(order, _) = *work
            {
                tracing::info!(order = %order.order_id, "service stopping; order kept for the next start");
            }
        });
        return;
    }
    ctx.accepted(&order).await;
    if let Err(mpsc::error::SendError(work)) = target.send(Box::new(Work::Order(order)))
        && let Work::Order(order) = *work
    {
        // The task has stopped (shutdown): the order stays in the journal.
        tracing::info!(order = %order.order_id, "service stopping; order kept for the next start");
    }
}

/// Runs an update for a `check_agent_update` order.
async fn update_now(u: &Updates, order: &Order) -> OrderResult {
    use crate::update::{UpdateError, UpdateOutcome};
    match u.updater.update(&u.binary, &u.test).await {
        Ok(UpdateOutcome::NotPublished) => orders::result(
            order,
            OrderOutcome::Done,
            Some("no agent release is published for this platform".into()),
        ),
        Ok(UpdateOutcome::Installed { from, installed }) => {
            let text = format!(
                "installed {} (was {from}); the agent restarts into it",
                installed.version
            );
            let _ = u.installed.send(Some(installed.version.to_string()));
            orders::result(order, OrderOutcome::Done, Some(text))
        }
        Err(UpdateError::NotNewer { current, offered }) if current == offered => orders::result(
            order,
            OrderOutcome::Done,
            Some(format!("up to date: {current}")),
        ),
        Err(e) => orders::failed(
            order,
            FailureReason::NotPermitted,
            &format!("update refused: {e}"),
            None,
        ),
    }
}

fn source_device_of(order: &Order) -> String {
    match &order.action {
        OrderAction::CopySettings { source_device, .. } => source_device.to_string(),
        _ => String::new(),
    }
}

/// A running agent service.
pub struct Service {
    ctx: Arc<Ctx>,
    stop: watch::Sender<bool>,
    session: Arc<MqttSession>,
    forwarder: Option<Running>,
    tasks: JoinSet<()>,
    devices: JoinSet<()>,
    agent: AgentId,
    state_dir: PathBuf,
    installed: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("agent", &self.agent)
            .finish()
    }
}

impl Service {
    /// Checks the identity, opens the state, connects to the server in the background and
    /// starts one task per target.
    pub async fn start(
        config: AgentConfig,
        options: ServiceOptions,
    ) -> Result<Service, ServiceError> {
        let server = &config.server;
        let agent = identity::agent_id_from_file(&server.client_cert)?;
        let state_err = |dir: &Path, detail: String| ServiceError::State {
            dir: dir.display().to_string(),
            detail,
        };
        std::fs::create_dir_all(&options.state_dir)
            .map_err(|e| state_err(&options.state_dir, e.to_string()))?;
        identity::claim_state_dir(&options.state_dir, &agent)?;
        let tls = TlsIdentity::from_files(&server.ca_cert, &server.client_cert, &server.client_key)
            .map_err(|e| ServiceError::Tls(e.to_string()))?;
        // Through a proxy, the proxy resolves the server's name (often the agent cannot).
        let mut mqtt = match &config.proxy {
            Some(proxy) => MqttOptions::via_proxy(
                proxy.to_http_proxy(),
                &server.url.host,
                server.url.port,
                &agent.to_string(),
            ),
            None => {
                let addr = tokio::net::lookup_host((server.url.host.as_str(), server.url.port))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|mut a| a.next().ok_or_else(|| "no address".to_owned()))
                    .map_err(|detail| ServiceError::Resolve {
                        host: server.url.host.clone(),
                        port: server.url.port,
                        detail,
                    })?;
                MqttOptions::new(addr, &server.url.host, &agent.to_string())
            }
        };

        let outbox_dir = options.state_dir.join("outbox");
        let outbox = Outbox::open(&outbox_dir, Limits::default())
            .map_err(|e| state_err(&outbox_dir, e.to_string()))?;
        let journal_dir = options.state_dir.join("orders");
        let journal =
            Journal::open(&journal_dir).map_err(|e| state_err(&journal_dir, e.to_string()))?;
        let restart_orders = journal.pending();

        mqtt.keep_alive = options.keep_alive;
        // Presence for a server behind a broker (scale mode): a retained `online` after each
        // connection, replaced by the last will's `offline` when the connection dies.
        let presence = |payload: &'static [u8]| -> Result<Will, ServiceError> {
            Ok(Will {
                topic: TopicName::new(topic::state(&agent))
                    .map_err(|e| ServiceError::Mqtt(e.to_string()))?,
                payload: bytes::Bytes::from_static(payload),
                qos: QoS::AtLeastOnce,
                retain: true,
            })
        };
        mqtt.will = Some(presence(b"offline")?);
        mqtt.birth = Some(presence(b"online")?);
        let route = match &mqtt.proxy {
            Some(proxy) => format!("{} via proxy {}", mqtt.tunnel_target(), proxy.authority()),
            None => mqtt.addr.to_string(),
        };
        let orders_topic = topic::orders(&agent);
        let session = Arc::new(
            MqttSession::start(mqtt, tls, &[(orders_topic.as_str(), QoS::AtLeastOnce)])
                .map_err(|e| ServiceError::Mqtt(e.to_string()))?,
        );
        let outbox = Arc::new(Mutex::new(outbox));
        let forwarder = Arc::new(Forwarder::new(
            outbox.clone(),
            session.clone() as Arc<dyn Uplink>,
        ));
        let publisher = Publisher::new(agent, outbox, forwarder.waker());
        let running = forwarder.spawn(options.forward_retry);

        let endpoints = config.endpoints();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (installed_tx, installed_rx) = watch::channel(None);
        let updates = match &config.update {
            None => None,
            Some(_) => {
                let updater = crate::update::Updater::from_config(&config)
                    .map_err(|e| ServiceError::Update(e.to_string()))?;
                let binary = match options.binary.clone() {
                    Some(b) => b,
                    None => std::env::current_exe().map_err(|e| {
                        ServiceError::Update(format!("cannot find this executable: {e}"))
                    })?,
                };
                let test = match &options.config_file {
                    Some(f) => crate::update::SelfTest::with_config(f),
                    None => crate::update::SelfTest {
                        args: Vec::new(),
                        timeout: crate::update::DEFAULT_SELF_TEST_TIMEOUT,
                    },
                };
                Some(Updates {
                    updater,
                    binary,
                    test,
                    installed: installed_tx,
                })
            }
        };
        let ctx = Arc::new(Ctx {
            publisher,
            status: StatusTable::default(),
            permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
            collect: options.collect.clone(),
            schedule: config.schedule,
            registry: Registry::new(endpoints.len()),
            exceptions: ExceptionLog::default(),
            journal: Arc::new(Mutex::new(journal)),
            stop: stop_rx,
            order_retry: options.order_retry,
            mode: config.mode,
            pace: Pace::new(options.slow_grace),
            full_on_first_contact: options.full_on_first_contact,
            updates,
        });

        let mut devices = JoinSet::new();
        let n = endpoints.len().max(1) as u32;
        for (i, endpoint) in endpoints.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            ctx.registry.add_task(endpoint.addr, tx);
            ctx.status.insert(TargetStatus {
                addr: endpoint.addr,
                device_id: None,
                display_name: endpoint.meta.display_name.clone(),
                group: endpoint.meta.group.clone(),
                session: match endpoint.session {
                    crate::config::SessionMode::Hold => "hold".into(),
                    crate::config::SessionMode::Poll => "poll".into(),
                },
                reach: Reach::Unknown,
                status: None,
                last_contact: None,
                failures: 0,
                reads: 0,
                failed_attempts: 0,
            });
            let start_in = options
                .spread_start
                .mul_f64(f64::from(i as u32) / f64::from(n));
            devices.spawn(DeviceTask::new(ctx.clone(), endpoint, rx, start_in).run());
        }

        let mut tasks = JoinSet::new();
        tasks.spawn(intake(ctx.clone(), session.clone(), restart_orders));
        tasks.spawn(greet(ctx.clone(), session.clone(), config.clone()));
        tasks.spawn(send_exceptions(ctx.clone(), options.exceptions_every));
        if let Some(interval) = config.update.as_ref().map(|u| u.check_interval) {
            let ctx = ctx.clone();
            let stop = stop_rx_for_updates(&ctx);
            tasks.spawn(async move {
                let Some(u) = &ctx.updates else { return };
                if let Some(installed) = u.updater.watch(&u.binary, &u.test, interval, stop).await {
                    let _ = u.installed.send(Some(installed.version.to_string()));
                }
            });
        }
        tasks.spawn(write_status(
            ctx.clone(),
            session.clone(),
            options.state_dir.clone(),
            options.status_every,
        ));
        tracing::info!(%agent, server = %route, "agent service started");
        Ok(Service {
            ctx,
            stop: stop_tx,
            session,
            forwarder: Some(running),
            tasks,
            devices,
            agent,
            state_dir: options.state_dir,
            installed: installed_rx,
        })
    }

    /// The agent id (from its certificate).
    pub fn agent_id(&self) -> AgentId {
        self.agent
    }

    /// Whether the server connection is up.
    pub fn connected(&self) -> bool {
        self.session.is_connected()
    }

    /// Messages waiting for the server.
    pub fn outbox_messages(&self) -> usize {
        self.ctx.publisher.pending()
    }

    /// Completes with the new version once a self-update installed it: the service should
    /// then stop, so that its supervisor starts the new binary.
    pub async fn updated(&self) -> String {
        let mut rx = self.installed.clone();
        loop {
            if let Some(v) = rx.borrow_and_update().clone() {
                return v;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The agent screen now.
    pub fn status(&self) -> AgentStatus {
        snapshot(&self.ctx, &self.session)
    }

    /// Stops: device tasks end (a held session is closed), the forwarder gets a moment to
    /// send what is queued, and the status file is written a last time. What was not sent
    /// stays in the outbox for the next start.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.devices.join_next().await.is_some() {}
        })
        .await;
        self.tasks.shutdown().await;
        if self.session.is_connected() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while self.ctx.publisher.pending() > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
        if let Some(f) = self.forwarder.take() {
            f.stop().await;
        }
        let held = self.ctx.publisher.held();
        if held > 0 {
            tracing::error!(
                messages = held,
                "messages held in memory (the outbox could not take them) are lost at this stop"
            );
        }
        let _ = status::write(&self.state_dir, &snapshot(&self.ctx, &self.session));
    }
}

/// Runs the service until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    options: ServiceOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunOutcome, ServiceError> {
    let service = Service::start(config, options).await?;
    let outcome = tokio::select! {
        () = shutdown => RunOutcome::Stopped,
        v = service.updated() => RunOutcome::Updated(v),
    };
    tracing::info!(?outcome, "stopping");
    service.stop().await;
    Ok(outcome)
}

/// Why [`run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Asked to stop (SIGTERM, Ctrl-C).
    Stopped,
    /// A self-update installed this version; the supervisor should start the new binary.
    Updated(String),
}

fn stop_rx_for_updates(ctx: &Ctx) -> watch::Receiver<bool> {
    ctx.stop.clone()
}

/// Receives orders: decode, journal (synced), acknowledge, dispatch. Orders left in the
/// journal by the previous run are dispatched first.
async fn intake(ctx: Arc<Ctx>, session: Arc<MqttSession>, restart: Vec<Order>) {
    if !restart.is_empty() {
        tracing::info!(
            orders = restart.len(),
            "running the orders recorded before the restart"
        );
    }
    for order in restart {
        dispatch(&ctx, order).await;
    }
    loop {
        let Ok(received) = session.next_order().await else {
            return;
        };
        tracing::debug!(redelivered = received.redelivered(), "order received");
        let order = match Envelope::from_json(&received.message.payload) {
            Ok(Envelope {
                message: Message::Order(o),
                ..
            }) => o,
            other => {
                let what = match other {
                    Ok(e) => format!("a {:?} message on the order topic", e.kind()),
                    Err(e) => format!("an undecodable order: {e}"),
                };
                tracing::warn!(%what, "ignored");
                ctx.exceptions
                    .record(Severity::Warning, "orders", &format!("ignored {what}"));
                // Acknowledged: it can never become valid, and must not block the queue.
                received.ack();
                continue;
            }
        };
        match record(&ctx, &order, &received.message.payload).await {
            Some(Recorded::New) => received.ack(),
            Some(Recorded::Duplicate) => {
                received.ack();
                tracing::debug!(order = %order.order_id, "repeated order acknowledged, not run again");
                continue;
            }
            // Not acknowledged: the broker delivers it again after a reconnection.
            None => continue,
        }
        dispatch(&ctx, order).await;
    }
}

/// Records an order in the journal (synced). While that fails for a reason that may pass (a
/// full disk, a journal full of orders in progress) it is tried again with back-off, the order
/// unacknowledged meanwhile: once recorded it is acknowledged and runs, without waiting for a
/// reconnection to bring it again. Orders behind it wait. `None` for an order the journal can
/// never take (larger than its limits): left unacknowledged.
async fn record(ctx: &Ctx, order: &Order, payload: &bytes::Bytes) -> Option<Recorded> {
    let recorded = outbound::until_done(
        &format!("order {}", order.order_id),
        || {
            let journal = ctx.journal.clone();
            let (o, p) = (order.clone(), payload.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    journal
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&o, p)
                })
                .await
                .map_err(|e| OutboxError::Io(std::io::Error::other(e.to_string())))?
            }
        },
        outbound::passing,
        |e| {
            tracing::error!(order = %order.order_id, error = %e, "order not recorded; trying again");
            ctx.exceptions.record(
                Severity::Error,
                "orders",
                &format!(
                    "order {} could not be recorded (trying again): {e}",
                    order.order_id
                ),
            );
        },
    )
    .await;
    match recorded {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(order = %order.order_id, error = %e, "order not recorded");
            ctx.exceptions.record(
                Severity::Error,
                "orders",
                &format!("order {} could not be recorded: {e}", order.order_id),
            );
            None
        }
    }
}

fn hello(ctx: &Ctx, config: &AgentConfig) -> AgentHello {
    let targets = ctx.status.snapshot();
    let reachable = targets.iter().filter(|t| t.reach == Reach::Ok).count();
    let devices: Vec<AgentDeviceSettings> = config
        .endpoints()
        .iter()
        .filter(|e| e.meta != crate::config::TargetMeta::default())
        .filter_map(|e| {
            let id = targets
                .iter()
                .find(|t| t.addr == e.addr)?
                .device_id
                .clone()?;
            Some(AgentDeviceSettings {
                device_id: orders::text(&id),
                display_name: e.meta.display_name.as_deref().map(orders::text),
                group_name: e.meta.group.as_deref().map(orders::text),
                comment: e.meta.comment.as_deref().map(orders::text),
            })
        })
        .take(epmc_proto::model::MAX_DEVICES)
        .collect();
    let locale = std::env::var("LC_ALL")
        .or_else(|_| std::env::var("LANG"))
        .ok()
        .map(|l| l.split(['.', '@']).next().unwrap_or_default().to_owned())
        .filter(|l| !l.is_empty() && l != "C" && l != "POSIX");
    AgentHello {
        agent_code: orders::text("epmc-agent"),
        version: orders::text(env!("CARGO_PKG_VERSION")),
        agent_id: ctx.publisher.agent().uuid(),
        connected_device_count: u32::try_from(reachable).unwrap_or(u32::MAX),
        language: locale
            .as_deref()
            .and_then(|l| l.split('_').next())
            .map(orders::text),
        locale: locale.as_deref().map(orders::text),
        devices: BoundedVec::new(devices).unwrap_or_default(),
    }
}

/// A hello on every new connection.
async fn greet(ctx: Arc<Ctx>, session: Arc<MqttSession>, config: AgentConfig) {
    let mut connection = session.watch_connection();
    loop {
        if connection.changed().await.is_err() {
            return;
        }
        let up = connection
            .borrow_and_update()
            .as_ref()
            .is_some_and(|c| c.is_connected());
        if up {
            ctx.publish(Message::Hello(hello(&ctx, &config))).await;
        }
    }
}

async fn send_exceptions(ctx: Arc<Ctx>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let entries = ctx.exceptions.take();
        if entries.is_empty() {
            continue;
        }
        if let Ok(entries) = BoundedVec::new(entries) {
            ctx.publish(Message::ExceptionLog(AgentExceptionLog { entries }))
                .await;
        }
    }
}

fn snapshot(ctx: &Ctx, session: &MqttSession) -> AgentStatus {
    AgentStatus {
        agent_id: ctx.publisher.agent().to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: match ctx.mode {
            Mode::Bidirectional => "bidirectional".into(),
            Mode::MonitorOnly => "monitor-only".into(),
        },
        written_at: Timestamp::now().unix(),
        server_connected: session.is_connected(),
        server_error: session.stats().last_error,
        outbox_messages: ctx.publisher.pending(),
        held_messages: ctx.publisher.held(),
        orders_in_progress: ctx
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_progress(),
        targets: ctx.status.snapshot(),
    }
}

async fn write_status(ctx: Arc<Ctx>, session: Arc<MqttSession>, dir: PathBuf, every: Duration) {
    let mut tick = tokio::time::interval(every);
    // The error of the last write, if it failed: a failure is logged when it starts or
    // changes, not at every tick (a full disk would repeat it every few seconds).
    let mut failing: Option<String> = None;
    loop {
        tick.tick().await;
        let s = snapshot(&ctx, &session);
        let dir = dir.clone();
        match tokio::task::spawn_blocking(move || status::write(&dir, &s)).await {
            Ok(Err(e)) => {
                let e = e.to_string();
                if failing.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "status file not written (logged again when the error changes)");
                }
                failing = Some(e);
            }
            Ok(Ok(())) if failing.take().is_some() => {
                tracing::info!("status file written again");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_grace_is_the_bound_until_an_answer_is_seen() {
        let pace = Pace::new(500 * MS);
        assert_eq!(pace.typical(), None);
        assert_eq!(pace.grace(false), 500 * MS);
        assert_eq!(pace.grace(true), 500 * MS);
    }

    #[test]
    fn the_grace_follows_the_typical_reply_time() {
        let pace = Pace::new(500 * MS);
        for _ in 0..50 {
            pace.observe(20 * MS);
        }
        assert_eq!(pace.typical(), Some(20 * MS));
        assert_eq!(pace.grace(false), 20 * MS * Pace::GRACE_REPLIES);
        assert_eq!(pace.grace(true), 20 * MS, "a suspect: one reply time");
        // Slower replies lengthen it, up to the bound.
        for _ in 0..200 {
            pace.observe(90 * MS);
        }
        // (The integer average settles within a few microseconds of the samples.)
        let near = |d: Duration, want: Duration| d.abs_diff(want) <= Duration::from_micros(20);
        assert!(near(pace.grace(false), 360 * MS), "{:?}", pace.grace(false));
        for _ in 0..200 {
            pace.observe(10 * 500 * MS);
        }
        let typical = pace.typical().unwrap();
        assert!(
            near(typical, 500 * MS),
            "a sample counts at most the bound: {typical:?}"
        );
        assert_eq!(pace.grace(false), 500 * MS);
        assert!(near(pace.grace(true), 500 * MS));
    }

    #[test]
    fn fast_replies_do_not_make_the_grace_vanish() {
        let pace = Pace::new(500 * MS);
        for _ in 0..50 {
            pace.observe(Duration::from_micros(200));
        }
        assert_eq!(pace.grace(false), Pace::MIN_GRACE);
        assert_eq!(pace.grace(true), Pace::MIN_SUSPECT_GRACE);
        pace.observe(Duration::ZERO);
        assert!(pace.typical().is_some(), "zero is not 'nothing seen'");
    }

    #[test]
    fn one_slow_answer_moves_the_average_by_an_eighth() {
        let pace = Pace::new(Duration::from_secs(5));
        pace.observe(20 * MS);
        pace.observe(820 * MS);
        assert_eq!(pace.typical(), Some(120 * MS));
    }
}
