//! A sans-IO ESC/VP.net client session.
//!
//! The session owns no socket and reads no clock: feed it the bytes that arrived with
//! [`Session::handle_input`], the current time with [`Session::handle_timeout`], send what
//! [`Session::poll_transmit`] returns, wake it at [`Session::poll_timeout`], and read what
//! happened from [`Session::poll_event`]. The async client is a thin loop around it, and tests
//! drive it with byte vectors and made-up instants.
//!
//! Rules it enforces:
//! - CONNECT first (with the password header if one is configured); the reply status maps to
//!   a typed [`ConnectError`].
//! - One command in flight; further commands wait in a bounded queue.
//! - Replies are paired by key: a query `PWR?` completes only with `PWR=…`, `ERR` or a
//!   multi-line reply; a set completes with `:` or `ERR`. `IMEVENT` lines become
//!   [`Event::Status`], never a reply. A reply that fits no command (a late answer to one that
//!   timed out) is reported as [`Event::Unexpected`].
//! - Each command has a deadline from the ESC/VP21 timing rules ([`Timing`](crate::value::Timing)); after `PWR OFF`
//!   nothing is sent during the quiet period, and the period outlives the session:
//!   [`Session::quiet_until`] reports it, [`Session::hold_until`] carries it into the next
//!   session to the same projector, [`QuietPeriods`] remembers it per projector meanwhile (the
//!   async client does this by address).
//! - A command timeout, malformed bytes or a refused handshake close the session: after a
//!   timeout a late `:` could otherwise be paired with the wrong command.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use escvp::session::{Event, Session, SessionConfig};
//! use escvp::value::{Power, Property};
//!
//! let t0 = Instant::now();
//! let mut s = Session::new(SessionConfig::default(), t0);
//! assert_eq!(s.poll_transmit().unwrap(), b"ESC/VP.net\x10\x03\x00\x00\x00\x00");
//! s.handle_input(b"ESC/VP.net\x10\x03\x00\x00\x20\x00", t0);
//! assert!(matches!(s.poll_event(), Some(Event::Connected)));
//!
//! let id = s.send(Power::query(), t0).unwrap();
//! assert_eq!(s.poll_transmit().unwrap(), b"PWR?\r");
//! s.handle_input(b"IMEVENT=0001 03 00000000 00000000 T1 F1\r:PWR=01\r:", t0 + Duration::from_millis(20));
//! assert!(matches!(s.poll_event(), Some(Event::Status(_))));
//! match s.poll_event() {
//!     Some(Event::Completed { id: done, result: Ok(reply) }) => {
//!         assert_eq!(done, id);
//!         assert_eq!(reply.value(), Some("01"));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::DecodeError;
use crate::event::{Alarms, ImStatus, Warnings};
use crate::net::{Message, MessageType, Password, Status, Version};
use crate::vp21::{Command, Reply, ReplyDecoder};

/// Session settings.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The projector's password (ESC/VP.net 1.0 "Monitor password"), if it has one.
    pub password: Option<Password>,
    /// How long to wait for the CONNECT reply.
    pub handshake_timeout: Duration,
    /// Maximum length of one reply.
    pub max_reply_len: usize,
    /// Maximum number of commands waiting behind the one in flight.
    pub max_queue: usize,
    /// Multiplies every command deadline (use > 1 for slow links, < 1 in tests).
    pub timeout_scale: f64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            password: None,
            handshake_timeout: Duration::from_secs(5),
            max_reply_len: crate::vp21::DEFAULT_MAX_REPLY_LEN,
            max_queue: 32,
            timeout_scale: 1.0,
        }
    }
}

/// Identifies a command sent through [`Session::send`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct CommandId(u64);

/// A completed command's answer, owned.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Answer {
    /// `:`: a set or the null command succeeded.
    Ack,
    /// `KEY=VALUE`: the value of a query.
    Value(String),
    /// A multi-line reply: `(key, value)` per line.
    Lines(Vec<(String, String)>),
}

impl Answer {
    /// The value of a single-value answer.
    pub fn value(&self) -> Option<&str> {
        match self {
            Answer::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// Why the CONNECT handshake failed.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// 0x41: the projector needs a password and none was given.
    #[error("the projector requires a password (status 0x41)")]
    PasswordRequired,
    /// 0x43: the password is wrong.
    #[error("the password is wrong (status 0x43)")]
    WrongPassword,
    /// 0x45: the request is not allowed (e.g. the projector's command communication is set
    /// to "Protected", which needs ESC/VP.net 2.0).
    #[error("the projector does not allow this request (status 0x45)")]
    NotAllowed,
    /// 0x53: the projector is busy (e.g. another controller holds the session).
    #[error("the projector is busy (status 0x53)")]
    Busy,
    /// 0x55: the protocol version is not supported.
    #[error("protocol version not supported (status 0x55)")]
    VersionNotSupported,
    /// 0x40: the projector did not understand the request.
    #[error("the projector rejected the request as malformed (status 0x40)")]
    BadRequest,
    /// Any other status.
    #[error("unexpected CONNECT status {0:?}")]
    UnexpectedStatus(Status),
    /// The reply was an ESC/VP.net message of another type or version.
    #[error("unexpected reply to CONNECT: type {kind:?}, version {version:?}")]
    UnexpectedReply {
        /// Its type.
        kind: MessageType,
        /// Its version.
        version: Version,
    },
    /// The reply was not an ESC/VP.net message.
    #[error("malformed reply to CONNECT: {0}")]
    Malformed(DecodeError),
    /// No reply within the handshake timeout.
    #[error("no reply to CONNECT in time")]
    TimedOut,
    /// The projector closed the connection before replying (some projectors close at once
    /// when another controller holds the session).
    #[error("the projector closed the connection during the handshake")]
    Closed,
}

impl ConnectError {
    /// The error a non-OK status means.
    pub fn from_status(status: Status) -> ConnectError {
        match status {
            Status::UNAUTHORIZED => ConnectError::PasswordRequired,
            Status::FORBIDDEN => ConnectError::WrongPassword,
            Status::NOT_ALLOWED => ConnectError::NotAllowed,
            Status::BUSY => ConnectError::Busy,
            Status::VERSION_NOT_SUPPORTED => ConnectError::VersionNotSupported,
            Status::BAD_REQUEST => ConnectError::BadRequest,
            other => ConnectError::UnexpectedStatus(other),
        }
    }
}

/// Why a command did not succeed.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The projector answered `ERR`: it refused the command (unknown, not allowed in this
    /// state, bad parameter).
    #[error("the projector refused the command (ERR)")]
    Refused,
    /// No reply within the command's deadline; the session is closed.
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    /// The session closed before the reply.
    #[error("the session closed: {0}")]
    Closed(CloseReason),
}

/// Why a session closed.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(ConnectError),
    /// A command timed out.
    #[error("a command timed out")]
    CommandTimedOut,
    /// The projector sent bytes that are not ESC/VP21.
    #[error("malformed data from the projector: {0}")]
    Malformed(DecodeError),
    /// The peer closed the connection (reported by the I/O layer).
    #[error("the projector closed the connection")]
    PeerClosed,
    /// [`Session::close`] was called.
    #[error("closed locally")]
    Local,
}

/// Caller misuse of [`Session::send`].
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The session is closed.
    #[error("the session is closed: {0}")]
    Closed(CloseReason),
    /// Too many commands are queued.
    #[error("too many queued commands (at most {0})")]
    QueueFull(usize),
}

/// A status notification (IMEVENT), owned.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StatusChange {
    /// The projector status.
    pub status: ImStatus,
    /// Active warnings.
    pub warnings: Warnings,
    /// Active alarms.
    pub alarms: Alarms,
    /// The raw value after `IMEVENT=`.
    pub raw: String,
}

/// Something that happened in the session.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Event {
    /// The CONNECT handshake succeeded; commands can flow.
    Connected,
    /// A command completed.
    Completed {
        /// The id [`Session::send`] returned.
        id: CommandId,
        /// Its answer or error.
        result: Result<Answer, CommandError>,
    },
    /// An IMEVENT notification.
    Status(StatusChange),
    /// An IMEVENT whose value could not be decoded (raw text).
    MalformedStatus(String),
    /// A reply that matches no command in flight (e.g. a late answer), with its bytes.
    Unexpected(String),
    /// The session closed; every pending command has been failed before this event.
    Closed(CloseReason),
}

#[derive(Debug)]
enum State {
    Handshake { deadline: Instant, buf: Vec<u8> },
    Open,
    Closed(CloseReason),
}

#[derive(Debug)]
struct InFlight {
    id: CommandId,
    command: Command,
    deadline: Instant,
    timeout: Duration,
}

/// The session state machine. See the [module docs](self).
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    decoder: ReplyDecoder,
    input: Vec<u8>,
    transmit: VecDeque<Vec<u8>>,
    queue: VecDeque<(CommandId, Command)>,
    in_flight: Option<InFlight>,
    quiet_until: Option<Instant>,
    events: VecDeque<Event>,
    next_id: u64,
}

impl Session {
    /// A new session; its CONNECT request is ready in [`Self::poll_transmit`].
    pub fn new(config: SessionConfig, now: Instant) -> Session {
        let connect = Message::connect(config.password.as_ref()).to_bytes();
        let decoder = ReplyDecoder::with_max_len(config.max_reply_len);
        let deadline = now + config.handshake_timeout;
        Session {
            config,
            state: State::Handshake {
                deadline,
                buf: Vec::with_capacity(16),
            },
            decoder,
            input: Vec::new(),
            transmit: VecDeque::from([connect]),
            queue: VecDeque::new(),
            in_flight: None,
            quiet_until: None,
            events: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Whether the handshake succeeded and the session is not closed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Why the session closed, if it did.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.state {
            State::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// Queues a command. It is sent once the handshake is done, the previous command has
    /// completed and any quiet period has passed.
    pub fn send(&mut self, command: Command, now: Instant) -> Result<CommandId, SendError> {
        if let State::Closed(r) = &self.state {
            return Err(SendError::Closed(r.clone()));
        }
        if self.queue.len() >= self.config.max_queue {
            return Err(SendError::QueueFull(self.config.max_queue));
        }
        let id = CommandId(self.next_id);
        self.next_id += 1;
        self.queue.push_back((id, command));
        self.pump(now);
        Ok(id)
    }

    /// Feeds bytes received from the projector.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        match &mut self.state {
            State::Closed(_) => {}
            State::Handshake { buf, .. } => {
                buf.extend_from_slice(bytes);
                match Message::decode(buf) {
                    Err(DecodeError::Incomplete { .. }) => {}
                    Err(e) => self.close(CloseReason::Handshake(ConnectError::Malformed(e))),
                    Ok((rest, reply)) => {
                        let rest = rest.to_vec();
                        if reply.version() != Version::V1_0 || reply.kind() != MessageType::CONNECT
                        {
                            // A non-OK status is more telling than the echoed type (some
                            // projectors echo other types in refusals).
                            if reply.status() != Status::OK {
                                self.close(CloseReason::Handshake(ConnectError::from_status(
                                    reply.status(),
                                )));
                            } else {
                                self.close(CloseReason::Handshake(ConnectError::UnexpectedReply {
                                    kind: reply.kind(),
                                    version: reply.version(),
                                }));
                            }
                        } else if reply.status() != Status::OK {
                            self.close(CloseReason::Handshake(ConnectError::from_status(
                                reply.status(),
                            )));
                        } else {
                            self.state = State::Open;
                            self.events.push_back(Event::Connected);
                            self.input = rest;
                            self.process_input(now);
                            self.pump(now);
                        }
                    }
                }
            }
            State::Open => {
                self.input.extend_from_slice(bytes);
                self.process_input(now);
                self.pump(now);
            }
        }
    }

    /// Tells the session the connection was closed by the peer (EOF or I/O error).
    pub fn handle_peer_closed(&mut self) {
        if !matches!(self.state, State::Closed(_)) {
            self.close(match &self.state {
                State::Handshake { .. } => CloseReason::Handshake(ConnectError::Closed),
                _ => CloseReason::PeerClosed,
            });
        }
    }

    /// Closes the session locally, failing pending commands.
    pub fn close(&mut self, reason: CloseReason) {
        if matches!(self.state, State::Closed(_)) {
            return;
        }
        if let Some(f) = self.in_flight.take() {
            self.events.push_back(Event::Completed {
                id: f.id,
                result: Err(CommandError::Closed(reason.clone())),
            });
        }
        for (id, _) in self.queue.drain(..) {
            self.events.push_back(Event::Completed {
                id,
                result: Err(CommandError::Closed(reason.clone())),
            });
        }
        self.transmit.clear();
        self.events.push_back(Event::Closed(reason.clone()));
        self.state = State::Closed(reason);
    }

    /// Processes the passage of time: handshake and command deadlines, quiet periods.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Handshake { deadline, .. } if now >= *deadline => {
                self.close(CloseReason::Handshake(ConnectError::TimedOut));
            }
            State::Open => {
                let expired = self.in_flight.as_ref().is_some_and(|f| now >= f.deadline);
                if let Some(f) = self.in_flight.take_if(|_| expired) {
                    tracing::debug!(command = %f.command, "ESC/VP21 command timed out");
                    self.events.push_back(Event::Completed {
                        id: f.id,
                        result: Err(CommandError::TimedOut(f.timeout)),
                    });
                    self.close(CloseReason::CommandTimedOut);
                    return;
                }
                self.pump(now);
            }
            _ => {}
        }
    }

    /// The next instant at which [`Self::handle_timeout`] must be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Handshake { deadline, .. } => Some(*deadline),
            State::Open => match &self.in_flight {
                Some(f) => Some(f.deadline),
                None if !self.queue.is_empty() => self.quiet_until,
                None => None,
            },
            State::Closed(_) => None,
        }
    }

    /// The next bytes to write to the projector.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Number of commands queued or in flight.
    pub fn pending(&self) -> usize {
        self.queue.len() + usize::from(self.in_flight.is_some())
    }

    /// When the quiet period after a `PWR OFF` ends, while one may still be running (it is
    /// cleared once a command has been sent after it). Remember it per projector (see
    /// [`QuietPeriods`]) so that a later session to the same projector keeps it.
    pub fn quiet_until(&self) -> Option<Instant> {
        self.quiet_until
    }

    /// Sends no command before `until`: a quiet period that began in an earlier session to the
    /// same projector (a reconnect must not cut it short). The handshake is not held; commands
    /// queue meanwhile and [`Self::poll_timeout`] wakes the caller when it ends. A later
    /// `until` than the current quiet period extends it; an earlier one changes nothing.
    pub fn hold_until(&mut self, until: Instant) {
        if self.quiet_until.is_none_or(|q| q < until) {
            self.quiet_until = Some(until);
        }
    }

    fn pump(&mut self, now: Instant) {
        if !matches!(self.state, State::Open) || self.in_flight.is_some() {
            return;
        }
        if let Some(q) = self.quiet_until {
            if now < q {
                return;
            }
            self.quiet_until = None;
        }
        if let Some((id, command)) = self.queue.pop_front() {
            let timeout = command
                .timing()
                .reply_within
                .mul_f64(self.config.timeout_scale.max(0.0));
            self.transmit.push_back(command.to_bytes());
            self.in_flight = Some(InFlight {
                id,
                command,
                deadline: now + timeout,
                timeout,
            });
        }
    }

    fn process_input(&mut self, now: Instant) {
        let mut consumed = 0;
        loop {
            let rest = &self.input[consumed..];
            match self.decoder.decode(rest) {
                Ok(None) => break,
                Ok(Some((n, reply))) => {
                    consumed += n;
                    let outcome = classify(self.in_flight.as_ref().map(|f| &f.command), &reply);
                    self.apply(outcome, now);
                }
                Err(e) => {
                    self.input.clear();
                    self.decoder.reset();
                    self.close(CloseReason::Malformed(e));
                    return;
                }
            }
        }
        self.input.drain(..consumed);
    }

    fn apply(&mut self, outcome: Outcome, now: Instant) {
        match outcome {
            Outcome::Event(ev) => self.events.push_back(ev),
            Outcome::Unexpected(text) => {
                tracing::debug!(reply = %text, "reply matches no command in flight");
                self.events.push_back(Event::Unexpected(text));
            }
            Outcome::Complete(result) => {
                if let Some(f) = self.in_flight.take() {
                    if result.is_ok() {
                        let quiet = f.command.timing().quiet_after;
                        if !quiet.is_zero() {
                            self.quiet_until =
                                Some(now + quiet.mul_f64(self.config.timeout_scale.max(0.0)));
                        }
                    }
                    self.events.push_back(Event::Completed { id: f.id, result });
                }
            }
        }
    }
}

/// Quiet periods per projector, kept across sessions: a reconnect to a projector that was
/// switched off moments ago must still wait out the quiet period after its `PWR OFF`.
///
/// Sans-IO like [`Session`]: every call takes `now`. Record [`Session::quiet_until`] under the
/// projector's key when it changes; give a new session [`QuietPeriods::until`] through
/// [`Session::hold_until`]. Bounded: expired entries are dropped as new ones arrive, and past
/// `max_entries` the entry that ends first is dropped.
#[derive(Clone, Debug)]
pub struct QuietPeriods<K> {
    until: std::collections::HashMap<K, Instant>,
    max_entries: usize,
}

impl<K: Eq + std::hash::Hash + Clone> Default for QuietPeriods<K> {
    fn default() -> Self {
        QuietPeriods::new(4096)
    }
}

impl<K: Eq + std::hash::Hash + Clone> QuietPeriods<K> {
    /// An empty registry holding at most `max_entries` projectors (at least one).
    pub fn new(max_entries: usize) -> Self {
        QuietPeriods {
            until: std::collections::HashMap::new(),
            max_entries: max_entries.max(1),
        }
    }

    /// Notes that `key`'s quiet period lasts until `until` (a later time than one already
    /// noted wins).
    pub fn record(&mut self, key: K, until: Instant, now: Instant) {
        self.until.retain(|_, u| *u > now);
        if until <= now {
            return;
        }
        if !self.until.contains_key(&key)
            && self.until.len() >= self.max_entries
            && let Some(first) = self
                .until
                .iter()
                .min_by_key(|(_, u)| **u)
                .map(|(k, _)| k.clone())
        {
            self.until.remove(&first);
        }
        let entry = self.until.entry(key).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    /// The end of `key`'s quiet period if it is still running at `now`.
    pub fn until(&self, key: &K, now: Instant) -> Option<Instant> {
        self.until.get(key).copied().filter(|u| *u > now)
    }

    /// Number of projectors noted (including expired entries not yet dropped).
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Whether nothing is noted.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

enum Outcome {
    Event(Event),
    Unexpected(String),
    Complete(Result<Answer, CommandError>),
}

fn classify(in_flight: Option<&Command>, reply: &Reply<'_>) -> Outcome {
    if let Reply::Event(ev) = reply {
        return Outcome::Event(match ev.report() {
            Ok(r) => Event::Status(StatusChange {
                status: r.status,
                warnings: r.warnings,
                alarms: r.alarms,
                raw: ev.raw().to_owned(),
            }),
            Err(_) => Event::MalformedStatus(ev.raw().to_owned()),
        });
    }
    let unexpected =
        || Outcome::Unexpected(String::from_utf8_lossy(&reply.to_bytes()).into_owned());
    let Some(cmd) = in_flight else {
        return unexpected();
    };
    match (cmd, reply) {
        (_, Reply::Err) => Outcome::Complete(Err(CommandError::Refused)),
        (Command::Query(name), Reply::Value { key, value }) if *key == name.as_str() => {
            Outcome::Complete(Ok(Answer::Value((*value).to_owned())))
        }
        (Command::Query(_), Reply::Lines(lines)) => Outcome::Complete(Ok(Answer::Lines(
            lines
                .iter()
                .map(|l| (l.key.to_owned(), l.value.to_owned()))
                .collect(),
        ))),
        (Command::Set(..) | Command::Null, Reply::Ack) => Outcome::Complete(Ok(Answer::Ack)),
        _ => unexpected(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{PowerCommand, Property, Source, SourceCode};

    const OK: &[u8] = b"ESC/VP.net\x10\x03\x00\x00\x20\x00";

    fn open(t0: Instant) -> Session {
        let mut s = Session::new(SessionConfig::default(), t0);
        s.poll_transmit();
        s.handle_input(OK, t0);
        assert_eq!(s.poll_event(), Some(Event::Connected));
        s
    }

    #[test]
    fn refusals_are_typed() {
        let t0 = Instant::now();
        for (status, err) in [
            (0x41, ConnectError::PasswordRequired),
            (0x43, ConnectError::WrongPassword),
            (0x45, ConnectError::NotAllowed),
            (0x53, ConnectError::Busy),
            (0x55, ConnectError::VersionNotSupported),
            (0x40, ConnectError::BadRequest),
        ] {
            let mut s = Session::new(SessionConfig::default(), t0);
            let id = s.send(Command::Null, t0).unwrap();
            let mut reply = OK.to_vec();
            reply[14] = status;
            s.handle_input(&reply, t0);
            assert_eq!(
                s.poll_event(),
                Some(Event::Completed {
                    id,
                    result: Err(CommandError::Closed(CloseReason::Handshake(err.clone())))
                })
            );
            assert_eq!(
                s.poll_event(),
                Some(Event::Closed(CloseReason::Handshake(err)))
            );
            assert!(s.send(Command::Null, t0).is_err());
        }
    }

    #[test]
    fn one_in_flight_and_pairing_by_key() {
        let t0 = Instant::now();
        let mut s = open(t0);
        let a = s.send(Command::query("SNO").unwrap(), t0).unwrap();
        let b = s.send(Command::query("PWR").unwrap(), t0).unwrap();
        assert_eq!(s.poll_transmit().unwrap(), b"SNO?\r");
        assert_eq!(s.poll_transmit(), None, "second command waits");
        // A stray value with another key is not SNO's reply.
        s.handle_input(b"PWR=04\r:SNO=X8JK", t0);
        assert!(matches!(s.poll_event(), Some(Event::Unexpected(_))));
        s.handle_input(b"0000001\r:", t0);
        assert_eq!(
            s.poll_event(),
            Some(Event::Completed {
                id: a,
                result: Ok(Answer::Value("X8JK0000001".into()))
            })
        );
        assert_eq!(s.poll_transmit().unwrap(), b"PWR?\r");
        s.handle_input(b"ERR\r:", t0);
        assert_eq!(
            s.poll_event(),
            Some(Event::Completed {
                id: b,
                result: Err(CommandError::Refused)
            })
        );
    }

    #[test]
    fn timeout_closes_and_quiet_period_after_power_off() {
        let t0 = Instant::now();
        let mut s = open(t0);
        let off = s.send(PowerCommand::Off.command(), t0).unwrap();
        s.poll_transmit();
        s.handle_input(b":", t0);
        assert!(
            matches!(s.poll_event(), Some(Event::Completed { id, result: Ok(Answer::Ack) }) if id == off)
        );
        let q = s
            .send(Source::set(&SourceCode::HDMI1).unwrap(), t0)
            .unwrap();
        assert_eq!(s.poll_transmit(), None, "quiet period");
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        s.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(s.poll_transmit().unwrap(), b"SOURCE 30\r");
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.poll_timeout(), Some(t1 + Duration::from_secs(5)));
        s.handle_timeout(t1 + Duration::from_secs(5));
        assert_eq!(
            s.poll_event(),
            Some(Event::Completed {
                id: q,
                result: Err(CommandError::TimedOut(Duration::from_secs(5)))
            })
        );
        assert_eq!(
            s.poll_event(),
            Some(Event::Closed(CloseReason::CommandTimedOut))
        );
    }

    #[test]
    fn power_on_without_reply_times_out_at_100_s_not_earlier_not_never() {
        let t0 = Instant::now();
        let mut s = open(t0);
        let id = s.send(PowerCommand::On.command(), t0).unwrap();
        assert_eq!(s.poll_transmit().unwrap(), b"PWR ON\r");
        let deadline = t0 + Duration::from_secs(100);
        assert_eq!(s.poll_timeout(), Some(deadline));
        // Warm-up notifications are events, not the reply: the command stays in flight.
        s.handle_input(
            b"IMEVENT=0001 02 00000000 00000000 T1 F1\r:",
            t0 + Duration::from_secs(1),
        );
        assert!(matches!(s.poll_event(), Some(Event::Status(_))));
        // Wake-ups before the deadline (other models' 20, 40 and 70 s; one tick early)
        // time nothing out.
        for t in [20, 40, 70, 99] {
            s.handle_timeout(t0 + Duration::from_secs(t));
            assert_eq!(s.poll_event(), None, "timed out at {t} s");
        }
        s.handle_timeout(deadline - Duration::from_millis(1));
        assert_eq!(s.poll_event(), None, "timed out before 100 s");
        assert!(s.is_open());
        assert_eq!(s.pending(), 1);
        assert_eq!(s.poll_timeout(), Some(deadline));
        s.handle_timeout(deadline);
        assert_eq!(
            s.poll_event(),
            Some(Event::Completed {
                id,
                result: Err(CommandError::TimedOut(Duration::from_secs(100)))
            })
        );
        assert_eq!(
            s.poll_event(),
            Some(Event::Closed(CloseReason::CommandTimedOut))
        );
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn quiet_period_survives_a_reconnect() {
        let t0 = Instant::now();
        let mut quiet = QuietPeriods::default();
        let mut s = open(t0);
        s.send(PowerCommand::Off.command(), t0).unwrap();
        assert_eq!(s.poll_transmit().unwrap(), b"PWR OFF\r");
        let acked = t0 + Duration::from_secs(2);
        s.handle_input(b":", acked);
        let end = acked + Duration::from_secs(10);
        assert_eq!(s.quiet_until(), Some(end));
        quiet.record("projector-1", end, acked);
        // The connection is lost during the quiet period; a new session opens 3 s later.
        s.handle_peer_closed();
        let t1 = acked + Duration::from_secs(3);
        let mut s2 = Session::new(SessionConfig::default(), t1);
        assert_eq!(quiet.until(&"projector-1", t1), Some(end));
        assert_eq!(quiet.until(&"projector-2", t1), None, "per projector");
        s2.hold_until(quiet.until(&"projector-1", t1).unwrap());
        s2.poll_transmit();
        s2.handle_input(OK, t1);
        assert_eq!(s2.poll_event(), Some(Event::Connected));
        let id = s2.send(crate::value::Power::query(), t1).unwrap();
        assert_eq!(
            s2.poll_transmit(),
            None,
            "nothing sent during the quiet period"
        );
        assert_eq!(s2.poll_timeout(), Some(end));
        s2.handle_timeout(end - Duration::from_millis(1));
        assert_eq!(s2.poll_transmit(), None, "nothing sent before it ends");
        s2.handle_timeout(end);
        assert_eq!(s2.poll_transmit().unwrap(), b"PWR?\r");
        s2.handle_input(b"PWR=04\r:", end);
        assert_eq!(
            s2.poll_event(),
            Some(Event::Completed {
                id,
                result: Ok(Answer::Value("04".into()))
            })
        );
        // Once over, the registry holds nothing back.
        assert_eq!(quiet.until(&"projector-1", end), None);
        // An earlier hold does not shorten a running quiet period.
        let mut s3 = open(t1);
        s3.hold_until(end);
        s3.hold_until(t1);
        assert_eq!(s3.quiet_until(), Some(end));
    }

    #[test]
    fn quiet_periods_are_bounded() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut quiet = QuietPeriods::new(2);
        quiet.record(1, t0 + s(5), t0);
        quiet.record(2, t0 + s(10), t0);
        quiet.record(3, t0 + s(20), t0);
        assert_eq!(quiet.len(), 2);
        assert_eq!(
            quiet.until(&1, t0),
            None,
            "the entry ending first made room"
        );
        assert_eq!(quiet.until(&3, t0), Some(t0 + s(20)));
        // A later end wins, an earlier one does not shorten it.
        quiet.record(3, t0 + s(15), t0);
        assert_eq!(quiet.until(&3, t0), Some(t0 + s(20)));
        // Expired entries are dropped when the next one arrives.
        quiet.record(4, t0 + s(30), t0 + s(12));
        assert_eq!(quiet.len(), 2);
        assert_eq!(quiet.until(&2, t0), None);
    }

    #[test]
    fn garbage_closes_with_malformed() {
        let t0 = Instant::now();
        let mut s = open(t0);
        let id = s.send(crate::value::Power::query(), t0).unwrap();
        s.handle_input(b"\x00\x01\x02\r:", t0);
        assert!(matches!(
            s.poll_event(),
            Some(Event::Completed { id: i, result: Err(CommandError::Closed(CloseReason::Malformed(_))) }) if i == id
        ));
    }

    #[test]
    fn handshake_timeout() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        s.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(
            s.poll_event(),
            Some(Event::Closed(CloseReason::Handshake(
                ConnectError::TimedOut
            )))
        );
    }
}
