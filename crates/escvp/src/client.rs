//! Async ESC/VP.net client (feature `tokio`).
//!
//! A [`Client`] is a handle to a background task that owns the TCP connection and a
//! [`Session`]. Commands are serialized (one in flight, the rest queued); every call ends with
//! a value or a typed error within the command's deadline from the ESC/VP21 timing rules,
//! whatever the projector does. Unsolicited `IMEVENT` notifications arrive on
//! [`Client::events`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), escvp::client::ClientError> {
//! use escvp::client::{Client, ClientConfig};
//! use escvp::value::{Power, PowerCommand};
//!
//! let client = Client::connect("192.0.2.10:3629", ClientConfig::default()).await?;
//! if !client.get::<Power>().await?.is_on() {
//!     client.power(PowerCommand::On).await?; // returns after warm-up
//! }
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::ValueError;
use crate::net::Password;
use crate::session::{
    Answer, CloseReason, CommandError, CommandId, ConnectError, Event, QuietPeriods, SendError,
    Session, SessionConfig, StatusChange,
};
use crate::value::{PowerCommand, Property, WireValue};
use crate::vp21::Command;

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Session settings (password, handshake timeout, queue size, timeout scale).
    pub session: SessionConfig,
    /// How long the TCP connection may take to open.
    pub connect_timeout: Duration,
    /// How long a write may block before the connection is considered dead.
    pub write_timeout: Duration,
    /// How many events a slow [`Events`] receiver may fall behind before it loses some.
    pub event_capacity: usize,
    /// Where the quiet period after `PWR OFF` is remembered per projector address, so that a
    /// new connection to a projector switched off moments ago sends nothing until it ends.
    /// The default is shared by every client of the process.
    pub quiet_periods: QuietRegistry,
}

/// Quiet periods after `PWR OFF`, per projector address, shared by the clients that hold a
/// clone of it (see [`ClientConfig::quiet_periods`]).
#[derive(Clone, Debug, Default)]
pub struct QuietRegistry(Arc<Mutex<QuietPeriods<SocketAddr>>>);

impl QuietRegistry {
    /// A registry of its own (e.g. for a test that must not see other clients' periods).
    pub fn new() -> Self {
        QuietRegistry::default()
    }

    /// The registry shared by every client of this process (the default).
    pub fn process() -> Self {
        static SHARED: OnceLock<QuietRegistry> = OnceLock::new();
        SHARED.get_or_init(QuietRegistry::new).clone()
    }

    /// The end of `addr`'s quiet period, if one is running.
    pub fn until(&self, addr: SocketAddr) -> Option<std::time::Instant> {
        self.lock().until(&addr, Instant::now().into_std())
    }

    fn record(&self, addr: SocketAddr, until: std::time::Instant) {
        self.lock().record(addr, until, Instant::now().into_std());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QuietPeriods<SocketAddr>> {
        // The map stays consistent even if a holder panicked.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            session: SessionConfig::default(),
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            event_capacity: 64,
            quiet_periods: QuietRegistry::process(),
        }
    }
}

impl ClientConfig {
    /// Sets the projector password.
    pub fn with_password(mut self, password: Password) -> Self {
        self.session.password = Some(password);
        self
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("cannot connect: {0}")]
    Io(#[from] std::io::Error),
    /// The TCP connection did not open in time.
    #[error("connection attempt timed out")]
    ConnectTimedOut,
    /// The ESC/VP.net handshake failed.
    #[error(transparent)]
    Handshake(ConnectError),
    /// The command failed (refused, timed out, connection closed).
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The command could not be queued.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The projector's answer is not a valid value of the type asked for.
    #[error("unexpected answer: {0}")]
    BadValue(#[from] ValueError),
    /// The answer has the wrong shape (e.g. an acknowledgement to a query).
    #[error("unexpected answer shape: {0:?}")]
    UnexpectedAnswer(Answer),
    /// The client's background task has stopped.
    #[error("the client is closed")]
    Closed,
}

/// What [`Client::events`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// An IMEVENT status change.
    Status(StatusChange),
    /// An IMEVENT that could not be decoded (raw text).
    MalformedStatus(String),
    /// The connection closed.
    Closed(CloseReason),
}

/// A receiver of [`ClientEvent`]s.
#[derive(Debug)]
pub struct Events(broadcast::Receiver<ClientEvent>);

impl Events {
    /// The next event; `None` once the client is gone and every event was read. Events a
    /// slow receiver missed are skipped (with a log line).
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        loop {
            match self.0.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "event receiver lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

type Reply = oneshot::Sender<Result<Answer, ClientError>>;

/// A connection to one projector. Cheap to clone; the connection closes when the last clone
/// is dropped or [`Client::close`] is called.
#[derive(Clone, Debug)]
pub struct Client {
    tx: mpsc::Sender<(Command, Reply)>,
    events: broadcast::Sender<ClientEvent>,
}

impl Client {
    /// Opens a TCP connection and performs the CONNECT handshake.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::ConnectTimedOut)??;
        stream.set_nodelay(true)?;
        Client::handshake(stream, config).await
    }

    /// Performs the handshake on an already open stream. Commands wait for the end of a quiet
    /// period still running from an earlier connection to the same address.
    pub async fn handshake(stream: TcpStream, config: ClientConfig) -> Result<Client, ClientError> {
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let (tx, rx) = mpsc::channel(config.session.max_queue.max(1));
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut session = Session::new(config.session.clone(), Instant::now().into_std());
        let peer = stream.peer_addr().ok();
        if let Some(until) = peer.and_then(|addr| config.quiet_periods.until(addr)) {
            tracing::debug!(?peer, "quiet period after PWR OFF still running");
            session.hold_until(until);
        }
        let driver = Driver {
            quiet: peer.map(|addr| (addr, config.quiet_periods.clone())),
            recorded: None,
            stream,
            session,
            rx,
            events: events.clone(),
            pending: Vec::new(),
            ready: Some(ready_tx),
            write_timeout: config.write_timeout,
        };
        tokio::spawn(driver.run());
        match ready_rx.await {
            Ok(Ok(())) => Ok(Client { tx, events }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Subscribes to status notifications.
    pub fn events(&self) -> Events {
        Events(self.events.subscribe())
    }

    /// Sends any command and returns the projector's answer.
    pub async fn execute(&self, command: Command) -> Result<Answer, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((command, tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Reads a typed property, e.g. `client.get::<Power>()`.
    pub async fn get<P: Property>(&self) -> Result<P::Value, ClientError> {
        match self.execute(P::query()).await? {
            Answer::Value(v) => Ok(P::Value::parse_value(&v)?),
            other => Err(ClientError::UnexpectedAnswer(other)),
        }
    }

    /// Sets a typed property, e.g. `client.set::<Source>(&SourceCode::HDMI1)`.
    pub async fn set<P: Property>(&self, value: &P::Value) -> Result<(), ClientError> {
        match self.execute(P::set(value)?).await? {
            Answer::Ack => Ok(()),
            other => Err(ClientError::UnexpectedAnswer(other)),
        }
    }

    /// `PWR ON` (returns after warm-up) or `PWR OFF`.
    pub async fn power(&self, command: PowerCommand) -> Result<(), ClientError> {
        match self.execute(command.command()).await? {
            Answer::Ack => Ok(()),
            other => Err(ClientError::UnexpectedAnswer(other)),
        }
    }

    /// The null command: checks that the projector answers.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.execute(Command::Null).await.map(|_| ())
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Drops this handle. The connection closes, after the commands already queued have
    /// completed, once every clone of the client is dropped.
    pub fn close(self) {
        drop(self);
    }
}

struct Driver {
    /// The projector's address and where its quiet periods are remembered.
    quiet: Option<(SocketAddr, QuietRegistry)>,
    /// The last quiet period recorded there.
    recorded: Option<std::time::Instant>,
    stream: TcpStream,
    session: Session,
    rx: mpsc::Receiver<(Command, Reply)>,
    events: broadcast::Sender<ClientEvent>,
    pending: Vec<(CommandId, Reply)>,
    ready: Option<oneshot::Sender<Result<(), ClientError>>>,
    write_timeout: Duration,
}

impl Driver {
    async fn run(mut self) {
        let mut buf = vec![0u8; 4096];
        let mut accepting = true;
        loop {
            if !self.flush().await {
                self.session.handle_peer_closed();
            }
            self.dispatch_events();
            if self.session.close_reason().is_some() {
                break;
            }
            let deadline = self.session.poll_timeout().map(Instant::from_std);
            tokio::select! {
                read = self.stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => self.session.handle_peer_closed(),
                    Ok(n) => self.session.handle_input(&buf[..n], Instant::now().into_std()),
                },
                cmd = self.rx.recv(), if accepting => match cmd {
                    Some((command, reply)) => {
                        match self.session.send(command, Instant::now().into_std()) {
                            Ok(id) => self.pending.push((id, reply)),
                            Err(e) => { let _ = reply.send(Err(e.into())); }
                        }
                    }
                    None => {
                        accepting = false;
                        if self.session.pending() == 0 {
                            self.session.close(CloseReason::Local);
                        }
                    }
                },
                _ = sleep_until(deadline) => {
                    self.session.handle_timeout(Instant::now().into_std());
                }
            }
            self.remember_quiet_period();
            if !accepting && self.session.pending() == 0 {
                self.session.close(CloseReason::Local);
            }
        }
        self.dispatch_events();
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(ClientError::Closed));
        }
        let _ = self.stream.shutdown().await;
    }

    /// Records a new quiet period (after a `PWR OFF` colon) for later connections.
    fn remember_quiet_period(&mut self) {
        let until = self.session.quiet_until();
        if until.is_some() && until != self.recorded {
            self.recorded = until;
            if let (Some((addr, registry)), Some(until)) = (&self.quiet, until) {
                registry.record(*addr, until);
            }
        }
    }

    async fn flush(&mut self) -> bool {
        while let Some(bytes) = self.session.poll_transmit() {
            match tokio::time::timeout(self.write_timeout, self.stream.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
        true
    }

    fn dispatch_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Connected => {
                    if let Some(r) = self.ready.take() {
                        let _ = r.send(Ok(()));
                    }
                }
                Event::Completed { id, result } => {
                    if let Some(i) = self.pending.iter().position(|(p, _)| *p == id) {
                        let (_, reply) = self.pending.swap_remove(i);
                        let _ = reply.send(result.map_err(ClientError::from));
                    }
                }
                Event::Status(s) => {
                    let _ = self.events.send(ClientEvent::Status(s));
                }
                Event::MalformedStatus(s) => {
                    let _ = self.events.send(ClientEvent::MalformedStatus(s));
                }
                Event::Unexpected(text) => {
                    tracing::debug!(%text, "unexpected reply ignored");
                }
                Event::Closed(reason) => {
                    if let Some(r) = self.ready.take() {
                        let err = match reason.clone() {
                            CloseReason::Handshake(e) => ClientError::Handshake(e),
                            other => ClientError::Command(CommandError::Closed(other)),
                        };
                        let _ = r.send(Err(err));
                    }
                    let _ = self.events.send(ClientEvent::Closed(reason));
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
