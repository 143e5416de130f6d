//! ESC/VP21 text framing: replies (projector → client) and requests (client → projector).
//!
//! A reply ends with a colon. A successful set and the null command answer `:` alone (some
//! emulators send `\r:`), a query answers `KEY=VALUE\r:`, a refused command answers `ERR\r:`,
//! and a few queries answer several lines before the colon. `IMEVENT=…\r:` arrives unsolicited
//! at any time, even between a request and its reply. `\r\n` is tolerated wherever `\r` is.
//!
//! A colon terminates a reply only when it starts the reply or follows a line break, so a
//! value such as `12:30` stays intact. Decoding never allocates: a [`Reply`] borrows from the
//! input.
//!
//! ```
//! use escvp::vp21::{Reply, ReplyDecoder};
//!
//! let mut dec = ReplyDecoder::new();
//! let input = b"IMEVENT=0001 03 00000002 00000000 T1 F1\r:PWR=01\r:";
//! let (n, first) = dec.decode(input).unwrap().unwrap();
//! assert!(matches!(first, Reply::Event(_)));
//! let (_, second) = dec.decode(&input[n..]).unwrap().unwrap();
//! assert_eq!(second, Reply::Value { key: "PWR", value: "01" });
//! ```

use core::fmt;

use bytes::BufMut;

use crate::error::{DecodeError, InvalidKind, ValueError, check_text};
use crate::event::StatusEvent;

/// Default maximum length of one reply (all its lines and the colon), in bytes.
pub const DEFAULT_MAX_REPLY_LEN: usize = 4096;
/// Default maximum length of one line of a reply (line break excluded), in bytes.
pub const DEFAULT_MAX_LINE_LEN: usize = 1024;
/// Default maximum length of one request line, in bytes.
pub const DEFAULT_MAX_REQUEST_LEN: usize = 256;
/// Longest command name accepted.
pub const MAX_NAME_LEN: usize = 32;
/// Longest parameter accepted.
pub const MAX_PARAM_LEN: usize = 200;

const CR: u8 = b'\r';
const LF: u8 = b'\n';
const COLON: u8 = b':';

/// One reply from a projector, borrowed from the input.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `:` or `\r:`: a set or the null command succeeded.
    Ack,
    /// `KEY=VALUE\r:`: the answer to `KEY?`.
    Value {
        /// The key, e.g. `PWR`.
        key: &'a str,
        /// The value, e.g. `01`; may be empty or contain spaces.
        value: &'a str,
    },
    /// More than one line before the colon (e.g. `AXESADJ?`).
    Lines(Lines<'a>),
    /// `ERR\r:`: the projector refused the command. A decoded value, not a decode error.
    Err,
    /// `IMEVENT=…\r:`: an unsolicited status-change notification.
    Event(StatusEvent<'a>),
}

impl<'a> Reply<'a> {
    /// The key of a `Value` or the key of the first line of `Lines`.
    pub fn key(&self) -> Option<&'a str> {
        match self {
            Reply::Value { key, .. } => Some(key),
            Reply::Lines(lines) => lines.iter().next().map(|l| l.key),
            Reply::Event(_) => Some("IMEVENT"),
            Reply::Ack | Reply::Err => None,
        }
    }

    /// A `KEY=VALUE` reply, checked so that it encodes to bytes that decode back to it: the
    /// key is a command name other than `IMEVENT`, the value has no line break or control
    /// character.
    pub fn value(key: &'a str, value: &'a str) -> Result<Reply<'a>, ValueError> {
        let reply = Reply::Value { key, value };
        reply.check()?;
        Ok(reply)
    }

    /// Checks a reply built by hand (the variants' fields are public): `Ok` when
    /// [`encode`](Self::encode) writes bytes that [`decode`](Self::decode) turns back into an
    /// equal reply and the text has no control character. (A decoded reply fails only if
    /// the projector sent control characters, which the decoder passes through.)
    pub fn check(&self) -> Result<(), ValueError> {
        match self {
            Reply::Ack | Reply::Err | Reply::Lines(_) => Ok(()),
            Reply::Value { key, value } => {
                validate_name(key)?;
                if *key == "IMEVENT" {
                    return Err(ValueError::parse(
                        "reply key",
                        key,
                        "a key other than IMEVENT (use Reply::Event)",
                    ));
                }
                check_line_text("reply value", value)
            }
            Reply::Event(ev) => check_line_text("IMEVENT value", ev.raw()),
        }
    }

    /// Appends the reply as a projector sends it. `Ack` is written as `:` alone (write `\r`
    /// first for the `\r:` form some emulators use).
    ///
    /// Encoding cannot fail and cannot inject a second reply: in a hand-built reply that does
    /// not pass [`check`](Self::check), line breaks inside the key or value are written as
    /// spaces.
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Reply::Ack => out.put_u8(COLON),
            Reply::Value { key, value } => {
                put_line_text(out, key);
                out.put_u8(b'=');
                put_line_text(out, value);
                out.put_slice(b"\r:");
            }
            Reply::Lines(lines) => {
                out.put_slice(lines.raw.as_bytes());
                out.put_u8(COLON);
            }
            Reply::Err => out.put_slice(b"ERR\r:"),
            Reply::Event(ev) => {
                out.put_slice(b"IMEVENT=");
                put_line_text(out, ev.raw());
                out.put_slice(b"\r:");
            }
        }
    }

    /// Whether this is an unsolicited `IMEVENT` rather than the answer to a command.
    pub fn is_event(&self) -> bool {
        matches!(self, Reply::Event(_))
    }

    /// The reply as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one reply from the start of `input` with the default maximum length.
    pub fn decode(input: &'a [u8]) -> Result<(&'a [u8], Reply<'a>), DecodeError> {
        let mut dec = ReplyDecoder::new();
        match dec.decode(input)? {
            Some((n, reply)) => Ok((&input[n..], reply)),
            None => Err(DecodeError::Incomplete { needed: 1 }),
        }
    }
}

impl fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Ack => f.write_str("Ack"),
            Reply::Value { key, value } => write!(f, "Value({key}={value:?})"),
            Reply::Lines(l) => f.debug_list().entries(l.iter()).finish(),
            Reply::Err => f.write_str("Err"),
            Reply::Event(e) => write!(f, "Event({e:?})"),
        }
    }
}

/// An owned reply, for channels and codecs that cannot borrow from the read buffer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum OwnedReply {
    /// See [`Reply::Ack`].
    Ack,
    /// See [`Reply::Value`].
    Value {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// See [`Reply::Lines`]: the raw lines, each ending with a line break.
    Lines(String),
    /// See [`Reply::Err`].
    Err,
    /// See [`Reply::Event`]: the text after `IMEVENT=`.
    Event(String),
}

impl OwnedReply {
    /// Borrows it as a [`Reply`].
    pub fn as_reply(&self) -> Reply<'_> {
        match self {
            OwnedReply::Ack => Reply::Ack,
            OwnedReply::Value { key, value } => Reply::Value { key, value },
            OwnedReply::Lines(raw) => Reply::Lines(Lines { raw }),
            OwnedReply::Err => Reply::Err,
            OwnedReply::Event(raw) => Reply::Event(StatusEvent::new(raw)),
        }
    }
}

impl From<Reply<'_>> for OwnedReply {
    fn from(r: Reply<'_>) -> Self {
        match r {
            Reply::Ack => OwnedReply::Ack,
            Reply::Value { key, value } => OwnedReply::Value {
                key: key.to_owned(),
                value: value.to_owned(),
            },
            Reply::Lines(l) => OwnedReply::Lines(l.raw.to_owned()),
            Reply::Err => OwnedReply::Err,
            Reply::Event(e) => OwnedReply::Event(e.raw().to_owned()),
        }
    }
}

/// The lines of a multi-line reply, without the final colon.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Lines<'a> {
    raw: &'a str,
}

impl<'a> Lines<'a> {
    /// A multi-line reply body for a projector to send: at least two non-empty lines,
    /// separated by `\r` (or `\r\n`), starting with text and ending with a line break,
    /// no line starting with `:` and no control character. For example
    /// `"R=126 126 126\rG=126 126 126\r"`.
    pub fn new(raw: &'a str) -> Result<Lines<'a>, ValueError> {
        const WHAT: &str = "multi-line reply";
        let bytes = raw.as_bytes();
        if let Some(b) = bytes.iter().copied().find(|&b| is_forbidden(b)) {
            return Err(ValueError::BadChar {
                what: WHAT,
                ch: char::from(b),
            });
        }
        let starts_ok = bytes
            .first()
            .is_some_and(|&b| !is_line_break(b) && b != COLON);
        let ends_ok = bytes.last().is_some_and(|&b| is_line_break(b));
        let colon_at_line_start = bytes
            .windows(2)
            .any(|w| is_line_break(w[0]) && w[1] == COLON);
        if !starts_ok || !ends_ok || colon_at_line_start || split_lines(bytes).count() < 2 {
            return Err(ValueError::parse(
                WHAT,
                raw,
                "two or more lines, each ended by a line break, none starting with ':'",
            ));
        }
        Ok(Lines { raw })
    }

    /// The raw text (lines separated by `\r` or `\r\n`, ending with a line break).
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The non-empty lines, each split at its first `=`.
    pub fn iter(&self) -> impl Iterator<Item = Line<'a>> + 'a {
        split_lines(self.raw.as_bytes()).filter_map(|l| {
            let s = core::str::from_utf8(l).ok()?;
            Some(Line::split(s))
        })
    }
}

impl fmt::Debug for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// One line of a multi-line reply.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Line<'a> {
    /// The text before `=`, or the whole line when there is no `=`.
    pub key: &'a str,
    /// The text after `=`, or `""`.
    pub value: &'a str,
}

impl<'a> Line<'a> {
    fn split(s: &'a str) -> Line<'a> {
        match s.split_once('=') {
            Some((key, value)) => Line { key, value },
            None => Line { key: s, value: "" },
        }
    }
}

fn split_lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    raw.split(|&b| b == CR || b == LF).filter(|l| !l.is_empty())
}

/// Writes text that must stay on one line, turning any line break into a space.
fn put_line_text(out: &mut impl BufMut, text: &str) {
    let bytes = text.as_bytes();
    if memchr::memchr2(CR, LF, bytes).is_none() {
        out.put_slice(bytes);
    } else {
        for &b in bytes {
            out.put_u8(if is_line_break(b) { b' ' } else { b });
        }
    }
}

/// Checks text that must stay on one line of a reply.
fn check_line_text(what: &'static str, text: &str) -> Result<(), ValueError> {
    match text.bytes().find(|&b| is_line_break(b) || is_forbidden(b)) {
        Some(b) => Err(ValueError::BadChar {
            what,
            ch: char::from(b),
        }),
        None => Ok(()),
    }
}

/// Incremental reply framer: finds where each reply ends, resuming where it stopped.
///
/// - A reply ends at a colon that starts the reply or follows a line break (`\r` or `\n`).
/// - Every reply is at most [`max_len`](Self::max_len) bytes long (colon included) and every
///   line in it at most [`max_line`](Self::max_line) bytes (line break excluded); longer input
///   is an [`InvalidKind::TooLong`] / [`InvalidKind::LineTooLong`] error as soon as the limit
///   is crossed, so memory stays bounded whatever the peer sends.
/// - Scanning resumes where it stopped: feeding a long reply one byte at a time costs linear,
///   not quadratic, time. Use one decoder per byte stream and always pass the stream's
///   unconsumed bytes from their start.
/// - Decoding never allocates; the [`Reply`] borrows from the input.
/// - After an error, [`recover`](Self::recover) says how many bytes to drop to get back in
///   step; the decoder then resumes at the next reply.
#[derive(Clone, Debug)]
pub struct ReplyDecoder {
    max_len: usize,
    max_line: usize,
    /// Bytes at the start of the input that belong to a bad reply already skipped.
    skip: usize,
    /// Bytes after `skip` known to hold no terminating colon.
    scanned: usize,
    /// Start of the current line, for the line-length limit of incomplete replies.
    line_start: usize,
    /// How far line breaks have been looked for.
    line_scanned: usize,
    recovery: Recovery,
}

/// What [`ReplyDecoder::recover`] / [`RequestDecoder::recover`] do after an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recovery {
    /// No error pending.
    None,
    /// The bad frame ends after this many bytes of the input given to the failing call.
    Known(usize),
    /// The bad frame's end has not arrived yet.
    Unknown,
    /// The caller dropped the start of a bad frame; skip up to and including the next
    /// terminator. `at_line_start`: whether the dropped bytes ended with a line break.
    Skipping { at_line_start: bool },
}

impl Default for ReplyDecoder {
    fn default() -> Self {
        ReplyDecoder::new()
    }
}

#[inline]
fn is_line_break(b: u8) -> bool {
    b == CR || b == LF
}

/// Control characters other than tab, line breaks and DEL: the decoder passes them through in
/// values (so that no data is lost), but the checked constructors refuse them.
#[inline]
fn is_forbidden(b: u8) -> bool {
    (b < 0x20 && b != b'\t' && b != CR && b != LF) || b == 0x7F
}

impl ReplyDecoder {
    /// A decoder with [`DEFAULT_MAX_REPLY_LEN`] and [`DEFAULT_MAX_LINE_LEN`].
    pub const fn new() -> Self {
        ReplyDecoder::with_limits(DEFAULT_MAX_LINE_LEN, DEFAULT_MAX_REPLY_LEN)
    }

    /// A decoder that refuses replies longer than `max_len` bytes (at least 2); lines are
    /// limited to the smaller of `max_len` and [`DEFAULT_MAX_LINE_LEN`].
    pub const fn with_max_len(max_len: usize) -> Self {
        ReplyDecoder::with_limits(DEFAULT_MAX_LINE_LEN, max_len)
    }

    /// A decoder that refuses lines longer than `max_line` bytes (at least 1, line break
    /// excluded) and replies longer than `max_len` bytes (at least 2, colon included).
    pub const fn with_limits(max_line: usize, max_len: usize) -> Self {
        let max_len = if max_len < 2 { 2 } else { max_len };
        let max_line = if max_line < 1 { 1 } else { max_line };
        ReplyDecoder {
            max_len,
            max_line: if max_line > max_len {
                max_len
            } else {
                max_line
            },
            skip: 0,
            scanned: 0,
            line_start: 0,
            line_scanned: 0,
            recovery: Recovery::None,
        }
    }

    /// The maximum reply length.
    pub const fn max_len(&self) -> usize {
        self.max_len
    }

    /// The maximum line length.
    pub const fn max_line(&self) -> usize {
        self.max_line
    }

    /// Forgets all state (call after discarding buffered bytes yourself).
    pub fn reset(&mut self) {
        self.skip = 0;
        self.reset_scan();
        self.recovery = Recovery::None;
    }

    fn reset_scan(&mut self) {
        self.scanned = 0;
        self.line_start = 0;
        self.line_scanned = 0;
    }

    /// After [`decode`](Self::decode) returned an error: the number of bytes to drop from the
    /// front of `input` (the same unconsumed bytes) to get back in step.
    ///
    /// If the end of the bad reply is already in `input` (even beyond the length limit), that
    /// is everything up to and including its colon. Otherwise it is all of `input`, and the
    /// decoder skips whatever follows up to the next reply terminator. Returns 0 when no error
    /// is pending.
    pub fn recover(&mut self, input: &[u8]) -> usize {
        let at_line_start = match self.recovery {
            Recovery::None => return 0,
            Recovery::Known(end) => {
                self.recovery = Recovery::None;
                self.skip = 0;
                self.reset_scan();
                return end.min(input.len());
            }
            // The bad reply started at `input[0]`, where no colon can be (it would have ended
            // the reply there).
            Recovery::Unknown => false,
            Recovery::Skipping { at_line_start } => at_line_start,
        };
        self.skip = 0;
        self.reset_scan();
        match self.find_end(input, at_line_start) {
            Some(end) => {
                self.recovery = Recovery::None;
                self.reset_scan();
                end + 1
            }
            None => {
                self.recovery = Recovery::Skipping {
                    at_line_start: input.last().map_or(at_line_start, |&b| is_line_break(b)),
                };
                self.reset_scan();
                input.len()
            }
        }
    }

    /// Decodes the next reply from `input` (the unconsumed bytes, from their start).
    ///
    /// Returns `Ok(None)` when more bytes are needed, `Ok(Some((consumed, reply)))` for a
    /// complete reply, and an error for bytes that can never form a reply: a reply or line
    /// over the limits, text that is not UTF-8, a single line that is neither `ERR` nor
    /// `KEY=VALUE` with a command-name key. Control characters inside values are passed
    /// through, not refused, so that no data is lost. After an error call
    /// [`recover`](Self::recover) and drop that many bytes; a session may also choose to drop
    /// the connection instead.
    ///
    /// Memory stays bounded: `Ok(None)` is returned only while the unconsumed bytes are
    /// shorter than `max_len`, except right after a recovery, when the tail of the bad reply
    /// that arrived in the same read is consumed together with the next reply.
    #[inline]
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(usize, Reply<'a>)>, DecodeError> {
        // The common case (a fresh reply, complete in `input`, one line or an ack) is small
        // enough to inline into the caller; everything else is out of line.
        if self.scanned == 0
            && self.skip == 0
            && self.recovery == Recovery::None
            && let Some(found) = fast_single_line(input, self.max_line, self.max_len)
        {
            return Ok(Some(found));
        }
        self.decode_general(input)
    }

    #[inline(never)]
    fn decode_general<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(usize, Reply<'a>)>, DecodeError> {
        if let Recovery::Skipping { at_line_start } = self.recovery {
            match self.find_end(input, at_line_start) {
                Some(end) => {
                    self.recovery = Recovery::None;
                    self.skip = end + 1;
                    self.reset_scan();
                }
                None => {
                    if input.len() >= self.max_len {
                        self.scanned = 0;
                        return Err(DecodeError::invalid(
                            self.max_len,
                            InvalidKind::TooLong { max: self.max_len },
                        ));
                    }
                    return Ok(None);
                }
            }
        }
        let skip = self.skip.min(input.len());
        match self.decode_frame(&input[skip..]) {
            Ok(Some((n, reply))) => {
                self.skip = 0;
                Ok(Some((skip + n, reply)))
            }
            Ok(None) => Ok(None),
            Err(DecodeError::Invalid { offset, kind }) => {
                if let Recovery::Known(end) = self.recovery {
                    self.recovery = Recovery::Known(skip + end);
                }
                self.skip = 0;
                Err(DecodeError::invalid(skip + offset, kind))
            }
            Err(e) => Err(e),
        }
    }

    /// While skipping: the index of the next terminating colon.
    fn find_end(&mut self, input: &[u8], at_line_start: bool) -> Option<usize> {
        let mut pos = self.scanned.min(input.len());
        while let Some(off) = memchr::memchr(COLON, &input[pos..]) {
            let at = pos + off;
            let line_start = if at == 0 {
                at_line_start
            } else {
                is_line_break(input[at - 1])
            };
            if line_start {
                return Some(at);
            }
            pos = at + 1;
        }
        self.scanned = input.len();
        None
    }

    fn decode_frame<'a>(
        &mut self,
        buf: &'a [u8],
    ) -> Result<Option<(usize, Reply<'a>)>, DecodeError> {
        // A colon at index `max_len` or later would make the reply too long.
        let limit = buf.len().min(self.max_len);
        let mut pos = self.scanned.min(limit);
        while let Some(off) = memchr::memchr(COLON, &buf[pos..limit]) {
            let at = pos + off;
            if at == 0 || is_line_break(buf[at - 1]) {
                self.reset_scan();
                let block = &buf[..at];
                if let Some(offset) = long_line(block, self.max_line) {
                    self.recovery = Recovery::Known(at + 1);
                    return Err(DecodeError::invalid(
                        offset,
                        InvalidKind::LineTooLong { max: self.max_line },
                    ));
                }
                return match parse_block(block) {
                    Ok(reply) => Ok(Some((at + 1, reply))),
                    Err(e) => {
                        self.recovery = Recovery::Known(at + 1);
                        Err(e)
                    }
                };
            }
            pos = at + 1;
        }
        self.scanned = limit;
        if limit == self.max_len {
            self.reset_scan();
            self.recovery = Recovery::Unknown;
            return Err(DecodeError::invalid(
                self.max_len,
                InvalidKind::TooLong { max: self.max_len },
            ));
        }
        if buf.len() > self.max_line {
            // Resumable line-length check: only the bytes not looked at yet are scanned.
            let from = self.line_scanned.max(self.line_start);
            for off in memchr::memchr2_iter(CR, LF, &buf[from..]) {
                let at = from + off;
                if at - self.line_start > self.max_line {
                    break;
                }
                self.line_start = at + 1;
            }
            self.line_scanned = buf.len();
            let end = memchr::memchr2(CR, LF, &buf[self.line_start..])
                .map_or(buf.len(), |i| self.line_start + i);
            if end - self.line_start > self.max_line {
                let offset = self.line_start + self.max_line;
                self.reset_scan();
                self.recovery = Recovery::Unknown;
                return Err(DecodeError::invalid(
                    offset,
                    InvalidKind::LineTooLong { max: self.max_line },
                ));
            }
        }
        Ok(None)
    }
}

/// `NAME_BYTES[b]`: whether `b` may appear in a command name or reply key.
const NAME_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'_';
        b += 1;
    }
    t
};

/// The common case in one pass over the bytes: an ack (`:`, `\r:`) or one well-formed
/// line followed by its colon. Returns `None` for anything else (incomplete input, several
/// lines, a limit crossed, a malformed line), which the general path then handles; it never
/// decides anything the general path would decide differently.
#[inline]
fn fast_single_line(buf: &[u8], max_line: usize, max_len: usize) -> Option<(usize, Reply<'_>)> {
    let mut i = 0;
    while i < buf.len() && is_line_break(buf[i]) {
        i += 1;
    }
    if *buf.get(i)? == COLON {
        return (i < max_len).then_some((i + 1, Reply::Ack));
    }
    let start = i;
    let key_stop = buf.len().min(start + MAX_NAME_LEN + 1);
    while i < key_stop && NAME_BYTES[usize::from(buf[i])] {
        i += 1;
    }
    let key_end = i;
    let line_end = match *buf.get(i)? {
        b'=' if key_end > start && key_end - start <= MAX_NAME_LEN => {
            let limit = buf
                .len()
                .min(start.saturating_add(max_line).saturating_add(1));
            find_line_break(buf.get(i + 1..limit)?).map(|off| i + 1 + off)?
        }
        CR | LF if &buf[start..key_end] == b"ERR" => key_end,
        _ => return None,
    };
    if line_end - start > max_line {
        return None;
    }
    i = line_end;
    while i < buf.len() && is_line_break(buf[i]) {
        i += 1;
    }
    if *buf.get(i)? != COLON || i >= max_len {
        return None;
    }
    if line_end == key_end {
        return Some((i + 1, Reply::Err));
    }
    // One UTF-8 check for the line; `=` is ASCII, so both halves are on char boundaries.
    let line = core::str::from_utf8(&buf[start..line_end]).ok()?;
    let (key, value) = (
        line.get(..key_end - start)?,
        line.get(key_end - start + 1..)?,
    );
    let reply = if key == "IMEVENT" {
        Reply::Event(StatusEvent::new(value))
    } else {
        Reply::Value { key, value }
    };
    Some((i + 1, reply))
}

/// The first line break in `hay`: eight bytes at a time with word arithmetic for the first
/// 32 bytes (most values are short, where this beats the vectorised search's set-up), then
/// `memchr2` for the rest.
#[inline]
fn find_line_break(hay: &[u8]) -> Option<usize> {
    const SHORT: usize = 32;
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    /// High bit set in each byte of `w` equal to `b` (exact for the lowest match).
    #[inline(always)]
    fn matches(w: u64, b: u8) -> u64 {
        let x = w ^ (ONES * u64::from(b));
        x.wrapping_sub(ONES) & !x & HIGHS
    }
    let head = &hay[..hay.len().min(SHORT)];
    let mut words = head.chunks_exact(8);
    let mut at = 0;
    for word in words.by_ref() {
        let Ok(bytes) = <[u8; 8]>::try_from(word) else {
            break;
        };
        let w = u64::from_le_bytes(bytes);
        let m = matches(w, CR) | matches(w, LF);
        if m != 0 {
            return Some(at + (m.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    if let Some(i) = words.remainder().iter().position(|&b| is_line_break(b)) {
        return Some(at + i);
    }
    let tail = hay.get(SHORT..)?;
    memchr::memchr2(CR, LF, tail).map(|i| SHORT + i)
}

/// The offset of the first byte past `max` in a line of `block` that is too long.
fn long_line(block: &[u8], max: usize) -> Option<usize> {
    if block.len() <= max {
        return None;
    }
    let mut start = 0;
    for at in memchr::memchr2_iter(CR, LF, block).chain(core::iter::once(block.len())) {
        if at - start > max {
            return Some(start + max);
        }
        start = at + 1;
    }
    None
}

/// Skips past the next colon that ends a reply, for recovery after garbage. Returns how many
/// bytes to drop, or `None` if no such colon is in `input` yet (drop all of it but keep
/// reading). [`ReplyDecoder::recover`] does the same with the decoder's state.
pub fn resync(input: &[u8]) -> Option<usize> {
    let mut pos = 0;
    while let Some(off) = memchr::memchr(COLON, &input[pos..]) {
        let at = pos + off;
        if at == 0 || is_line_break(input[at - 1]) {
            return Some(at + 1);
        }
        pos = at + 1;
    }
    None
}

fn parse_block(block: &[u8]) -> Result<Reply<'_>, DecodeError> {
    // Leading line breaks (`\r:` ack, a `\n` left over from `\r\n`) carry nothing.
    let mut first = 0;
    while first < block.len() && is_line_break(block[first]) {
        first += 1;
    }
    if first == block.len() {
        return Ok(Reply::Ack);
    }
    let body = &block[first..];
    // `block` ends with a line break (the colon follows one), so one is found.
    let end = memchr::memchr2(CR, LF, body).unwrap_or(body.len());
    let utf8 = |bytes| {
        core::str::from_utf8(bytes)
            .map_err(|e| DecodeError::invalid(first + e.valid_up_to(), InvalidKind::NotUtf8))
    };
    if !body[end..].iter().all(|&b| is_line_break(b)) {
        // Several lines: keep the raw block including its trailing line break.
        return Ok(Reply::Lines(Lines { raw: utf8(body)? }));
    }
    let text = utf8(&body[..end])?;
    if text == "ERR" {
        return Ok(Reply::Err);
    }
    match text.split_once('=') {
        Some(("IMEVENT", value)) => Ok(Reply::Event(StatusEvent::new(value))),
        Some((key, value)) if is_name(key) => Ok(Reply::Value { key, value }),
        _ => Err(DecodeError::invalid(first, InvalidKind::MalformedLine)),
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A command name: 1 to 32 ASCII letters, digits or `_` (e.g. `PWR`, `SOURCELIST`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(NameRepr);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum NameRepr {
    Static(&'static str),
    Owned(String),
}

impl Name {
    /// Validates a name.
    pub fn new(name: &str) -> Result<Name, ValueError> {
        validate_name(name)?;
        Ok(Name(NameRepr::Owned(name.to_owned())))
    }

    /// A name known at compile time. Panics at compile time (in const context) or on first
    /// use if invalid; meant for the crate's own constants.
    pub(crate) const fn from_static(name: &'static str) -> Name {
        Name(NameRepr::Static(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            NameRepr::Static(s) => s,
            NameRepr::Owned(s) => s,
        }
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn validate_name(name: &str) -> Result<(), ValueError> {
    check_text("command name", name, MAX_NAME_LEN, false, |c| {
        c.is_ascii_alphanumeric() || c == '_'
    })
}

/// A command parameter: 1 to 200 printable ASCII characters (spaces allowed inside), never a
/// line break or colon, so it cannot inject a second command or fake a reply end.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Param(String);

impl Param {
    /// Validates a parameter.
    pub fn new(param: &str) -> Result<Param, ValueError> {
        validate_param(param)?;
        Ok(Param(param.to_owned()))
    }

    /// The parameter text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_static(param: &'static str) -> Param {
        Param(param.to_owned())
    }
}

fn validate_param(param: &str) -> Result<(), ValueError> {
    check_text("command parameter", param, MAX_PARAM_LEN, false, |c| {
        (c.is_ascii_graphic() || c == ' ') && c != ':'
    })
}

impl fmt::Debug for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A command a client sends: a query `NAME?\r`, a set `NAME PARAM\r`, or the null command `\r`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Command {
    /// `\r`: "are you there?"; answered with `:`.
    Null,
    /// `NAME?\r`.
    Query(Name),
    /// `NAME PARAM\r`.
    Set(Name, Param),
}

impl Command {
    /// A query, validating the name.
    pub fn query(name: &str) -> Result<Command, ValueError> {
        Ok(Command::Query(Name::new(name)?))
    }

    /// A set, validating name and parameter.
    pub fn set(name: &str, param: &str) -> Result<Command, ValueError> {
        Ok(Command::Set(Name::new(name)?, Param::new(param)?))
    }

    /// The command name (`None` for the null command).
    pub fn name(&self) -> Option<&Name> {
        match self {
            Command::Null => None,
            Command::Query(n) | Command::Set(n, _) => Some(n),
        }
    }

    /// Appends the command with its `\r` terminator.
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Command::Null => {}
            Command::Query(n) => {
                out.put_slice(n.as_str().as_bytes());
                out.put_u8(b'?');
            }
            Command::Set(n, p) => {
                out.put_slice(n.as_str().as_bytes());
                out.put_u8(b' ');
                out.put_slice(p.as_str().as_bytes());
            }
        }
        out.put_u8(CR);
    }

    /// The command as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        self.encode(&mut v);
        v
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Null => f.write_str("(null)"),
            Command::Query(n) => write!(f, "{n}?"),
            Command::Set(n, p) => write!(f, "{n} {}", p.as_str()),
        }
    }
}

/// A command as a projector receives it, borrowed from the input (server side).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Request<'a> {
    /// An empty line.
    Null,
    /// `NAME?`.
    Query(&'a str),
    /// `NAME PARAM` (the parameter keeps inner spaces; surrounding spaces are trimmed).
    Set(&'a str, &'a str),
}

impl<'a> Request<'a> {
    /// The command name, as sent (projectors are case-sensitive; this decoder does not change
    /// case).
    pub fn name(&self) -> Option<&'a str> {
        match self {
            Request::Null => None,
            Request::Query(n) | Request::Set(n, _) => Some(n),
        }
    }

    /// Converts to an owned, validated [`Command`].
    pub fn to_command(&self) -> Result<Command, ValueError> {
        match self {
            Request::Null => Ok(Command::Null),
            Request::Query(n) => Command::query(n),
            Request::Set(n, p) => Command::set(n, p),
        }
    }
}

/// An owned request line (see [`RequestLine`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum OwnedRequest {
    /// An empty line.
    Null,
    /// `NAME?`.
    Query(String),
    /// `NAME PARAM`.
    Set(String, String),
    /// A line that is not a command.
    Malformed(Vec<u8>),
    /// Nothing to answer (see [`RequestLine::Skip`]).
    Skip,
}

impl From<RequestLine<'_>> for OwnedRequest {
    fn from(r: RequestLine<'_>) -> Self {
        match r {
            RequestLine::Ok(Request::Null) => OwnedRequest::Null,
            RequestLine::Ok(Request::Query(n)) => OwnedRequest::Query(n.to_owned()),
            RequestLine::Ok(Request::Set(n, p)) => OwnedRequest::Set(n.to_owned(), p.to_owned()),
            RequestLine::Malformed(b) => OwnedRequest::Malformed(b.to_vec()),
            RequestLine::Skip => OwnedRequest::Skip,
        }
    }
}

/// Incremental request framer for the projector side: one line per request, terminated by
/// `\r`, `\n` or `\r\n`.
///
/// A `\r\n` split across two reads is still one terminator: the decoder remembers a line that
/// ended with `\r` and returns a `\n` that starts the next input as [`RequestLine::Skip`]
/// (answer nothing), not as a null command whose `:` would desynchronise the client. Lines are limited to
/// [`max_len`](Self::max_len) bytes; command names keep their case (see [`Request::name`]).
#[derive(Clone, Debug)]
pub struct RequestDecoder {
    max_len: usize,
    /// Bytes at the start of the input already known to be dropped (a `\n` finishing a `\r\n`
    /// or the end of a too-long line).
    skip: usize,
    /// Bytes after `skip` known to hold no line break.
    scanned: usize,
    /// The last line returned ended with a `\r` that was the last byte of its input.
    after_cr: bool,
    recovery: Recovery,
}

impl Default for RequestDecoder {
    fn default() -> Self {
        RequestDecoder::new()
    }
}

/// Why a complete request line is not a valid command (the line is consumed either way, so a
/// projector answers `ERR` and goes on).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RequestLine<'a> {
    /// A well-formed command.
    Ok(Request<'a>),
    /// A complete line that is not a command; the projector answers `ERR`.
    Malformed(&'a [u8]),
    /// Bytes that belong to no command (the `\n` of a `\r\n` that was split across
    /// reads); consume them and answer nothing.
    Skip,
}

impl RequestDecoder {
    /// A decoder with [`DEFAULT_MAX_REQUEST_LEN`].
    pub const fn new() -> Self {
        RequestDecoder::with_max_len(DEFAULT_MAX_REQUEST_LEN)
    }

    /// A decoder refusing lines longer than `max_len` bytes (line break included, at least 2).
    pub const fn with_max_len(max_len: usize) -> Self {
        RequestDecoder {
            max_len: if max_len < 2 { 2 } else { max_len },
            skip: 0,
            scanned: 0,
            after_cr: false,
            recovery: Recovery::None,
        }
    }

    /// The maximum line length.
    pub const fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets all state (call after discarding buffered bytes yourself).
    pub fn reset(&mut self) {
        *self = RequestDecoder::with_max_len(self.max_len);
    }

    /// After [`decode`](Self::decode) returned an error (a line over the limit): the number
    /// of bytes to drop from the front of `input`: up to and including the over-long line's
    /// line break if it is in `input`, else all of it, and the decoder then skips the rest of
    /// the line when it arrives. Returns 0 when no error is pending.
    pub fn recover(&mut self, input: &[u8]) -> usize {
        if self.recovery == Recovery::None {
            return 0;
        }
        self.skip = 0;
        self.scanned = 0;
        self.after_cr = false;
        match memchr::memchr2(CR, LF, input) {
            Some(at) => {
                self.recovery = Recovery::None;
                let mut n = at + 1;
                if input[at] == CR {
                    match input.get(at + 1) {
                        Some(&LF) => n += 1,
                        Some(_) => {}
                        None => self.after_cr = true,
                    }
                }
                n
            }
            None => {
                self.recovery = Recovery::Skipping {
                    at_line_start: false,
                };
                input.len()
            }
        }
    }

    /// Decodes the next request line from `input` (the unconsumed bytes, from their start).
    ///
    /// `Ok(None)`: need more bytes. `Ok(Some((consumed, line)))`: a complete line, well-formed
    /// or not. `Err`: the line exceeds the maximum; the caller answers `ERR`, calls
    /// [`recover`](Self::recover) and drops that many bytes (or drops the connection).
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(usize, RequestLine<'a>)>, DecodeError> {
        if let Recovery::Skipping { .. } = self.recovery {
            let from = self.skip + self.scanned.min(input.len().saturating_sub(self.skip));
            match memchr::memchr2(CR, LF, input.get(from..).unwrap_or(&[])) {
                Some(off) => {
                    let at = from + off;
                    self.recovery = Recovery::None;
                    self.scanned = 0;
                    self.skip = at + 1;
                    if input[at] == CR {
                        match input.get(at + 1) {
                            Some(&LF) => self.skip += 1,
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                }
                None => {
                    self.scanned = input.len().saturating_sub(self.skip);
                    if input.len() >= self.max_len {
                        return Err(DecodeError::invalid(
                            input.len(),
                            InvalidKind::TooLong { max: self.max_len },
                        ));
                    }
                    return Ok(None);
                }
            }
        }
        if self.after_cr {
            // The previous line ended with a `\r` at the end of its input: a `\n` now is the
            // second half of `\r\n`, not an empty line.
            let Some(&next) = input.get(self.skip) else {
                return Ok(None);
            };
            self.after_cr = false;
            if next == LF {
                let consumed = self.skip + 1;
                self.skip = 0;
                return Ok(Some((consumed, RequestLine::Skip)));
            }
        }
        let skip = self.skip.min(input.len());
        let buf = &input[skip..];
        let limit = buf.len().min(self.max_len);
        let start = self.scanned.min(limit);
        if let Some(off) = memchr::memchr2(CR, LF, &buf[start..limit]) {
            let at = start + off;
            self.scanned = 0;
            self.skip = 0;
            let mut consumed = at + 1;
            if buf[at] == CR {
                match buf.get(at + 1) {
                    // `\r\n`: swallow the `\n` when it is already here...
                    Some(&LF) => consumed += 1,
                    Some(_) => {}
                    // ...or drop it when it starts the next input.
                    None => self.after_cr = true,
                }
            }
            return Ok(Some((skip + consumed, parse_request(&buf[..at]))));
        }
        self.scanned = limit;
        if limit == self.max_len {
            self.scanned = 0;
            self.skip = 0;
            self.recovery = Recovery::Unknown;
            return Err(DecodeError::invalid(
                skip + self.max_len,
                InvalidKind::TooLong { max: self.max_len },
            ));
        }
        Ok(None)
    }
}

/// Decodes one request line from the start of `input` (stateless form of
/// [`RequestDecoder::decode`] with the default limit): the bytes after it and the line.
/// A line ending with a `\r` that is the last byte of `input` is returned as is; use a
/// [`RequestDecoder`] on a stream so that a `\n` arriving later is recognised.
pub fn decode_request(input: &[u8]) -> Result<(&[u8], RequestLine<'_>), DecodeError> {
    let mut dec = RequestDecoder::new();
    match dec.decode(input)? {
        Some((n, line)) => Ok((&input[n..], line)),
        None => Err(DecodeError::Incomplete { needed: 1 }),
    }
}

fn parse_request(line: &[u8]) -> RequestLine<'_> {
    let Ok(text) = core::str::from_utf8(line) else {
        return RequestLine::Malformed(line);
    };
    let text = text.trim_matches(' ');
    if text.is_empty() {
        return RequestLine::Ok(Request::Null);
    }
    // A query is exactly `NAME?`; `NAME ?` is a set whose parameter is `?`.
    if let Some(name) = text.strip_suffix('?')
        && is_name(name)
    {
        return RequestLine::Ok(Request::Query(name));
    }
    match text.split_once(' ') {
        Some((name, param)) => {
            let param = param.trim_matches(' ');
            if is_name(name) && validate_param(param).is_ok() {
                RequestLine::Ok(Request::Set(name, param))
            } else {
                RequestLine::Malformed(line)
            }
        }
        None => RequestLine::Malformed(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8]) -> Vec<String> {
        let mut dec = ReplyDecoder::new();
        let mut out = Vec::new();
        let mut rest = input;
        while let Some((n, r)) = dec.decode(rest).unwrap() {
            out.push(format!("{r:?}"));
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn reply_shapes() {
        assert_eq!(
            all(b":\r:PWR=01\r:ERR\r:SNO=X8JK0000001\r:"),
            vec![
                "Ack",
                "Ack",
                "Value(PWR=\"01\")",
                "Err",
                "Value(SNO=\"X8JK0000001\")"
            ]
        );
        assert_eq!(all(b"PWR=01\r\n:"), vec!["Value(PWR=\"01\")"]);
        assert_eq!(
            all(b"LOCALTIME=12:30\r:"),
            vec!["Value(LOCALTIME=\"12:30\")"]
        );
    }

    #[test]
    fn multi_line() {
        let (_, r) = Reply::decode(b"R=126 126 126\rG=1 2 3\r:").unwrap();
        let Reply::Lines(lines) = r else {
            panic!("{r:?}")
        };
        let v: Vec<_> = lines.iter().collect();
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[1],
            Line {
                key: "G",
                value: "1 2 3"
            }
        );
        assert_eq!(r.to_bytes(), b"R=126 126 126\rG=1 2 3\r:");
    }

    #[test]
    fn too_long_is_invalid_not_unbounded() {
        let mut dec = ReplyDecoder::with_max_len(8);
        assert!(matches!(dec.decode(b"PWR=0"), Ok(None)));
        assert!(matches!(
            dec.decode(b"PWR=0123456"),
            Err(DecodeError::Invalid {
                kind: InvalidKind::TooLong { max: 8 },
                ..
            })
        ));
    }

    #[test]
    fn requests() {
        let mut dec = RequestDecoder::new();
        let input = b"PWR ON\r\nPWR?\r\rSOURCE  30 \rBAD LINE!\r";
        let mut rest = &input[..];
        let mut got = Vec::new();
        while let Some((n, r)) = dec.decode(rest).unwrap() {
            got.push(r);
            rest = &rest[n..];
        }
        assert_eq!(
            got,
            vec![
                RequestLine::Ok(Request::Set("PWR", "ON")),
                RequestLine::Ok(Request::Query("PWR")),
                RequestLine::Ok(Request::Null),
                RequestLine::Ok(Request::Set("SOURCE", "30")),
                RequestLine::Ok(Request::Set("BAD", "LINE!")),
            ]
        );
        assert!(matches!(
            RequestDecoder::new().decode(b"PWR:ON\r"),
            Ok(Some((_, RequestLine::Malformed(_))))
        ));
    }

    #[test]
    fn command_encoding_and_injection() {
        assert_eq!(Command::query("PWR").unwrap().to_bytes(), b"PWR?\r");
        assert_eq!(Command::set("PWR", "ON").unwrap().to_bytes(), b"PWR ON\r");
        assert_eq!(Command::Null.to_bytes(), b"\r");
        assert!(Command::set("PWR", "ON\rPWR OFF").is_err());
        assert!(Command::set("PWR", "ON:").is_err());
        assert!(Command::query("P W R").is_err());
    }

    #[test]
    fn recovery_after_a_malformed_reply_resumes_at_the_next_one() {
        let mut dec = ReplyDecoder::new();
        let input = b"NOT A VALUE\r:PWR=01\r:";
        let err = dec.decode(input).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Invalid {
                offset: 0,
                kind: InvalidKind::MalformedLine
            }
        );
        let n = dec.recover(input);
        assert_eq!(n, 13);
        assert_eq!(
            dec.decode(&input[n..]).unwrap(),
            Some((
                8,
                Reply::Value {
                    key: "PWR",
                    value: "01"
                }
            ))
        );
        assert_eq!(dec.recover(&input[n..]), 0);
    }

    #[test]
    fn line_limit_and_recovery_across_reads() {
        let mut dec = ReplyDecoder::with_limits(8, 64);
        assert_eq!(dec.max_line(), 8);
        assert_eq!(dec.decode(b"A=123456").unwrap(), None);
        let err = dec.decode(b"A=1234567").unwrap_err();
        assert_eq!(
            err,
            DecodeError::Invalid {
                offset: 8,
                kind: InvalidKind::LineTooLong { max: 8 }
            }
        );
        // The end of the bad reply has not arrived: everything is dropped...
        assert_eq!(dec.recover(b"A=1234567"), 9);
        // ...and the rest of it is skipped when it comes, even a colon inside the line.
        assert_eq!(dec.decode(b"89:0").unwrap(), None);
        let input = b"89:0\r:ERR\r:";
        assert_eq!(dec.decode(input).unwrap(), Some((11, Reply::Err)));
        // A complete reply with a too-long second line.
        let mut dec = ReplyDecoder::with_limits(4, 64);
        let input = b"A=1\rB=12345\r::";
        assert!(matches!(
            dec.decode(input),
            Err(DecodeError::Invalid {
                offset: 8,
                kind: InvalidKind::LineTooLong { max: 4 }
            })
        ));
        let n = dec.recover(input);
        assert_eq!(dec.decode(&input[n..]).unwrap(), Some((1, Reply::Ack)));
    }

    #[test]
    fn reply_limit_counts_the_colon() {
        let mut dec = ReplyDecoder::with_limits(16, 8);
        assert_eq!(
            dec.decode(b"PWR=01\r:").unwrap(),
            Some((
                8,
                Reply::Value {
                    key: "PWR",
                    value: "01"
                }
            ))
        );
        assert!(matches!(
            dec.decode(b"PWR=012\r:"),
            Err(DecodeError::Invalid {
                kind: InvalidKind::TooLong { max: 8 },
                ..
            })
        ));
    }

    #[test]
    fn crlf_split_across_reads_is_one_line() {
        let mut dec = RequestDecoder::new();
        assert_eq!(
            dec.decode(b"PWR?\r").unwrap(),
            Some((5, RequestLine::Ok(Request::Query("PWR"))))
        );
        assert_eq!(dec.decode(b"").unwrap(), None);
        assert_eq!(
            dec.decode(b"\nSNO?\r").unwrap(),
            Some((1, RequestLine::Skip))
        );
        assert_eq!(
            dec.decode(b"SNO?\r\n").unwrap(),
            Some((6, RequestLine::Ok(Request::Query("SNO"))))
        );
        // A bare `\n` that does not follow a `\r` is an empty line (the null command).
        assert_eq!(
            dec.decode(b"\n").unwrap(),
            Some((1, RequestLine::Ok(Request::Null)))
        );
    }

    #[test]
    fn request_too_long_then_recover() {
        let mut dec = RequestDecoder::with_max_len(8);
        let err = dec.decode(b"PWR ONONON").unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Invalid {
                kind: InvalidKind::TooLong { max: 8 },
                ..
            }
        ));
        assert_eq!(dec.recover(b"PWR ONONON"), 10);
        assert_eq!(dec.decode(b"ON").unwrap(), None);
        assert_eq!(
            dec.decode(b"ON\r\nPWR?\r").unwrap(),
            Some((9, RequestLine::Ok(Request::Query("PWR"))))
        );
    }

    #[test]
    fn checked_reply_constructors() {
        assert_eq!(
            Reply::value("PWR", "01").unwrap().to_bytes(),
            b"PWR=01\r:".to_vec()
        );
        assert!(Reply::value("PWR", "01\r:PWR=04").is_err());
        assert!(Reply::value("IMEVENT", "0001 03 00000000 00000000").is_err());
        assert!(Reply::value("P W", "1").is_err());
        // A hand-built reply cannot inject a second one.
        let bad = Reply::Value {
            key: "PWR",
            value: "01\r:PWR=04",
        };
        assert!(bad.check().is_err());
        assert_eq!(bad.to_bytes(), b"PWR=01 :PWR=04\r:".to_vec());
        let lines = Lines::new("R=1 2 3\rG=4 5 6\r").unwrap();
        let bytes = Reply::Lines(lines).to_bytes();
        assert_eq!(Reply::decode(&bytes).unwrap().1, Reply::Lines(lines));
        assert!(Lines::new("R=1\r:G=2\r").is_err());
        assert!(Lines::new("R=1\r").is_err());
        assert!(Lines::new("R=1\rG=2").is_err());
        let ev = StatusEvent::new("0001 03 00000000 00000000 T1 F1");
        assert!(Reply::Event(ev).check().is_ok());
        assert_eq!(
            Reply::Event(ev).to_bytes(),
            b"IMEVENT=0001 03 00000000 00000000 T1 F1\r:".to_vec()
        );
        let injected = Reply::Event(StatusEvent::new("0001\r:PWR=01"));
        assert!(injected.check().is_err());
        assert_eq!(injected.to_bytes(), b"IMEVENT=0001 :PWR=01\r:".to_vec());
    }

    #[test]
    fn find_line_break_agrees_with_a_plain_search() {
        let mut hay = [b'a'; 80];
        assert_eq!(find_line_break(&hay), None);
        for at in 0..hay.len() {
            for lb in [CR, LF] {
                hay[at] = lb;
                // A second break later must not hide the first.
                if at + 3 < hay.len() {
                    hay[at + 3] = CR;
                }
                for len in 0..=hay.len() {
                    let want = hay[..len].iter().position(|&b| b == CR || b == LF);
                    assert_eq!(find_line_break(&hay[..len]), want, "at {at} len {len}");
                }
                hay.fill(b'a');
                // Bytes next to the break values (0x0C, 0x0E, 0x09, 0x0B, 0x8D) never match.
                hay[at] = [0x0C, 0x0E, 0x09, 0x0B, 0x8D][at % 5];
                assert_eq!(find_line_break(&hay), None);
                hay.fill(b'a');
            }
        }
    }
}
