//! A projector emulator with fault injection (feature `emulator`).
//!
//! Each emulated projector listens on TCP (ESC/VP.net sessions) and UDP (HELLO discovery) on
//! one port, and behaves like a real one:
//! - CONNECT first: `0x20` OK, `0x41` when a password is needed and missing, `0x43` when it is
//!   wrong, `0x45` for HELLO on TCP, `0x55` for another version, `0x40` for a malformed header,
//!   `0x53` when another controller holds the session (one session at a time) or the busy
//!   fault is set. Refusals close the connection, as on real projectors.
//! - Power: `PWR?` 04 (standby, network on) → `PWR ON` → 02 warm-up → 01 on → `PWR OFF` →
//!   03 cool-down → 04. The `PWR ON` colon comes after warm-up. Power commands during warm-up
//!   or cool-down, and picture commands in standby, get `ERR`.
//! - Sources from its own `SOURCELIST`, A/V mute, volume, colour mode, lamp hours that grow
//!   while the light is on (at a configurable speed), error code, serial number, model.
//! - `IMEVENT` pushed to the open session on every power, warning or alarm change.
//! - Faults, settable at start and at run time through a [`ProjectorHandle`]: slow replies,
//!   partial writes, garbage, connection drops, busy, `ERR` for the next N commands, silence,
//!   IMEVENT before each reply.
//! - Optionally ([`ProjectorConfig::http`]) the HTTP control interface on a port of its own:
//!   `GET /cgi-bin/json_query?jsoncallback=CMD?` answered from the same state as ESC/VP21
//!   (`{"projector":{"feature":{…,"reply":"04","error":false}}}`, `ERR` with `"error":true`),
//!   `GET /cgi-bin/directsend?CMD=VALUE` for sets, HTTP Digest authentication (user
//!   `EPSONWEB`, the projector's password; MD5 or SHA-256) with `401` on bad credentials,
//!   `403` for queries outside an optional whitelist, and the same faults as the TCP side,
//!   set separately ([`HttpConfig::faults`], [`ProjectorHandle::set_http_faults`]).
//! - The ESC/VP.net TCP port can be closed or made to drop every connection
//!   ([`TcpService`]) to emulate projectors reachable only over HTTP.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use escvp::emulator::{Fleet, HttpConfig, ProjectorConfig, TcpService};
//!
//! let fleet = Fleet::spawn_consecutive("127.0.0.1:0".parse().unwrap(), 3, ProjectorConfig::default()).await?;
//! for p in fleet.projectors() {
//!     println!("{} {} tcp {} udp {}", p.name(), p.serial(), p.tcp_addr(), p.udp_addr());
//! }
//! // One projector that only answers over HTTP, with Digest authentication.
//! let web_only = ProjectorConfig::default()
//!     .with_password(escvp::net::Password::new("secret").unwrap())
//!     .with_http(HttpConfig::default())
//!     .with_tcp(TcpService::Closed);
//! let fleet = Fleet::spawn([("127.0.0.1:0".parse().unwrap(), web_only)]).await?;
//! println!("json_query at http://{}", fleet.projectors()[0].http_addr().unwrap());
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::event::{Alarms, ImStatus, StatusReport, Warnings};
pub use crate::http::DigestAlgorithm;
use crate::net::{
    HeaderId, Info, MAX_MESSAGE_LEN, Message, MessageType, Password, Status, Version,
};
use crate::value::{
    AspectMode, ColorMode, ErrorCode, LuminanceMode, MuteScreen, PowerCode, SignalState,
    SourceCode, SourceList, WireValue,
};
use crate::vp21::{OwnedRequest, RequestDecoder};

/// How a successful set is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckStyle {
    /// `:` alone, as real projectors do.
    Colon,
    /// `\r:`, as several other emulators do.
    CrColon,
}

/// Faults to inject. All off by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Wait this long before each reply.
    pub reply_delay: Duration,
    /// Write each reply in chunks of this many bytes, pausing [`Faults::chunk_pause`] between.
    pub chunk_size: Option<usize>,
    /// Pause between chunks.
    pub chunk_pause: Duration,
    /// Bytes written before each reply.
    pub garbage: Vec<u8>,
    /// Close the connection after answering this many more commands (0: at the next one,
    /// without answering it).
    pub drop_after: Option<u32>,
    /// Refuse CONNECT with `0x53` busy.
    pub busy: bool,
    /// Answer `ERR` to the next N commands.
    pub err_next: u32,
    /// Read commands but never answer.
    pub silent: bool,
    /// Send an `IMEVENT` line before each reply.
    pub imevent_before_reply: bool,
}

#[path = "emulator_http.rs"]
mod http_side;

/// What the emulated projector does on its ESC/VP.net TCP port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TcpService {
    /// ESC/VP.net sessions (the default).
    #[default]
    Open,
    /// Nothing listens: connections are refused (the port is only used for UDP).
    Closed,
    /// Connections are accepted and closed at once, before any reply.
    AcceptAndClose,
    /// "Command communication: Protected": an ESC/VP.net 1.0 CONNECT is refused with `0x45`
    /// (request not allowed) and the connection closed, as on projectors that accept only
    /// version 2.0 there.
    Protected,
}

/// The HTTP control interface of an emulated projector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// Port on the projector's address; 0 picks a free one. For a fleet on consecutive ports
    /// a non-zero port is shifted like the TCP port.
    pub port: u16,
    /// The Digest algorithm of the challenges (the password is the projector's; without one
    /// the interface is open, as on older models).
    pub algorithm: DigestAlgorithm,
    /// Commands `json_query` answers; others get `403 Forbidden` (as on models that
    /// whitelist commands). `None`: every command.
    pub allowed_queries: Option<Vec<String>>,
    /// Faults of the HTTP side (independent of [`ProjectorConfig::faults`]): reply delay,
    /// partial writes, garbage before the status line, drop (close without a response),
    /// silence, `ERR` for the next N queries, busy (`503`).
    pub faults: Faults,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            port: 0,
            algorithm: DigestAlgorithm::Md5,
            allowed_queries: None,
            faults: Faults::default(),
        }
    }
}

impl HttpConfig {
    /// Sets the port.
    pub fn with_port(mut self, port: u16) -> HttpConfig {
        self.port = port;
        self
    }

    /// Sets the Digest algorithm.
    pub fn with_algorithm(mut self, algorithm: DigestAlgorithm) -> HttpConfig {
        self.algorithm = algorithm;
        self
    }

    /// Answers only these queries (others: `403`).
    pub fn with_allowed_queries<S: Into<String>>(
        mut self,
        commands: impl IntoIterator<Item = S>,
    ) -> HttpConfig {
        self.allowed_queries = Some(commands.into_iter().map(Into::into).collect());
        self
    }

    /// Sets the HTTP faults.
    pub fn with_faults(mut self, faults: Faults) -> HttpConfig {
        self.faults = faults;
        self
    }
}

/// Settings of one emulated projector.
#[derive(Clone, Debug)]
pub struct ProjectorConfig {
    /// Name in HELLO replies (at most 16 bytes).
    pub name: String,
    /// `SNO?` value.
    pub serial: String,
    /// `PJINFO?` value.
    pub model: String,
    /// IM-Type in HELLO replies.
    pub im_type: u8,
    /// ESC/VP.net password, if any.
    pub password: Option<Password>,
    /// Inputs (`SOURCELIST?`).
    pub sources: SourceList,
    /// Warm-up duration (`PWR ON` answers after it).
    pub warm_up: Duration,
    /// Cool-down duration.
    pub cool_down: Duration,
    /// Light-source hours at start, one entry per light source.
    pub lamp_hours: Vec<u32>,
    /// Operation hours at start.
    pub on_time_hours: u32,
    /// Emulated hours per real second while the light is on (e.g. 3600.0 = one hour per
    /// second).
    pub hours_per_second: f64,
    /// How sets are acknowledged.
    pub ack_style: AckStyle,
    /// Close a session after this long without a command.
    pub idle_timeout: Duration,
    /// Longest command line accepted; longer lines get `ERR` and the connection closes.
    pub max_line_len: usize,
    /// Start with the light on.
    pub start_on: bool,
    /// Faults active from the start.
    pub faults: Faults,
    /// The HTTP control interface, if served (off by default).
    pub http: Option<HttpConfig>,
    /// What the ESC/VP.net TCP port does ([`TcpService::Open`] by default).
    pub tcp: TcpService,
}

impl ProjectorConfig {
    /// Sets the ESC/VP.net (and HTTP Digest) password.
    pub fn with_password(mut self, password: Password) -> ProjectorConfig {
        self.password = Some(password);
        self
    }

    /// Serves the HTTP control interface too.
    pub fn with_http(mut self, http: HttpConfig) -> ProjectorConfig {
        self.http = Some(http);
        self
    }

    /// Sets what the ESC/VP.net TCP port does.
    pub fn with_tcp(mut self, tcp: TcpService) -> ProjectorConfig {
        self.tcp = tcp;
        self
    }

    /// Sets the faults of the ESC/VP.net side.
    pub fn with_faults(mut self, faults: Faults) -> ProjectorConfig {
        self.faults = faults;
        self
    }
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            name: "EMU-PJ".into(),
            serial: "EMU0000001".into(),
            model: "EB-EMU1".into(),
            im_type: 0x30,
            password: None,
            sources: SourceList::new(vec![
                (SourceCode::HDMI1, "HDMI1".into()),
                (SourceCode::HDMI2, "HDMI2".into()),
                (SourceCode::COMPUTER1, "Computer1".into()),
                (SourceCode::LAN, "LAN".into()),
            ])
            .unwrap_or_default(),
            warm_up: Duration::from_secs(30),
            cool_down: Duration::from_secs(10),
            lamp_hours: vec![1200],
            on_time_hours: 2400,
            hours_per_second: 1.0,
            ack_style: AckStyle::Colon,
            idle_timeout: Duration::from_secs(600),
            max_line_len: 256,
            start_on: false,
            faults: Faults::default(),
            http: None,
            tcp: TcpService::Open,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Power {
    Standby,
    WarmUp { until: Instant },
    On,
    CoolDown { until: Instant },
}

#[derive(Debug)]
struct State {
    config: ProjectorConfig,
    power: Power,
    source: SourceCode,
    mute: bool,
    mute_screen: MuteScreen,
    freeze: bool,
    volume: u32,
    color_mode: ColorMode,
    luminance: LuminanceMode,
    lum_level: u32,
    aspect: AspectMode,
    signal: SignalState,
    error: ErrorCode,
    warnings: Warnings,
    alarms: Alarms,
    /// Light-on seconds accumulated before `on_since`.
    lit_seconds: f64,
    on_since: Option<Instant>,
    faults: Faults,
    session_active: bool,
    commands: u64,
    /// Faults of the HTTP side.
    http_faults: Faults,
    /// Digest nonces handed out, newest last (bounded).
    http_nonces: VecDeque<String>,
    /// HTTP requests received.
    http_requests: u64,
}

impl State {
    fn im_status(&self) -> ImStatus {
        if !self.alarms.is_empty() {
            return ImStatus::ABNORMAL;
        }
        match self.power {
            Power::Standby => ImStatus::STANDBY,
            Power::WarmUp { .. } => ImStatus::WARM_UP,
            Power::On => ImStatus::NORMAL,
            Power::CoolDown { .. } => ImStatus::COOL_DOWN,
        }
    }

    fn power_code(&self) -> PowerCode {
        if !self.alarms.is_empty() && self.power == Power::Standby {
            return PowerCode::ABNORMAL_STANDBY;
        }
        match self.power {
            Power::Standby => PowerCode::STANDBY_NETWORK_ON,
            Power::WarmUp { .. } => PowerCode::WARM_UP,
            Power::On => PowerCode::ON,
            Power::CoolDown { .. } => PowerCode::COOL_DOWN,
        }
    }

    fn status_value(&self, with_code: bool) -> String {
        let report = StatusReport {
            event_code: with_code.then_some(1),
            status: self.im_status(),
            warnings: self.warnings,
            alarms: self.alarms,
            extra: "T1 F1",
        };
        let mut s = String::new();
        let _ = report.write_value(&mut s);
        s
    }

    fn lit_hours(&self, now: Instant) -> f64 {
        let current = self
            .on_since
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        (self.lit_seconds + current) * self.config.hours_per_second
    }

    fn light(&mut self, on: bool, now: Instant) {
        match (on, self.on_since) {
            (true, None) => self.on_since = Some(now),
            (false, Some(t)) => {
                self.lit_seconds += now.saturating_duration_since(t).as_secs_f64();
                self.on_since = None;
            }
            _ => {}
        }
    }

    /// Applies time-driven transitions; returns whether the status changed.
    fn tick(&mut self, now: Instant) -> bool {
        match self.power {
            Power::WarmUp { until } if now >= until => {
                self.power = Power::On;
                true
            }
            Power::CoolDown { until } if now >= until => {
                self.power = Power::Standby;
                true
            }
            _ => false,
        }
    }

    fn next_transition(&self) -> Option<Instant> {
        match self.power {
            Power::WarmUp { until } | Power::CoolDown { until } => Some(until),
            _ => None,
        }
    }
}

/// What the state machine decided about one command.
enum Outcome {
    /// Reply now.
    Reply(Vec<u8>),
    /// Reply when warm-up ends (`PWR ON`).
    AtWarmUpEnd(Vec<u8>),
}

struct Shared {
    state: Mutex<State>,
    /// Status changes, as IMEVENT values, for the open session.
    pushes: broadcast::Sender<String>,
    /// Wakes the transition timer after a state change.
    wake: Notify,
    /// Tells the open session to close now.
    kick: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this module; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self, state: &State) {
        let _ = self.pushes.send(state.status_value(true));
        self.wake.notify_one();
    }
}

/// Control handle of one running emulated projector.
#[derive(Clone)]
pub struct ProjectorHandle {
    shared: Arc<Shared>,
    tcp: SocketAddr,
    udp: SocketAddr,
    http: Option<SocketAddr>,
    name: String,
    serial: String,
}

impl std::fmt::Debug for ProjectorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectorHandle")
            .field("name", &self.name)
            .field("tcp", &self.tcp)
            .finish()
    }
}

impl ProjectorHandle {
    /// The TCP address (ESC/VP.net sessions).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// The UDP address (HELLO).
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    /// The HTTP address (`json_query`), if the projector serves HTTP.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// Replaces the faults of the HTTP side.
    pub fn set_http_faults(&self, faults: Faults) {
        self.shared.lock().http_faults = faults;
    }

    /// Edits the faults of the HTTP side.
    pub fn update_http_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.lock().http_faults);
    }

    /// Number of HTTP requests received so far (answered or not).
    pub fn http_requests_seen(&self) -> u64 {
        self.shared.lock().http_requests
    }

    /// The projector name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The current `PWR?` code.
    pub fn power_code(&self) -> PowerCode {
        let mut s = self.shared.lock();
        if s.tick(Instant::now()) {
            self.shared.changed(&s);
        }
        s.power_code()
    }

    /// Number of commands answered or refused so far (all sessions).
    pub fn commands_seen(&self) -> u64 {
        self.shared.lock().commands
    }

    /// Replaces the active faults.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    /// Edits the active faults.
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.lock().faults);
    }

    /// Sets the `ERR?` code.
    pub fn set_error(&self, code: ErrorCode) {
        self.shared.lock().error = code;
    }

    /// Sets the warning bits (pushes IMEVENT if they change).
    pub fn set_warnings(&self, warnings: Warnings) {
        let mut s = self.shared.lock();
        if s.warnings != warnings {
            s.warnings = warnings;
            self.shared.changed(&s);
        }
    }

    /// Sets the alarm bits (pushes IMEVENT if they change). Any alarm makes the status
    /// abnormal.
    pub fn set_alarms(&self, alarms: Alarms) {
        let mut s = self.shared.lock();
        if s.alarms != alarms {
            s.alarms = alarms;
            self.shared.changed(&s);
        }
    }

    /// Sets the `SIGNAL?` state.
    pub fn set_signal(&self, signal: SignalState) {
        self.shared.lock().signal = signal;
    }

    /// Closes the open session now, without a reply.
    pub fn drop_connection(&self) {
        self.shared.kick.send_modify(|n| *n += 1);
    }
}

/// A set of running emulated projectors. Dropping it stops them.
pub struct Fleet {
    projectors: Vec<ProjectorHandle>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.projectors).finish()
    }
}

impl Fleet {
    /// Starts one projector per `(address, config)`. Port 0 picks a free port (the same one
    /// for TCP and UDP).
    pub async fn spawn(
        projectors: impl IntoIterator<Item = (SocketAddr, ProjectorConfig)>,
    ) -> std::io::Result<Fleet> {
        let mut fleet = Fleet {
            projectors: Vec::new(),
            tasks: JoinSet::new(),
        };
        for (addr, config) in projectors {
            let handle = start(addr, config, &mut fleet.tasks).await?;
            fleet.projectors.push(handle);
        }
        Ok(fleet)
    }

    /// Starts `count` projectors from one template: on consecutive ports from `first` (port
    /// 0: free ports), each with a distinct name and serial number.
    pub async fn spawn_consecutive(
        first: SocketAddr,
        count: usize,
        template: ProjectorConfig,
    ) -> std::io::Result<Fleet> {
        Fleet::spawn(fleet_plan(first, count, false, &template)).await
    }

    /// The running projectors.
    pub fn projectors(&self) -> &[ProjectorHandle] {
        &self.projectors
    }

    /// Stops every projector.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Addresses and configs for a fleet: consecutive ports from `first` (or, with
/// `vary_address`, consecutive IPv4 addresses on the same port); names and serials numbered.
pub fn fleet_plan(
    first: SocketAddr,
    count: usize,
    vary_address: bool,
    template: &ProjectorConfig,
) -> Vec<(SocketAddr, ProjectorConfig)> {
    (0..count)
        .map(|i| {
            let mut addr = first;
            if vary_address {
                if let IpAddr::V4(v4) = first.ip() {
                    addr.set_ip(IpAddr::V4(u32::from(v4).wrapping_add(i as u32).into()));
                }
            } else if first.port() != 0 {
                addr.set_port(first.port().wrapping_add(i as u16));
            }
            let mut config = template.clone();
            if !vary_address
                && let Some(h) = config.http.as_mut()
                && h.port != 0
            {
                h.port = h.port.wrapping_add(i as u16);
            }
            let suffix = format!("{:03}", i + 1);
            let keep = 16usize.saturating_sub(suffix.len() + 1);
            config.name = format!(
                "{}-{}",
                &template.name[..template.name.len().min(keep)],
                suffix
            );
            let stem = &template.serial[..template.serial.len().saturating_sub(4)];
            config.serial = format!("{stem}{:04}", i + 1);
            (addr, config)
        })
        .collect()
}

async fn start(
    addr: SocketAddr,
    config: ProjectorConfig,
    tasks: &mut JoinSet<()>,
) -> std::io::Result<ProjectorHandle> {
    let (tcp, udp) = bind_pair(addr, config.tcp != TcpService::Closed).await?;
    let tcp_addr = tcp.local_addr()?;
    let udp_addr = udp.local_addr()?;
    let http = match &config.http {
        Some(h) => Some(TcpListener::bind(SocketAddr::new(addr.ip(), h.port)).await?),
        None => None,
    };
    let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
    let now = Instant::now();
    let name = config.name.clone();
    let serial = config.serial.clone();
    let state = State {
        power: if config.start_on {
            Power::On
        } else {
            Power::Standby
        },
        source: config
            .sources
            .entries()
            .first()
            .map(|e| e.0)
            .unwrap_or(SourceCode::HDMI1),
        mute: false,
        mute_screen: MuteScreen::BLACK,
        freeze: false,
        volume: 120,
        color_mode: ColorMode::PRESENTATION,
        luminance: LuminanceMode::NORMAL,
        lum_level: 255,
        aspect: AspectMode::AUTO,
        signal: SignalState::DETECTED,
        error: ErrorCode::NONE,
        warnings: Warnings::NONE,
        alarms: Alarms::NONE,
        lit_seconds: 0.0,
        on_since: config.start_on.then_some(now),
        faults: config.faults.clone(),
        session_active: false,
        commands: 0,
        http_faults: config
            .http
            .as_ref()
            .map(|h| h.faults.clone())
            .unwrap_or_default(),
        http_nonces: VecDeque::new(),
        http_requests: 0,
        config,
    };
    let (pushes, _) = broadcast::channel(64);
    let (kick, _) = watch::channel(0);
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        pushes,
        wake: Notify::new(),
        kick,
    });
    let tcp_service = shared.lock().config.tcp;
    match (tcp, tcp_service) {
        (TcpPort::Listening(tcp), TcpService::AcceptAndClose) => {
            tasks.spawn(accept_and_close(tcp));
        }
        (TcpPort::Listening(tcp), _) => {
            tasks.spawn(serve_tcp(tcp, shared.clone()));
        }
        // Bound, not listening: connections are refused, and the port stays the projector's
        // for as long as its other tasks run.
        (TcpPort::Reserved(port), _) => {
            tasks.spawn(async move {
                let _kept = port;
                std::future::pending::<()>().await;
            });
        }
    }
    if let Some(listener) = http {
        tasks.spawn(http_side::serve_http(listener, shared.clone()));
    }
    tasks.spawn(serve_udp(udp, shared.clone()));
    tasks.spawn(run_timer(shared.clone()));
    tracing::info!(%tcp_addr, %name, "emulated projector listening");
    Ok(ProjectorHandle {
        shared,
        tcp: tcp_addr,
        udp: udp_addr,
        http: http_addr,
        name,
        serial,
    })
}

/// A TCP port on which nothing listens and which no other socket on this machine can take
/// while this value lives: connections to it are refused. An emulated projector with
/// [`TcpService::Closed`] holds one, and tests of unreachable targets may use one too. (A port
/// found by binding a listener and closing it is free for the next listener, so a connection
/// meant to be refused may reach someone else instead.)
#[derive(Debug)]
pub struct ClosedPort {
    /// Never read: holding it is the reservation.
    _socket: TcpSocket,
    addr: SocketAddr,
}

impl ClosedPort {
    /// Reserves a free port on `ip`.
    pub fn on(ip: IpAddr) -> std::io::Result<ClosedPort> {
        ClosedPort::at(SocketAddr::new(ip, 0))
    }

    /// Reserves `addr` (port 0 picks a free one).
    pub fn at(addr: SocketAddr) -> std::io::Result<ClosedPort> {
        let socket = tcp_socket(addr)?;
        // Without SO_REUSEADDR, so that no other socket may share the port.
        socket.bind(addr)?;
        let addr = socket.local_addr()?;
        Ok(ClosedPort {
            _socket: socket,
            addr,
        })
    }

    /// The reserved address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn tcp_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// The TCP side of a projector's port: a listener, or, for [`TcpService::Closed`], a
/// [`ClosedPort`] that keeps the port number for the projector's UDP side.
enum TcpPort {
    Listening(TcpListener),
    Reserved(ClosedPort),
}

impl TcpPort {
    fn bind(addr: SocketAddr, listen: bool) -> std::io::Result<TcpPort> {
        if !listen {
            return ClosedPort::at(addr).map(TcpPort::Reserved);
        }
        let socket = tcp_socket(addr)?;
        // As `TcpListener::bind` does: a restarted emulator may take its port back while
        // old connections linger in TIME_WAIT.
        #[cfg(not(windows))]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(TcpPort::Listening(socket.listen(1024)?))
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            TcpPort::Listening(l) => l.local_addr(),
            TcpPort::Reserved(c) => Ok(c.addr()),
        }
    }
}

/// Binds TCP and UDP on the same port; with port 0, retries until a port is free for both.
async fn bind_pair(addr: SocketAddr, listen: bool) -> std::io::Result<(TcpPort, UdpSocket)> {
    let mut last_err = None;
    for _ in 0..32 {
        let tcp = TcpPort::bind(addr, listen)?;
        let mut udp_addr = addr;
        udp_addr.set_port(tcp.local_addr()?.port());
        match UdpSocket::bind(udp_addr).await {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) if addr.port() == 0 => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no free port for TCP and UDP")))
}

async fn run_timer(shared: Arc<Shared>) {
    loop {
        let next = {
            let mut s = shared.lock();
            let now = Instant::now();
            if s.tick(now) {
                if s.power == Power::Standby {
                    s.light(false, now);
                }
                shared.changed(&s);
            }
            s.next_transition()
        };
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = shared.wake.notified() => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok((_, msg)) = Message::decode(&buf[..n]) else {
            continue;
        };
        if msg.status() != Status::REQUEST {
            continue; // a reply, or our own echo
        }
        let reply = if msg.version() != Version::V1_0 {
            Message::reply_to(&msg, Status::VERSION_NOT_SUPPORTED)
        } else if msg.kind() != MessageType::HELLO {
            Message::reply_to(&msg, Status::NOT_ALLOWED)
        } else if msg.reserved() != 0 || !msg.headers().is_empty() {
            Message::reply_to(&msg, Status::BAD_REQUEST)
        } else {
            let s = shared.lock();
            let name = Info::new(&s.config.name.as_bytes()[..s.config.name.len().min(16)])
                .unwrap_or(Info::EMPTY);
            Message::hello_reply(name, s.config.im_type)
        };
        let _ = socket.send_to(&reply.to_bytes(), from).await;
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, peer)) = accepted {
                    let _ = stream.set_nodelay(true);
                    sessions.spawn(session(stream, peer, shared.clone()));
                }
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

async fn accept_and_close(listener: TcpListener) {
    loop {
        if let Ok((stream, peer)) = listener.accept().await {
            tracing::debug!(%peer, "connection closed at once (TcpService::AcceptAndClose)");
            drop(stream);
        }
    }
}

/// Releases the single-session slot when a session ends, however it ends.
struct SessionSlot(Arc<Shared>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.lock().session_active = false;
    }
}

async fn session(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let idle = shared.lock().config.idle_timeout;
    // 1. The ESC/VP.net handshake.
    let mut buf = Vec::with_capacity(64);
    let msg = loop {
        match Message::decode(&buf) {
            Ok((_, m)) => break m,
            Err(e) if e.is_incomplete() => {}
            Err(_) => {
                let reply = Message::new(MessageType::CONNECT, Status::BAD_REQUEST, Vec::new());
                if let Ok(r) = reply {
                    let _ = stream.write_all(&r.to_bytes()).await;
                }
                return;
            }
        }
        let mut chunk = [0u8; 256];
        match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let consumed = msg.encoded_len().min(buf.len());
    let leftover = buf.split_off(consumed);
    let (status, slot) = {
        let mut s = shared.lock();
        match handshake_status(&s, &msg) {
            Status::OK if msg.kind() == MessageType::CONNECT && s.session_active => {
                (Status::BUSY, None)
            }
            Status::OK if msg.kind() == MessageType::CONNECT => {
                s.session_active = true;
                (Status::OK, Some(SessionSlot(shared.clone())))
            }
            status => (status, None),
        }
    };
    let _ = stream
        .write_all(&Message::reply_to(&msg, status).to_bytes())
        .await;
    if status != Status::OK || msg.kind() != MessageType::CONNECT {
        tracing::debug!(%peer, ?status, "handshake refused");
        return;
    }
    let _slot = slot;
    tracing::debug!(%peer, "session open");
    serve_commands(stream, leftover, shared).await;
}

fn handshake_status(s: &State, msg: &Message) -> Status {
    if msg.version() != Version::V1_0 {
        return Status::VERSION_NOT_SUPPORTED;
    }
    if msg.reserved() != 0 || msg.status() != Status::REQUEST {
        return Status::BAD_REQUEST;
    }
    let given = msg
        .header(HeaderId::PASSWORD)
        .filter(|h| h.attribute() != 0)
        .map(|h| h.info().text().to_vec());
    let password_ok = match (&s.config.password, &given) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(Status::UNAUTHORIZED),
        (Some(p), Some(g)) if p.as_str().as_bytes() == g.as_slice() => Ok(()),
        (Some(_), Some(_)) => Err(Status::FORBIDDEN),
    };
    match msg.kind() {
        MessageType::CONNECT => {
            if s.config.tcp == TcpService::Protected {
                return Status::NOT_ALLOWED;
            }
            if s.faults.busy {
                return Status::BUSY;
            }
            match password_ok {
                Ok(()) => Status::OK,
                Err(st) => st,
            }
        }
        // Checking the password; changing it is accepted but not persisted across restarts.
        MessageType::PASSWORD => match password_ok {
            Ok(()) => Status::OK,
            Err(st) => st,
        },
        MessageType::HELLO => Status::NOT_ALLOWED,
        _ => Status::BAD_REQUEST,
    }
}

async fn serve_commands(mut stream: TcpStream, mut buf: Vec<u8>, shared: Arc<Shared>) {
    let (idle, max_line) = {
        let s = shared.lock();
        (s.config.idle_timeout, s.config.max_line_len)
    };
    let mut pushes = shared.pushes.subscribe();
    let mut kick = shared.kick.subscribe();
    let mut decoder = RequestDecoder::with_max_len(max_line);
    let mut chunk = vec![0u8; 1024];
    let mut last_input = Instant::now();
    loop {
        // Answer every complete command in the buffer, in order.
        loop {
            let (n, line) = match decoder.decode(&buf) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(_) => {
                    // Over-long line: refuse and close rather than buffer without bound.
                    let _ = stream.write_all(b"ERR\r:").await;
                    return;
                }
            };
            let owned: OwnedRequest = line.into();
            buf.drain(..n);
            if owned == OwnedRequest::Skip {
                continue;
            }
            match handle_command(&mut stream, &shared, &owned, &mut pushes).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
        let wait_until = last_input + idle;
        tokio::select! {
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    last_input = Instant::now();
                }
            },
            push = pushes.recv() => {
                if let Ok(value) = push
                    && stream.write_all(format!("IMEVENT={value}\r:").as_bytes()).await.is_err()
                {
                    return;
                }
            },
            _ = kick.changed() => return,
            _ = tokio::time::sleep_until(wait_until) => return,
        }
    }
}

/// Handles one command, including its faults; `Ok(false)` closes the session.
async fn handle_command(
    stream: &mut TcpStream,
    shared: &Arc<Shared>,
    request: &OwnedRequest,
    pushes: &mut broadcast::Receiver<String>,
) -> std::io::Result<bool> {
    let (faults, outcome) = {
        let mut s = shared.lock();
        s.commands += 1;
        let now = Instant::now();
        if s.tick(now) {
            shared.changed(&s);
        }
        let mut faults = s.faults.clone();
        if let Some(n) = s.faults.drop_after.as_mut() {
            if *n == 0 {
                return Ok(false);
            }
            *n -= 1;
            faults.drop_after = Some(*n);
        }
        if s.faults.silent {
            return Ok(true);
        }
        let outcome = if s.faults.err_next > 0 {
            s.faults.err_next -= 1;
            Outcome::Reply(b"ERR\r:".to_vec())
        } else {
            execute(&mut s, shared, request, now)
        };
        (faults, outcome)
    };
    let reply = match outcome {
        Outcome::Reply(r) => r,
        Outcome::AtWarmUpEnd(r) => {
            // Forward status pushes while warming up, then answer.
            loop {
                let until = {
                    let mut s = shared.lock();
                    if s.tick(Instant::now()) {
                        shared.changed(&s);
                    }
                    match s.power {
                        Power::WarmUp { until } => Some(until),
                        _ => None,
                    }
                };
                let Some(until) = until else { break };
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    push = pushes.recv() => {
                        if let Ok(value) = push {
                            stream.write_all(format!("IMEVENT={value}\r:").as_bytes()).await?;
                        }
                    }
                }
            }
            r
        }
    };
    if !faults.reply_delay.is_zero() {
        tokio::time::sleep(faults.reply_delay).await;
    }
    let mut out = faults.garbage.clone();
    if faults.imevent_before_reply {
        let value = shared.lock().status_value(true);
        out.extend_from_slice(format!("IMEVENT={value}\r:").as_bytes());
    }
    out.extend_from_slice(&reply);
    match faults.chunk_size {
        Some(size) if size > 0 => {
            for part in out.chunks(size) {
                stream.write_all(part).await?;
                stream.flush().await?;
                tokio::time::sleep(faults.chunk_pause).await;
            }
        }
        _ => stream.write_all(&out).await?,
    }
    Ok(true)
}

fn ack(s: &State) -> Vec<u8> {
    match s.config.ack_style {
        AckStyle::Colon => b":".to_vec(),
        AckStyle::CrColon => b"\r:".to_vec(),
    }
}

fn value(key: &str, value: impl std::fmt::Display) -> Vec<u8> {
    format!("{key}={value}\r:").into_bytes()
}

const ERR: &[u8] = b"ERR\r:";

fn execute(s: &mut State, shared: &Shared, request: &OwnedRequest, now: Instant) -> Outcome {
    use OwnedRequest as R;
    let on = s.power == Power::On;
    let reply = match request {
        R::Skip => return Outcome::Reply(Vec::new()),
        R::Null => ack(s),
        R::Malformed(_) => ERR.to_vec(),
        R::Query(name) => match name.as_str() {
            "PWR" => value("PWR", s.power_code()),
            "SNO" => value("SNO", &s.config.serial),
            "PJINFO" => value("PJINFO", &s.config.model),
            "ERR" => value("ERR", s.error),
            "LAMP" => {
                let h = s.lit_hours(now) as u32;
                let hours: Vec<String> = s
                    .config
                    .lamp_hours
                    .iter()
                    .map(|base| base.saturating_add(h).to_string())
                    .collect();
                value("LAMP", hours.join(" "))
            }
            "ONTIME" => value(
                "ONTIME",
                s.config
                    .on_time_hours
                    .saturating_add(s.lit_hours(now) as u32),
            ),
            "PWSTATUS" => value("PWSTATUS", s.status_value(false)),
            "SOURCELIST" => value("SOURCELIST", s.config.sources.to_param()),
            _ if !on => ERR.to_vec(),
            "SOURCE" => value("SOURCE", s.source),
            "MUTE" => value("MUTE", if s.mute { "ON" } else { "OFF" }),
            "MSEL" => value("MSEL", s.mute_screen),
            "FREEZE" => value("FREEZE", if s.freeze { "ON" } else { "OFF" }),
            "VOL" => value("VOL", s.volume),
            "CMODE" => value("CMODE", s.color_mode),
            "LUMINANCE" => value("LUMINANCE", s.luminance),
            "LUMLEVEL" => value("LUMLEVEL", s.lum_level),
            "ASPECT" => value("ASPECT", s.aspect),
            "SIGNAL" => value("SIGNAL", s.signal),
            _ => ERR.to_vec(),
        },
        R::Set(name, param) => {
            let param = param.as_str();
            match name.as_str() {
                "PWR" => return power(s, shared, param, now),
                _ if !on => ERR.to_vec(),
                "SOURCE" => match SourceCode::parse_value(param) {
                    Ok(c) if s.config.sources.contains(c) => {
                        s.source = c;
                        ack(s)
                    }
                    _ => ERR.to_vec(),
                },
                "MUTE" => on_off(param).map_or(ERR.to_vec(), |v| {
                    s.mute = v;
                    ack(s)
                }),
                "FREEZE" => on_off(param).map_or(ERR.to_vec(), |v| {
                    s.freeze = v;
                    ack(s)
                }),
                "MSEL" => match MuteScreen::parse_value(param) {
                    Ok(v) if v.get() <= 2 => {
                        s.mute_screen = v;
                        ack(s)
                    }
                    _ => ERR.to_vec(),
                },
                "VOL" => step(param, s.volume, 255, 12).map_or(ERR.to_vec(), |v| {
                    s.volume = v;
                    ack(s)
                }),
                "LUMLEVEL" => step(param, s.lum_level, 255, 1).map_or(ERR.to_vec(), |v| {
                    s.lum_level = v;
                    ack(s)
                }),
                "CMODE" => match ColorMode::parse_value(param) {
                    Ok(v) if v.name().is_some() => {
                        s.color_mode = v;
                        ack(s)
                    }
                    _ => ERR.to_vec(),
                },
                "LUMINANCE" => match LuminanceMode::parse_value(param) {
                    Ok(v) if v.get() <= 2 => {
                        s.luminance = v;
                        ack(s)
                    }
                    _ => ERR.to_vec(),
                },
                "ASPECT" => match AspectMode::parse_value(param) {
                    Ok(v) if v.name().is_some() => {
                        s.aspect = v;
                        ack(s)
                    }
                    _ => ERR.to_vec(),
                },
                "KEY" => match crate::value::KeyCode::parse_value(param) {
                    Ok(_) => ack(s),
                    Err(_) => ERR.to_vec(),
                },
                _ => ERR.to_vec(),
            }
        }
    };
    Outcome::Reply(reply)
}

fn power(s: &mut State, shared: &Shared, param: &str, now: Instant) -> Outcome {
    match (param, s.power) {
        ("ON", Power::Standby) if s.alarms.is_empty() => {
            s.power = Power::WarmUp {
                until: now + s.config.warm_up,
            };
            s.light(true, now);
            shared.changed(s);
            Outcome::AtWarmUpEnd(ack(s))
        }
        ("ON", Power::On) => Outcome::Reply(ack(s)),
        ("OFF", Power::On) => {
            s.power = Power::CoolDown {
                until: now + s.config.cool_down,
            };
            s.light(false, now);
            shared.changed(s);
            Outcome::Reply(ack(s))
        }
        ("OFF", Power::Standby) => Outcome::Reply(ack(s)),
        _ => Outcome::Reply(ERR.to_vec()),
    }
}

fn on_off(param: &str) -> Option<bool> {
    match param {
        "ON" => Some(true),
        "OFF" => Some(false),
        _ => None,
    }
}

fn step(param: &str, current: u32, max: u32, inc: u32) -> Option<u32> {
    match param {
        "INC" => Some((current + inc).min(max)),
        "DEC" => Some(current.saturating_sub(inc)),
        "INIT" => Some(max / 2),
        p => p.parse::<u32>().ok().filter(|v| *v <= max),
    }
}
