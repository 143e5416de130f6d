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

    /// Appends the reply as a projector sends it. `Ack` is written as `:` alone.
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Reply::Ack => out.put_u8(COLON),
            Reply::Value { key, value } => {
                out.put_slice(key.as_bytes());
                out.put_u8(b'=');
                out.put_slice(value.as_bytes());
                out.put_slice(b"\r:");
            }
            Reply::Lines(lines) => {
                out.put_slice(lines.raw.as_bytes());
                out.put_u8(COLON);
            }
            Reply::Err => out.put_slice(b"ERR\r:"),
            Reply::Event(ev) => {
                out.put_slice(b"IMEVENT=");
                out.put_slice(ev.raw().as_bytes());
                out.put_slice(b"\r:");
            }
        }
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

/// Incremental reply framer: finds where each reply ends, resuming where it stopped.
///
/// Keeps a scan offset so that feeding a long reply a few bytes at a time costs linear, not
/// quadratic, time. Use one decoder per byte stream and always pass the stream's unconsumed
/// bytes from their start.
#[derive(Clone, Debug)]
pub struct ReplyDecoder {
    max_len: usize,
    scanned: usize,
}

impl Default for ReplyDecoder {
    fn default() -> Self {
        ReplyDecoder::new()
    }
}

impl ReplyDecoder {
    /// A decoder with [`DEFAULT_MAX_REPLY_LEN`].
    pub const fn new() -> Self {
        ReplyDecoder::with_max_len(DEFAULT_MAX_REPLY_LEN)
    }

    /// A decoder that refuses replies longer than `max_len` bytes (at least 2).
    pub const fn with_max_len(max_len: usize) -> Self {
        ReplyDecoder {
            max_len: if max_len < 2 { 2 } else { max_len },
            scanned: 0,
        }
    }

    /// The maximum reply length.
    pub const fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets the scan position (call after discarding buffered bytes).
    pub fn reset(&mut self) {
        self.scanned = 0;
    }

    /// Decodes the next reply from `input` (the unconsumed bytes, from their start).
    ///
    /// Returns `Ok(None)` when more bytes are needed, `Ok(Some((consumed, reply)))` for a
    /// complete reply, and an error for bytes that can never form a reply. After an error the
    /// caller should drop the connection (or skip past a colon with [`resync`]).
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(usize, Reply<'a>)>, DecodeError> {
        let start = self.scanned.min(input.len());
        let limit = input.len().min(self.max_len);
        let mut pos = start;
        while pos < limit {
            let Some(off) = memchr::memchr(COLON, &input[pos..limit]) else {
                pos = limit;
                break;
            };
            let at = pos + off;
            if at == 0 || matches!(input[at - 1], CR | LF) {
                self.scanned = 0;
                let reply = parse_block(&input[..at])?;
                return Ok(Some((at + 1, reply)));
            }
            pos = at + 1;
        }
        self.scanned = pos;
        if input.len() >= self.max_len {
            self.scanned = 0;
            return Err(DecodeError::invalid(
                self.max_len,
                InvalidKind::TooLong { max: self.max_len },
            ));
        }
        Ok(None)
    }
}

/// Skips past the next colon that ends a reply, for recovery after garbage. Returns how many
/// bytes to drop, or `None` if no colon is in `input` yet (drop all of it but keep reading).
pub fn resync(input: &[u8]) -> Option<usize> {
    memchr::memchr(COLON, input).map(|i| i + 1)
}

fn parse_block(block: &[u8]) -> Result<Reply<'_>, DecodeError> {
    // Trim leading and trailing line breaks.
    let Some(first) = block.iter().position(|&b| b != CR && b != LF) else {
        return Ok(Reply::Ack);
    };
    let last = block
        .iter()
        .rposition(|&b| b != CR && b != LF)
        .unwrap_or(first);
    let body = &block[first..=last];
    // Fast path: a branch-free scan for control bytes (it vectorizes); line breaks and bad
    // bytes are sorted out only when there are any.
    let has_ctrl = body.iter().fold(false, |acc, &b| {
        acc | ((b < 0x20) & (b != b'\t')) | (b == 0x7F)
    });
    let mut multi = false;
    if has_ctrl {
        for (i, &b) in body.iter().enumerate() {
            match b {
                CR | LF => multi = true,
                b'\t' | 0x20..=0x7E | 0x80.. => {}
                _ => {
                    return Err(DecodeError::invalid(
                        first + i,
                        InvalidKind::UnexpectedByte(b),
                    ));
                }
            }
        }
    }
    let text_of = |bytes| {
        core::str::from_utf8(bytes)
            .map_err(|e| DecodeError::invalid(first + e.valid_up_to(), InvalidKind::NotUtf8))
    };
    if multi {
        // Several lines: keep the raw block including its trailing line break.
        return Ok(Reply::Lines(Lines {
            raw: text_of(&block[first..])?,
        }));
    }
    let text = text_of(body)?;
    if text == "ERR" {
        return Ok(Reply::Err);
    }
    // Keys are short: a plain loop beats memchr's set-up cost here.
    match body.iter().position(|&b| b == b'=') {
        Some(i) => {
            let (key, value) = (&text[..i], &text[i + 1..]);
            if key == "IMEVENT" {
                Ok(Reply::Event(StatusEvent::new(value)))
            } else if is_name(key) {
                Ok(Reply::Value { key, value })
            } else {
                Err(DecodeError::invalid(first, InvalidKind::MalformedLine))
            }
        }
        None => Err(DecodeError::invalid(first, InvalidKind::MalformedLine)),
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
        check_text("command parameter", param, MAX_PARAM_LEN, false, |c| {
            (c.is_ascii_graphic() || c == ' ') && c != ':'
        })?;
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
#[derive(Clone, Debug)]
pub struct RequestDecoder {
    max_len: usize,
    scanned: usize,
    /// The previous line ended with `\r`: a `\n` at the start of the next input belongs to it.
    after_cr: bool,
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

    /// A decoder refusing lines longer than `max_len` bytes.
    pub const fn with_max_len(max_len: usize) -> Self {
        RequestDecoder {
            max_len: if max_len < 2 { 2 } else { max_len },
            scanned: 0,
            after_cr: false,
        }
    }

    /// Decodes the next request line. `Ok(None)`: need more bytes. `Err`: the line exceeds the
    /// maximum (the caller should answer `ERR` and drop the connection or discard input up to
    /// the next line break).
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Option<(usize, RequestLine<'a>)>, DecodeError> {
        if self.after_cr && !input.is_empty() {
            self.after_cr = false;
            if input[0] == LF {
                // The `\n` of a `\r\n` split across reads: part of the previous line.
                return Ok(Some((1, RequestLine::Skip)));
            }
        }
        let start = self.scanned.min(input.len());
        let limit = input.len().min(self.max_len);
        if let Some(off) = memchr::memchr2(CR, LF, &input[start..limit]) {
            let at = start + off;
            self.scanned = 0;
            let mut consumed = at + 1;
            // `\r\n`: swallow the `\n` when it is already here.
            if input[at] == CR {
                match input.get(at + 1) {
                    Some(&LF) => consumed += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            return Ok(Some((consumed, parse_request(&input[..at]))));
        }
        self.scanned = limit;
        if input.len() >= self.max_len {
            self.scanned = 0;
            return Err(DecodeError::invalid(
                self.max_len,
                InvalidKind::TooLong { max: self.max_len },
            ));
        }
        Ok(None)
    }
}

fn parse_request(line: &[u8]) -> RequestLine<'_> {
    // A `\n` left over from a `\r\n` split across reads shows up as an empty line first; it
    // is a null command only if nothing else is on the line, which is harmless.
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
            if is_name(name) && Param::new(param).is_ok() {
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
    fn crlf_split_across_reads_is_one_line() {
        let mut dec = RequestDecoder::new();
        assert_eq!(
            dec.decode(b"PWR?\r").unwrap(),
            Some((5, RequestLine::Ok(Request::Query("PWR"))))
        );
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
    fn command_encoding_and_injection() {
        assert_eq!(Command::query("PWR").unwrap().to_bytes(), b"PWR?\r");
        assert_eq!(Command::set("PWR", "ON").unwrap().to_bytes(), b"PWR ON\r");
        assert_eq!(Command::Null.to_bytes(), b"\r");
        assert!(Command::set("PWR", "ON\rPWR OFF").is_err());
        assert!(Command::set("PWR", "ON:").is_err());
        assert!(Command::query("P W R").is_err());
    }
}
