//! Reading a projector over ESC/VP.net and turning what it says into `epmc-proto` messages.
//!
//! A [`Projector`] owns one ESC/VP.net session (through the `escvp` async client, which sends
//! one command at a time) and reads the white paper's appendix items that ESC/VP21 exposes:
//!
//! | item | command | message field |
//! |---|---|---|
//! | serial number (device id) | `SNO?` | `DeviceInfo::serial_number` |
//! | model | `PJINFO?` | `DeviceInfo::model` |
//! | firmware version | `VER?` | `DeviceInfo::firmware_version` |
//! | power | `PWR?` | `DeviceStatus::power`, `power_code` |
//! | warnings, alarms | `PWSTATUS?` | `DeviceStatus::warnings`, `alarms` |
//! | current error | `ERR?` | `DeviceStatus::error_code` |
//! | light-up time | `LAMP?` | `DeviceStatus::light_up_time_hours` |
//! | total operation time | `ONTIME?` | `DeviceStatus::total_operation_time_hours` |
//! | source (name from `SOURCELIST?`) | `SOURCE?` | `DeviceStatus::source` |
//! | inputs (full collection) | `SOURCELIST?` | `DeviceInfo::sources` |
//! | A/V mute | `MUTE?` | `DeviceStatus::av_mute` |
//! | signal | `SIGNAL?` | `DeviceStatus::signal` |
//! | projector name | `NWPNAME?` | `DeviceSettings::projector_name` |
//! | colour mode | `CMODE?` | `DeviceSettings::color_mode` |
//! | luminance mode, level | `LUMINANCE?`, `LUMLEVEL?` | `DeviceSettings::luminance_mode`, `luminance_constant_level` |
//! | volume | `VOL?` | `DeviceSettings::volume` |
//! | IP address | the address the agent reached it at | `DeviceSettings::ip_address` |
//!
//! An item the projector refuses (`ERR`: unsupported by the model, or not available in its
//! current power state) is absent (`None`), never zero; the refused commands are listed in
//! [`Report::unsupported`]. An answer that cannot be parsed is absent too and listed in
//! [`Report::problems`]. Failures of the session itself are typed ([`CollectError`]): busy,
//! password required or wrong, timeout, garbage, dropped connection and refused connection
//! are distinct.
//!
//! Where port 3629 refuses or closes the connection before the handshake, or answers
//! `0x45` (command communication "Protected"), [`collect_once`]
//! (and so [`collect_all`]) falls back to the projector's HTTP `json_query` interface
//! ([`crate::http`]); [`Collected::via`] says which interface was used.
//!
//! `VER?` and `NWPNAME?` are not in the sources the protocol reference could confirm; a
//! projector that lacks them answers `ERR` and the items are simply absent.

use std::net::SocketAddr;
use std::time::Duration;

use epmc_proto::bounded::{BoundedString, BoundedVec, HexCode, Timestamp};
use epmc_proto::model::{
    AgentDeviceSettings, Alarm, DeviceEvent, DeviceEventKind, DeviceId, DeviceInfo, DeviceLogs,
    DeviceSettings, DeviceSnapshot, DeviceStatus, FullCollection, History, PowerState,
    SignalState as ProtoSignal, SourceRef, Warning,
};
use escvp::client::{Client, ClientConfig, ClientError, ClientEvent, Events};
use escvp::event::{Alarms, Warnings};
use escvp::session::{CloseReason, CommandError, ConnectError, SendError, StatusChange};
use escvp::value::{
    ColorModeProperty, Error as ErrProperty, Lamp, LumLevel, Luminance, Mute, OnTime, Power,
    ProjectorInfo, Property, PwStatus, SerialNumber, Signal, SignalState, Source, SourceList,
    SourceListProperty, Text, Volume,
};

use crate::config::{Endpoint, TargetMeta};

/// `VER?`: firmware version (not confirmed by the protocol reference; absent where refused).
#[derive(Clone, Copy, Debug)]
pub struct FirmwareVersion;
impl Property for FirmwareVersion {
    const NAME: &'static str = "VER";
    type Value = Text;
}

/// `NWPNAME?`: the projector's network name (not confirmed by the protocol reference; absent
/// where refused).
#[derive(Clone, Copy, Debug)]
pub struct NetworkName;
impl Property for NetworkName {
    const NAME: &'static str = "NWPNAME";
    type Value = Text;
}

/// Longest wait for a session to close in [`Projector::close`].
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Timeouts of one collection.
#[derive(Clone, Debug)]
pub struct CollectOptions {
    /// How long the TCP connection may take to open.
    pub connect_timeout: Duration,
    /// How long the ESC/VP.net CONNECT reply may take.
    pub handshake_timeout: Duration,
    /// Multiplies the ESC/VP21 command deadlines (3 s for a query): above 1 for slow links,
    /// below 1 for tests.
    pub command_timeout_scale: f64,
    /// Bound on a whole connect-and-collect, whatever happens.
    pub deadline: Duration,
}

impl Default for CollectOptions {
    fn default() -> Self {
        CollectOptions {
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            command_timeout_scale: 1.0,
            deadline: Duration::from_secs(90),
        }
    }
}

/// Where a timeout happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Opening the TCP connection.
    Connect,
    /// Waiting for the CONNECT reply.
    Handshake,
    /// Waiting for the answer to this command.
    Command(&'static str),
    /// The whole collection took longer than [`CollectOptions::deadline`].
    Deadline,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Connect => f.write_str("connecting"),
            Stage::Handshake => f.write_str("the ESC/VP.net handshake"),
            Stage::Command(c) => write!(f, "{c}?"),
            Stage::Deadline => f.write_str("the whole collection"),
        }
    }
}

/// Why a projector could not be read. Each variant is a distinct situation for the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CollectError {
    /// Nothing listens on the port (TCP connection refused).
    #[error("connection refused")]
    Refused,
    /// The address cannot be reached (no route, network down, …).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No answer in time.
    #[error("timed out during {0}")]
    TimedOut(Stage),
    /// ESC/VP.net status 0x53: another controller holds the session, or the projector is
    /// busy. Not a fault.
    #[error("busy (ESC/VP.net status 0x53): another controller may hold the session")]
    Busy,
    /// ESC/VP.net status 0x41: the projector needs a password and none was configured.
    #[error("password required (ESC/VP.net status 0x41)")]
    PasswordRequired,
    /// ESC/VP.net status 0x43: the configured password is wrong.
    #[error("wrong password (ESC/VP.net status 0x43)")]
    WrongPassword,
    /// ESC/VP.net status 0x45: the request is not allowed (e.g. command communication set to
    /// "Protected", which needs ESC/VP.net 2.0).
    #[error(
        "request not allowed (ESC/VP.net status 0x45): check the projector's command communication setting"
    )]
    NotAllowed,
    /// The peer sent bytes that are not ESC/VP.net or ESC/VP21.
    #[error("not ESC/VP.net: {0}")]
    Garbage(String),
    /// A well-formed ESC/VP.net refusal this agent cannot act on (bad request, version).
    #[error("ESC/VP.net refusal: {0}")]
    Protocol(String),
    /// The projector closed the connection.
    #[error("the projector closed the connection")]
    Dropped,
    /// ESC/VP.net was not available and the HTTP fallback answered but failed.
    #[error("ESC/VP.net port closed; over HTTP: {0}")]
    Http(crate::http::HttpError),
}

impl CollectError {
    /// A short stable name: `refused`, `unreachable`, `timeout`, `busy`,
    /// `password_required`, `wrong_password`, `not_allowed`, `garbage`, `protocol`, `dropped`.
    pub fn code(&self) -> &'static str {
        match self {
            CollectError::Refused => "refused",
            CollectError::Unreachable(_) => "unreachable",
            CollectError::TimedOut(_) => "timeout",
            CollectError::Busy => "busy",
            CollectError::PasswordRequired => "password_required",
            CollectError::WrongPassword => "wrong_password",
            CollectError::NotAllowed => "not_allowed",
            CollectError::Garbage(_) => "garbage",
            CollectError::Protocol(_) => "protocol",
            CollectError::Dropped => "dropped",
            CollectError::Http(e) => e.code(),
        }
    }

    /// Whether the peer answered in ESC/VP.net (it is a projector, it just would not serve
    /// us): busy, password required or wrong, not allowed, protocol refusal.
    pub fn is_escvp_refusal(&self) -> bool {
        matches!(
            self,
            CollectError::Busy
                | CollectError::PasswordRequired
                | CollectError::WrongPassword
                | CollectError::NotAllowed
                | CollectError::Protocol(_)
        )
    }

    fn from_connect(e: ConnectError) -> CollectError {
        match e {
            ConnectError::PasswordRequired => CollectError::PasswordRequired,
            ConnectError::WrongPassword => CollectError::WrongPassword,
            ConnectError::NotAllowed => CollectError::NotAllowed,
            ConnectError::Busy => CollectError::Busy,
            ConnectError::TimedOut => CollectError::TimedOut(Stage::Handshake),
            ConnectError::Malformed(d) => CollectError::Garbage(d.to_string()),
            ConnectError::Closed => CollectError::Dropped,
            other => CollectError::Protocol(other.to_string()),
        }
    }

    fn from_close(reason: CloseReason, command: &'static str) -> CollectError {
        match reason {
            CloseReason::Handshake(e) => CollectError::from_connect(e),
            CloseReason::CommandTimedOut => CollectError::TimedOut(Stage::Command(command)),
            CloseReason::Malformed(d) => CollectError::Garbage(d.to_string()),
            _ => CollectError::Dropped,
        }
    }

    fn from_client(e: ClientError, command: &'static str) -> CollectError {
        match e {
            ClientError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                CollectError::Refused
            }
            ClientError::Io(io) => CollectError::Unreachable(io.to_string()),
            ClientError::ConnectTimedOut => CollectError::TimedOut(Stage::Connect),
            ClientError::Handshake(c) => CollectError::from_connect(c),
            ClientError::Command(CommandError::TimedOut(_)) => {
                CollectError::TimedOut(Stage::Command(command))
            }
            ClientError::Command(CommandError::Closed(r))
            | ClientError::Send(SendError::Closed(r)) => CollectError::from_close(r, command),
            _ => CollectError::Dropped,
        }
    }
}

/// An answer that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The command, e.g. `LAMP`.
    pub command: &'static str,
    /// What was wrong with its answer.
    pub reason: String,
}

/// What a read left out, besides the values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Commands the projector answered with `ERR` (their items are absent).
    pub unsupported: Vec<&'static str>,
    /// Answers that could not be parsed or do not fit the message (their items are absent).
    pub problems: Vec<Problem>,
}

/// A status read.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusRead {
    /// The snapshot message.
    pub snapshot: DeviceSnapshot,
    /// What was left out.
    pub report: Report,
}

/// The interface a collection was read through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Interface {
    /// ESC/VP.net (TCP 3629), ESC/VP21 commands.
    EscVpNet,
    /// The HTTP `json_query` interface (the fallback).
    Http,
}

impl std::fmt::Display for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interface::EscVpNet => "ESC/VP.net",
            Interface::Http => "HTTP json_query",
        })
    }
}

/// A full collection.
#[derive(Clone, Debug, PartialEq)]
pub struct Collected {
    /// Where the projector was reached.
    pub addr: SocketAddr,
    /// The interface it was read through.
    pub via: Interface,
    /// The status part as its own message.
    pub snapshot: DeviceSnapshot,
    /// The full collection message.
    pub collection: FullCollection,
    /// What was left out.
    pub report: Report,
}

/// An open ESC/VP.net session to one projector. Commands go out one at a time, in order;
/// `&mut self` on every read keeps reads from interleaving.
#[derive(Debug)]
pub struct Projector {
    client: Client,
    addr: SocketAddr,
    serial: Option<String>,
    sources: Option<SourceList>,
    answers: Option<tokio::sync::watch::Sender<u32>>,
}

type Step<T> = Result<Option<T>, CollectError>;

impl Projector {
    /// Opens a session (TCP connect, then CONNECT with the endpoint's password).
    pub async fn connect(
        endpoint: &Endpoint,
        options: &CollectOptions,
    ) -> Result<Projector, CollectError> {
        let mut config = ClientConfig {
            connect_timeout: options.connect_timeout,
            ..ClientConfig::default()
        };
        config.session.handshake_timeout = options.handshake_timeout;
        config.session.timeout_scale = options.command_timeout_scale;
        config.session.password = endpoint.password.clone();
        let client = Client::connect(endpoint.addr, config)
            .await
            .map_err(|e| CollectError::from_client(e, "CONNECT"))?;
        Ok(Projector {
            client,
            addr: endpoint.addr,
            serial: None,
            sources: None,
            answers: None,
        })
    }

    /// Counts this session's answers on `to` from now on (every answer to a read, a refusal
    /// included), and counts the CONNECT reply already received as the first. Whoever waits
    /// for the projector (the service's concurrency slots) can so tell a projector that is
    /// answering from one that has gone silent.
    pub fn count_answers(&mut self, to: tokio::sync::watch::Sender<u32>) {
        to.send_modify(|n| *n = n.wrapping_add(1));
        self.answers = Some(to);
    }

    fn answered(&self) {
        if let Some(a) = &self.answers {
            a.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Where the projector was reached.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The serial number, once read.
    pub fn serial(&self) -> Option<&str> {
        self.serial.as_deref()
    }

    /// The device id: the serial number when known, `ip:ADDR` otherwise.
    pub fn device_id(&self) -> DeviceId {
        device_id(self.serial.as_deref(), self.addr)
    }

    /// The underlying client (e.g. to receive IMEVENT notifications on a held session).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Status-change notifications (IMEVENT) pushed on this session from now on, as `event`
    /// messages for this device (call after [`Self::identify`] so they carry the serial
    /// number).
    pub fn notifications(&self) -> Notifications {
        Notifications {
            events: self.client.events(),
            device_id: self.device_id(),
        }
    }

    /// Closes the session and waits (at most [`CLOSE_WAIT`]) until the client task has shut
    /// the connection down, so that the next controller, or our own next poll, does not find
    /// the projector still busy with this session.
    pub async fn close(self) {
        let mut events = self.client.events();
        self.client.close();
        // `recv` yields `None` once the client task, the last sender, has ended, which it
        // does after shutting the connection down.
        let ended = async { while events.recv().await.is_some() {} };
        let _ = tokio::time::timeout(CLOSE_WAIT, ended).await;
    }

    async fn get<P: Property>(&mut self, report: &mut Report) -> Step<P::Value> {
        let answer = self.client.get::<P>().await;
        if matches!(
            answer,
            Ok(_)
                | Err(ClientError::Command(CommandError::Refused)
                    | ClientError::BadValue(_)
                    | ClientError::UnexpectedAnswer(_))
        ) {
            self.answered();
        }
        match answer {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Command(CommandError::Refused)) => {
                report.unsupported.push(P::NAME);
                Ok(None)
            }
            Err(ClientError::BadValue(e)) => {
                report.problems.push(Problem {
                    command: P::NAME,
                    reason: e.to_string(),
                });
                Ok(None)
            }
            Err(ClientError::UnexpectedAnswer(a)) => {
                report.problems.push(Problem {
                    command: P::NAME,
                    reason: format!("unexpected answer {a:?}"),
                });
                Ok(None)
            }
            Err(e) => Err(CollectError::from_client(e, P::NAME)),
        }
    }

    /// Reads the serial number once per session (the device id).
    pub async fn identify(&mut self, report: &mut Report) -> Result<DeviceId, CollectError> {
        identify(self, report).await
    }

    /// Reads the status items (and the serial number, if not read yet).
    pub async fn read_status(&mut self) -> Result<StatusRead, CollectError> {
        read_status(self).await
    }

    /// Reads everything: information, status and settings.
    pub async fn read_full(&mut self, meta: &TargetMeta) -> Result<Collected, CollectError> {
        read_full(self, meta).await
    }
}

/// Where the typed ESC/VP21 values come from: an ESC/VP.net session ([`Projector`]) or the
/// HTTP `json_query` interface ([`crate::http::HttpProjector`]). The reads that turn them into
/// `epmc-proto` messages ([`read_status`], [`read_full`]) are written once, over this.
pub(crate) trait Items: Send {
    /// Why a read failed as a whole.
    type Error;
    /// The value of `P`: `Ok(None)` when the projector refuses it or the answer does not
    /// parse (both recorded in `report`).
    fn get<P: Property>(
        &mut self,
        report: &mut Report,
    ) -> impl std::future::Future<Output = Result<Option<P::Value>, Self::Error>> + Send;
    /// Where the projector was reached.
    fn addr(&self) -> SocketAddr;
    /// Which interface this is.
    fn via(&self) -> Interface;
    /// The serial number, once read.
    fn serial_mut(&mut self) -> &mut Option<String>;
    /// The source list, once read.
    fn sources_mut(&mut self) -> &mut Option<SourceList>;
}

impl Items for Projector {
    type Error = CollectError;
    async fn get<P: Property>(&mut self, report: &mut Report) -> Step<P::Value> {
        Projector::get::<P>(self, report).await
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn via(&self) -> Interface {
        Interface::EscVpNet
    }
    fn serial_mut(&mut self) -> &mut Option<String> {
        &mut self.serial
    }
    fn sources_mut(&mut self) -> &mut Option<SourceList> {
        &mut self.sources
    }
}

/// Reads the serial number once per session (the device id).
pub(crate) async fn identify<R: Items>(
    r: &mut R,
    report: &mut Report,
) -> Result<DeviceId, R::Error> {
    if r.serial_mut().is_none()
        && let Some(sno) = r.get::<SerialNumber>(report).await?
    {
        let s = sno.as_str().trim();
        if !s.is_empty() {
            *r.serial_mut() = Some(s.to_owned());
        }
    }
    let addr = r.addr();
    Ok(device_id(r.serial_mut().as_deref(), addr))
}

/// Reads the status items (and the serial number, if not read yet).
pub(crate) async fn read_status<R: Items>(r: &mut R) -> Result<StatusRead, R::Error> {
    let mut report = Report::default();
    let device_id = identify(r, &mut report).await?;
    let status = status(r, &mut report).await?;
    Ok(StatusRead {
        snapshot: DeviceSnapshot {
            device_id,
            observed_at: Timestamp::now(),
            status,
        },
        report,
    })
}

async fn status<R: Items>(r: &mut R, report: &mut Report) -> Result<DeviceStatus, R::Error> {
    let mut st = DeviceStatus::default();
    if let Some(code) = r.get::<Power>(report).await? {
        st.power = Some(PowerState::from_code(code.get()));
        st.power_code = Some(HexCode::new(code.get()));
    }
    if let Some(ps) = r.get::<PwStatus>(report).await? {
        st.warnings = Some(warnings(ps.warnings, report));
        st.alarms = Some(alarms(ps.alarms, report));
    }
    if let Some(code) = r.get::<ErrProperty>(report).await? {
        st.error_code = Some(HexCode::new(code.get()));
    }
    if let Some(lamp) = r.get::<Lamp>(report).await? {
        st.light_up_time_hours = BoundedVec::new(lamp.hours().to_vec()).ok();
    }
    if let Some(on) = r.get::<OnTime>(report).await? {
        st.total_operation_time_hours = Some(on.0);
    }
    if let Some(code) = r.get::<Source>(report).await? {
        if r.sources_mut().is_none() {
            *r.sources_mut() = r.get::<SourceListProperty>(report).await?;
        }
        let name = r
            .sources_mut()
            .as_ref()
            .and_then(|l| l.name_of(code))
            .and_then(|n| BoundedString::new(n).ok());
        st.source = Some(SourceRef {
            code: HexCode::new(code.get()),
            name,
        });
    }
    if let Some(m) = r.get::<Mute>(report).await? {
        st.av_mute = Some(m.is_on());
    }
    if let Some(s) = r.get::<Signal>(report).await? {
        st.signal = match s {
            SignalState::NONE => Some(ProtoSignal::None),
            SignalState::DETECTED | SignalState::THREE_D => Some(ProtoSignal::Present),
            SignalState::NOT_SUPPORTED | SignalState::UNSUPPORTED => Some(ProtoSignal::Unsupported),
            other => {
                report.problems.push(Problem {
                    command: Signal::NAME,
                    reason: format!("unknown signal state {other:?}"),
                });
                None
            }
        };
    }
    Ok(st)
}

/// Reads everything: information, status and settings.
pub(crate) async fn read_full<R: Items>(
    r: &mut R,
    meta: &TargetMeta,
) -> Result<Collected, R::Error> {
    let mut report = Report::default();
    let device_id = identify(r, &mut report).await?;
    let mut info = DeviceInfo {
        serial_number: r
            .serial_mut()
            .as_deref()
            .and_then(|s| name(s, "SNO", &mut report)),
        ..DeviceInfo::default()
    };
    if let Some(model) = r.get::<ProjectorInfo>(&mut report).await? {
        info.model = name(model.as_str(), ProjectorInfo::NAME, &mut report);
    }
    if let Some(fw) = r.get::<FirmwareVersion>(&mut report).await? {
        info.firmware_version = name(fw.as_str(), FirmwareVersion::NAME, &mut report);
    }
    let status = status(r, &mut report).await?;
    // The inputs a `source_change` order can select (status() read them if SOURCE? answered).
    if r.sources_mut().is_none() {
        *r.sources_mut() = r.get::<SourceListProperty>(&mut report).await?;
    }
    info.sources = r.sources_mut().as_ref().and_then(|list| {
        let refs: Vec<SourceRef> = list
            .entries()
            .iter()
            .take(epmc_proto::model::MAX_SOURCES)
            .map(|(code, name)| SourceRef {
                code: HexCode::new(code.get()),
                name: BoundedString::new(name.as_str()).ok(),
            })
            .collect();
        BoundedVec::new(refs).ok()
    });
    let mut settings = DeviceSettings {
        ip_address: Some(r.addr().ip()),
        ..DeviceSettings::default()
    };
    if let Some(n) = r.get::<NetworkName>(&mut report).await? {
        settings.projector_name = name(n.as_str(), NetworkName::NAME, &mut report);
    }
    if let Some(c) = r.get::<ColorModeProperty>(&mut report).await? {
        settings.color_mode = Some(HexCode::new(c.get()));
    }
    if let Some(l) = r.get::<Luminance>(&mut report).await? {
        settings.luminance_mode = Some(HexCode::new(l.get()));
    }
    if let Some(l) = r.get::<LumLevel>(&mut report).await? {
        settings.luminance_constant_level = byte(l.0, LumLevel::NAME, &mut report);
    }
    if let Some(v) = r.get::<Volume>(&mut report).await? {
        settings.volume = byte(v.0, Volume::NAME, &mut report);
    }
    let now = Timestamp::now();
    let agent_settings = (meta != &TargetMeta::default()).then(|| AgentDeviceSettings {
        device_id: device_id.clone(),
        display_name: meta
            .display_name
            .as_deref()
            .and_then(|s| BoundedString::new(s).ok()),
        group_name: meta
            .group
            .as_deref()
            .and_then(|s| BoundedString::new(s).ok()),
        comment: meta
            .comment
            .as_deref()
            .and_then(|s| BoundedString::new(s).ok()),
    });
    Ok(Collected {
        addr: r.addr(),
        via: r.via(),
        snapshot: DeviceSnapshot {
            device_id: device_id.clone(),
            observed_at: now,
            status: status.clone(),
        },
        collection: FullCollection {
            device_id,
            collected_at: now,
            agent_settings,
            info,
            logs: DeviceLogs::default(),
            status,
            history: History::default(),
            settings,
        },
        report,
    })
}

/// IMEVENT notifications of one held session, as `event` messages.
#[derive(Debug)]
pub struct Notifications {
    events: Events,
    device_id: DeviceId,
}

impl Notifications {
    /// The next status change; `None` once the session has closed.
    pub async fn next(&mut self) -> Option<DeviceEvent> {
        loop {
            match self.events.recv().await? {
                ClientEvent::Status(change) => {
                    return Some(status_event(self.device_id.clone(), &change));
                }
                ClientEvent::Closed(_) => return None,
                ClientEvent::MalformedStatus(raw) => {
                    tracing::warn!(device = %self.device_id, %raw, "undecodable IMEVENT ignored");
                }
                other => tracing::debug!(?other, "client event ignored"),
            }
        }
    }
}

/// The `event` message for an IMEVENT status change. The IMEVENT status codes are not the
/// `PWR?` codes; "abnormal" has no power state and leaves `power` absent.
pub fn status_event(device_id: DeviceId, change: &StatusChange) -> DeviceEvent {
    let mut ignored = Report::default();
    DeviceEvent {
        device_id,
        at: Timestamp::now(),
        event: DeviceEventKind::StatusChange {
            power: change
                .status
                .to_power_code()
                .map(|c| PowerState::from_code(c.get())),
            warnings: warnings(change.warnings, &mut ignored),
            alarms: alarms(change.alarms, &mut ignored),
        },
    }
}

/// The device id for a serial number (if known) and address.
pub fn device_id(serial: Option<&str>, addr: SocketAddr) -> DeviceId {
    serial
        .and_then(|s| BoundedString::new(s).ok())
        .or_else(|| BoundedString::new(format!("ip:{}", addr.ip())).ok())
        // An IP address in text is at most 45 characters: the fallback always fits.
        .unwrap_or_default()
}

pub(crate) fn name(
    text: &str,
    command: &'static str,
    report: &mut Report,
) -> Option<epmc_proto::model::Name> {
    match BoundedString::new(text) {
        Ok(n) => Some(n),
        Err(e) => {
            report.problems.push(Problem {
                command,
                reason: e.to_string(),
            });
            None
        }
    }
}

pub(crate) fn byte(value: u32, command: &'static str, report: &mut Report) -> Option<u8> {
    match u8::try_from(value) {
        Ok(b) => Some(b),
        Err(_) => {
            report.problems.push(Problem {
                command,
                reason: format!("{value} is out of range 0-255"),
            });
            None
        }
    }
}

pub(crate) fn warnings(w: Warnings, report: &mut Report) -> BoundedVec<Warning, 16> {
    let table = [
        (Warnings::LAMP_LIFE, Warning::LampLife),
        (Warnings::NO_SIGNAL, Warning::NoSignal),
        (Warnings::UNSUPPORTED_SIGNAL, Warning::UnsupportedSignal),
        (Warnings::AIR_FILTER, Warning::AirFilter),
        (Warnings::HIGH_TEMPERATURE, Warning::HighTemperature),
        (Warnings::ASPECT_CHANGE, Warning::AspectChange),
    ];
    if w.unknown_bits() != 0 {
        report.problems.push(Problem {
            command: PwStatus::NAME,
            reason: format!("unknown warning bits 0x{:08X}", w.unknown_bits()),
        });
    }
    let list: Vec<Warning> = table
        .into_iter()
        .filter(|(bit, _)| w.contains(*bit))
        .map(|(_, n)| n)
        .collect();
    BoundedVec::new(list).unwrap_or_default()
}

pub(crate) fn alarms(a: Alarms, report: &mut Report) -> BoundedVec<Alarm, 16> {
    let table = [
        (Alarms::LAMP_ON_FAILURE, Alarm::LampOnFailure),
        (Alarms::LAMP_LID, Alarm::LampLid),
        (Alarms::LAMP_BURNOUT, Alarm::LampBurnout),
        (Alarms::FAN, Alarm::Fan),
        (Alarms::TEMPERATURE_SENSOR, Alarm::TemperatureSensor),
        (Alarms::HIGH_TEMPERATURE, Alarm::HighTemperature),
        (Alarms::INTERIOR, Alarm::Interior),
    ];
    if a.unknown_bits() != 0 {
        report.problems.push(Problem {
            command: PwStatus::NAME,
            reason: format!("unknown alarm bits 0x{:08X}", a.unknown_bits()),
        });
    }
    let list: Vec<Alarm> = table
        .into_iter()
        .filter(|(bit, _)| a.contains(*bit))
        .map(|(_, n)| n)
        .collect();
    BoundedVec::new(list).unwrap_or_default()
}

/// Connects, reads everything and disconnects, within [`CollectOptions::deadline`]. Where
/// port 3629 refuses or closes the connection, or answers `0x45`, reads over HTTP instead
/// ([`crate::http::collect_fallback`]).
pub async fn collect_once(
    endpoint: &Endpoint,
    options: &CollectOptions,
) -> Result<Collected, CollectError> {
    let work = async {
        let mut projector = match Projector::connect(endpoint, options).await {
            Ok(p) => p,
            Err(e) if crate::http::fallback_applies(&e) => {
                return crate::http::collect_fallback(endpoint, options, e).await;
            }
            Err(e) => return Err(e),
        };
        let collected = projector.read_full(&endpoint.meta).await;
        projector.close().await;
        collected
    };
    tokio::time::timeout(options.deadline, work)
        .await
        .unwrap_or(Err(CollectError::TimedOut(Stage::Deadline)))
}

/// Collects every endpoint, at most `concurrency` at once, and returns the outcomes in the
/// endpoints' order.
pub async fn collect_all(
    endpoints: &[Endpoint],
    options: &CollectOptions,
    concurrency: usize,
) -> Vec<Result<Collected, CollectError>> {
    collect_all_observed(endpoints, options, concurrency, |_, _| {}).await
}

/// [`collect_all`], calling `done(finished, result)` as each endpoint's outcome comes in
/// (`finished` counts the outcomes so far): for a progress display.
pub async fn collect_all_observed(
    endpoints: &[Endpoint],
    options: &CollectOptions,
    concurrency: usize,
    done: impl FnMut(usize, &Result<Collected, CollectError>),
) -> Vec<Result<Collected, CollectError>> {
    crate::sweep::bounded_map_observed(
        endpoints,
        concurrency,
        |e| {
            let e = e.clone();
            let options = options.clone();
            async move { collect_once(&e, &options).await }
        },
        done,
    )
    .await
}
