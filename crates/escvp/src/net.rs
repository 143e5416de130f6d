//! ESC/VP.net messages: the 16-byte header and its 18-byte extension headers.
//!
//! Every ESC/VP.net message, in both directions and on TCP and UDP alike, is a 16-byte header
//! (`ESC/VP.net`, version, type, two reserved bytes, status, number of extension headers)
//! followed by that many 18-byte extension headers (identifier, attribute, 16 bytes of
//! NUL-padded information). There is no length field: a reader needs 16 bytes, then 18 per
//! header. After an OK reply to CONNECT the TCP session switches to ESC/VP21 text
//! ([`crate::vp21`]).
//!
//! ```
//! use escvp::net::{Message, Status};
//!
//! // The 16-byte CONNECT without a password that almost every client sends.
//! let connect = Message::connect(None);
//! assert_eq!(connect.to_bytes(), b"ESC/VP.net\x10\x03\x00\x00\x00\x00");
//!
//! // The projector's OK reply.
//! let (rest, reply) = Message::decode(b"ESC/VP.net\x10\x03\x00\x00\x20\x00").unwrap();
//! assert!(rest.is_empty());
//! assert_eq!(reply.status(), Status::OK);
//! ```

use core::fmt;

use bytes::BufMut;

use crate::error::{DecodeError, InvalidKind, ValueError, check_text};

/// The ten bytes every message starts with.
pub const PROTOCOL_ID: &[u8; 10] = b"ESC/VP.net";
/// Length of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Length of one extension header.
pub const EXT_HEADER_LEN: usize = 18;
/// Length of an extension header's information field.
pub const INFO_LEN: usize = 16;
/// The largest possible message: 16 + 255 × 18 bytes.
pub const MAX_MESSAGE_LEN: usize = HEADER_LEN + 255 * EXT_HEADER_LEN;
/// The TCP and UDP port projectors listen on.
pub const DEFAULT_PORT: u16 = 3629;

macro_rules! open_code {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$cmeta:meta])* $const:ident = $val:expr => $label:expr ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u8);

        impl $name {
            $( $(#[$cmeta])* pub const $const: $name = $name($val); )*

            /// Wraps any byte; unknown values are kept as they are.
            pub const fn new(value: u8) -> Self {
                $name(value)
            }

            /// The byte on the wire.
            pub const fn get(self) -> u8 {
                self.0
            }

            /// The name of a known value, `None` for an unknown one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $val => Some($label), )*
                    _ => None,
                }
            }
        }

        impl From<u8> for $name {
            fn from(value: u8) -> Self {
                $name(value)
            }
        }

        impl From<$name> for u8 {
            fn from(value: $name) -> u8 {
                value.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => write!(f, "{}::{}", stringify!($name), n),
                    None => write!(f, "{}(0x{:02X})", stringify!($name), self.0),
                }
            }
        }
    };
}

open_code! {
    /// The version byte (high nibble major, low nibble minor).
    Version {
        /// Version 1.0, the one every documented client and projector uses.
        V1_0 = 0x10 => "V1_0",
        /// Version 2.0 (hashed passwords; reverse-engineered, unverified). The codec decodes
        /// any version byte and reports it; this crate's session accepts only 1.0 replies.
        V2_0 = 0x20 => "V2_0",
    }
}

open_code! {
    /// The message type.
    MessageType {
        /// Reserved.
        NULL = 0x00 => "NULL",
        /// Session-less discovery (UDP).
        HELLO = 0x01 => "HELLO",
        /// Check or change the password (TCP).
        PASSWORD = 0x02 => "PASSWORD",
        /// Open an ESC/VP21 session (TCP).
        CONNECT = 0x03 => "CONNECT",
    }
}

open_code! {
    /// The status byte: 0 in requests, a result code in replies.
    Status {
        /// Every request carries 0.
        REQUEST = 0x00 => "REQUEST",
        /// Normal termination.
        OK = 0x20 => "OK",
        /// The request cannot be understood.
        BAD_REQUEST = 0x40 => "BAD_REQUEST",
        /// A password is required.
        UNAUTHORIZED = 0x41 => "UNAUTHORIZED",
        /// The password is wrong.
        FORBIDDEN = 0x43 => "FORBIDDEN",
        /// The type is not allowed here (e.g. HELLO on TCP, or a password-protected
        /// projector in "Protected" command-communication mode).
        NOT_ALLOWED = 0x45 => "NOT_ALLOWED",
        /// The projector is busy.
        BUSY = 0x53 => "BUSY",
        /// The version byte is not supported.
        VERSION_NOT_SUPPORTED = 0x55 => "VERSION_NOT_SUPPORTED",
    }
}

open_code! {
    /// The identifier of an extension header.
    HeaderId {
        /// Reserved.
        NULL = 0 => "NULL",
        /// The current password.
        PASSWORD = 1 => "PASSWORD",
        /// The new password (in a PASSWORD request that changes it).
        NEW_PASSWORD = 2 => "NEW_PASSWORD",
        /// The projector's name (HELLO reply).
        PROJECTOR_NAME = 3 => "PROJECTOR_NAME",
        /// The model family; the attribute is an opaque byte.
        IM_TYPE = 4 => "IM_TYPE",
        /// The command language; attribute 0x21 is ESC/VP21 version 1.0.
        COMMAND_TYPE = 5 => "COMMAND_TYPE",
    }
}

/// Attribute of a Password header meaning "plain text password".
pub const ATTR_PASSWORD_PLAIN: u8 = 1;
/// Attribute of a Password header meaning "no password".
pub const ATTR_PASSWORD_NONE: u8 = 0;
/// Attribute of a Projector-Name header meaning US-ASCII.
pub const ATTR_NAME_ASCII: u8 = 1;
/// Projector-Command-Type attribute for ESC/VP21 version 1.0.
pub const COMMAND_TYPE_ESCVP21: u8 = 0x21;

/// The 16-byte information field of an extension header: up to 16 bytes, NUL-padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Info([u8; INFO_LEN]);

impl Info {
    /// All zeros (an unused field).
    pub const EMPTY: Info = Info([0; INFO_LEN]);

    /// Text of at most 16 bytes; shorter text is NUL-padded. Embedded NULs are refused
    /// because they could not be told apart from the padding.
    pub fn new(text: &[u8]) -> Result<Info, ValueError> {
        if text.len() > INFO_LEN {
            return Err(ValueError::TooLong {
                what: "extension header information",
                len: text.len(),
                max: INFO_LEN,
            });
        }
        if text.contains(&0) {
            return Err(ValueError::BadChar {
                what: "extension header information",
                ch: '\0',
            });
        }
        let mut raw = [0; INFO_LEN];
        raw[..text.len()].copy_from_slice(text);
        Ok(Info(raw))
    }

    /// The raw 16 bytes, as on the wire.
    pub const fn from_raw(raw: [u8; INFO_LEN]) -> Info {
        Info(raw)
    }

    /// The raw 16 bytes.
    pub const fn raw(&self) -> &[u8; INFO_LEN] {
        &self.0
    }

    /// The bytes before the first NUL.
    pub fn text(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(INFO_LEN);
        &self.0[..end]
    }
}

impl fmt::Debug for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Info({:?})", String::from_utf8_lossy(self.text()))
    }
}

/// A projector password: 1 to 16 printable ASCII characters.
///
/// Epson calls it the "Monitor password" (at most 16 alphanumeric characters and `@`); this type
/// accepts any printable ASCII so that a projector's actual setting is never refused.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Info);

impl Password {
    /// Validates a password.
    pub fn new(password: &str) -> Result<Password, ValueError> {
        check_text("password", password, INFO_LEN, false, |c| {
            c.is_ascii_graphic() || c == ' '
        })?;
        Ok(Password(Info::new(password.as_bytes())?))
    }

    /// The password as text.
    pub fn as_str(&self) -> &str {
        // Validated as ASCII at construction.
        core::str::from_utf8(self.0.text()).unwrap_or("")
    }

    /// The NUL-padded information field.
    pub fn info(&self) -> Info {
        self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

impl TryFrom<&str> for Password {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Password::new(value)
    }
}

/// One 18-byte extension header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ExtHeader {
    id: HeaderId,
    attribute: u8,
    info: Info,
}

impl ExtHeader {
    /// Any header.
    pub const fn new(id: HeaderId, attribute: u8, info: Info) -> ExtHeader {
        ExtHeader {
            id,
            attribute,
            info,
        }
    }

    /// A Password header (attribute 1, plain text).
    pub fn password(password: &Password) -> ExtHeader {
        ExtHeader::new(HeaderId::PASSWORD, ATTR_PASSWORD_PLAIN, password.info())
    }

    /// A New-Password header; `None` removes the password (attribute 0).
    pub fn new_password(password: Option<&Password>) -> ExtHeader {
        match password {
            Some(p) => ExtHeader::new(HeaderId::NEW_PASSWORD, ATTR_PASSWORD_PLAIN, p.info()),
            None => ExtHeader::new(HeaderId::NEW_PASSWORD, ATTR_PASSWORD_NONE, Info::EMPTY),
        }
    }

    /// The header identifier.
    pub const fn id(&self) -> HeaderId {
        self.id
    }

    /// The attribute byte.
    pub const fn attribute(&self) -> u8 {
        self.attribute
    }

    /// The information field.
    pub const fn info(&self) -> &Info {
        &self.info
    }

    /// Appends the 18 bytes.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(self.id.get());
        out.put_u8(self.attribute);
        out.put_slice(self.info.raw());
    }

    fn decode_exact(raw: &[u8]) -> Option<ExtHeader> {
        let (&id, rest) = raw.split_first()?;
        let (&attribute, rest) = rest.split_first()?;
        let info: [u8; INFO_LEN] = rest.get(..INFO_LEN)?.try_into().ok()?;
        Some(ExtHeader::new(
            HeaderId::new(id),
            attribute,
            Info::from_raw(info),
        ))
    }
}

/// A whole ESC/VP.net message: header plus extension headers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Message {
    version: Version,
    kind: MessageType,
    reserved: u16,
    status: Status,
    headers: Vec<ExtHeader>,
}

impl Message {
    /// A message with version 1.0, reserved bytes 0 and the given fields. At most 255 headers
    /// are kept (the count is one byte); more is a caller error reported as [`ValueError`].
    pub fn new(
        kind: MessageType,
        status: Status,
        headers: Vec<ExtHeader>,
    ) -> Result<Message, ValueError> {
        if headers.len() > 255 {
            return Err(ValueError::TooLong {
                what: "extension header list",
                len: headers.len(),
                max: 255,
            });
        }
        Ok(Message {
            version: Version::V1_0,
            kind,
            reserved: 0,
            status,
            headers,
        })
    }

    fn simple(kind: MessageType, status: Status, headers: Vec<ExtHeader>) -> Message {
        debug_assert!(headers.len() <= 255);
        Message {
            version: Version::V1_0,
            kind,
            reserved: 0,
            status,
            headers,
        }
    }

    /// A HELLO request (UDP discovery).
    pub fn hello() -> Message {
        Message::simple(MessageType::HELLO, Status::REQUEST, Vec::new())
    }

    /// A CONNECT request, with a Password header when a password is given (34 bytes) or
    /// without one (16 bytes).
    pub fn connect(password: Option<&Password>) -> Message {
        let headers = password.map(ExtHeader::password).into_iter().collect();
        Message::simple(MessageType::CONNECT, Status::REQUEST, headers)
    }

    /// A PASSWORD request: checks `current`, and changes it when `change` is `Some`
    /// (`Some(None)` removes the password).
    pub fn password_request(
        current: Option<&Password>,
        change: Option<Option<&Password>>,
    ) -> Message {
        let mut headers = Vec::with_capacity(2);
        headers.push(match current {
            Some(p) => ExtHeader::password(p),
            None => ExtHeader::new(HeaderId::PASSWORD, ATTR_PASSWORD_NONE, Info::EMPTY),
        });
        if let Some(new) = change {
            headers.push(ExtHeader::new_password(new));
        }
        Message::simple(MessageType::PASSWORD, Status::REQUEST, headers)
    }

    /// A projector's reply to `request`: same version and type, the given status, no headers.
    pub fn reply_to(request: &Message, status: Status) -> Message {
        Message {
            version: request.version,
            kind: request.kind,
            reserved: 0,
            status,
            headers: Vec::new(),
        }
    }

    /// A projector's HELLO reply with the three headers real projectors send, in their order:
    /// Projector-Name (US-ASCII), IM-Type, Projector-Command-Type (ESC/VP21).
    pub fn hello_reply(name: Info, im_type: u8) -> Message {
        Message::simple(
            MessageType::HELLO,
            Status::OK,
            vec![
                ExtHeader::new(HeaderId::PROJECTOR_NAME, ATTR_NAME_ASCII, name),
                ExtHeader::new(HeaderId::IM_TYPE, im_type, Info::EMPTY),
                ExtHeader::new(HeaderId::COMMAND_TYPE, COMMAND_TYPE_ESCVP21, Info::EMPTY),
            ],
        )
    }

    /// Replaces the version byte (e.g. to test a projector's 0x55 answer).
    pub fn with_version(mut self, version: Version) -> Message {
        self.version = version;
        self
    }

    /// The version byte.
    pub const fn version(&self) -> Version {
        self.version
    }

    /// The message type.
    pub const fn kind(&self) -> MessageType {
        self.kind
    }

    /// The two reserved bytes (0 in every known implementation; kept so that a projector
    /// emulator can answer a non-zero value with [`Status::BAD_REQUEST`]).
    pub const fn reserved(&self) -> u16 {
        self.reserved
    }

    /// The status byte.
    pub const fn status(&self) -> Status {
        self.status
    }

    /// The extension headers, in wire order.
    pub fn headers(&self) -> &[ExtHeader] {
        &self.headers
    }

    /// The first header with this identifier.
    pub fn header(&self, id: HeaderId) -> Option<&ExtHeader> {
        self.headers.iter().find(|h| h.id == id)
    }

    /// The length on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + EXT_HEADER_LEN * self.headers.len()
    }

    /// Appends the message.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_slice(PROTOCOL_ID);
        out.put_u8(self.version.get());
        out.put_u8(self.kind.get());
        out.put_u16(self.reserved);
        out.put_u8(self.status.get());
        // `new` and `decode` both bound the list to 255.
        out.put_u8(u8::try_from(self.headers.len()).unwrap_or(u8::MAX));
        for h in self.headers.iter().take(255) {
            h.encode(out);
        }
    }

    /// The message as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }

    /// Length of the message at the start of `input`, once its 16-byte header is there.
    ///
    /// Returns `Incomplete` for a prefix of a valid header and `Invalid` as soon as the
    /// protocol identifier cannot match.
    pub fn frame_len(input: &[u8]) -> Result<usize, DecodeError> {
        let id_part = input.len().min(PROTOCOL_ID.len());
        if let Some(pos) = input[..id_part]
            .iter()
            .zip(PROTOCOL_ID.iter())
            .position(|(a, b)| a != b)
        {
            return Err(DecodeError::invalid(pos, InvalidKind::ProtocolId));
        }
        match input.get(HEADER_LEN - 1) {
            None => Err(DecodeError::Incomplete {
                needed: HEADER_LEN - input.len(),
            }),
            Some(&n) => Ok(HEADER_LEN + EXT_HEADER_LEN * usize::from(n)),
        }
    }

    /// Decodes one message from the start of `input`, returning the bytes after it.
    pub fn decode(input: &[u8]) -> Result<(&[u8], Message), DecodeError> {
        let len = Message::frame_len(input)?;
        let Some(frame) = input.get(..len) else {
            return Err(DecodeError::Incomplete {
                needed: len - input.len(),
            });
        };
        let b = |i: usize| frame.get(i).copied().unwrap_or(0);
        let headers = frame
            .get(HEADER_LEN..)
            .unwrap_or(&[])
            .chunks_exact(EXT_HEADER_LEN)
            .filter_map(ExtHeader::decode_exact)
            .collect();
        let msg = Message {
            version: Version::new(b(10)),
            kind: MessageType::new(b(11)),
            reserved: u16::from_be_bytes([b(12), b(13)]),
            status: Status::new(b(14)),
            headers,
        };
        Ok((&input[len..], msg))
    }
}

/// What a projector says about itself in a HELLO reply.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HelloInfo {
    /// The projector name (Projector-Name header), if present; NUL padding removed.
    pub name: Option<String>,
    /// The IM-Type attribute (model family), an opaque byte.
    pub im_type: Option<u8>,
    /// The Projector-Command-Type attribute (0x21 = ESC/VP21 1.0).
    pub command_type: Option<u8>,
}

impl HelloInfo {
    /// Reads the headers of a HELLO reply. Headers are looked up by identifier, so their
    /// order does not matter. Returns `None` if `msg` is not an OK HELLO reply.
    pub fn from_reply(msg: &Message) -> Option<HelloInfo> {
        if msg.kind() != MessageType::HELLO || msg.status() != Status::OK {
            return None;
        }
        Some(HelloInfo {
            name: msg
                .header(HeaderId::PROJECTOR_NAME)
                .map(|h| String::from_utf8_lossy(h.info().text()).into_owned()),
            im_type: msg.header(HeaderId::IM_TYPE).map(|h| h.attribute()),
            command_type: msg.header(HeaderId::COMMAND_TYPE).map(|h| h.attribute()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_without_password_is_the_16_bytes_everyone_sends() {
        assert_eq!(
            Message::connect(None).to_bytes(),
            [
                0x45, 0x53, 0x43, 0x2F, 0x56, 0x50, 0x2E, 0x6E, 0x65, 0x74, 0x10, 0x03, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn short_and_long_passwords() {
        let p = Password::new("a").unwrap();
        let bytes = Message::connect(Some(&p)).to_bytes();
        assert_eq!(bytes.len(), 34);
        assert_eq!(&bytes[15..19], &[1, 1, 1, b'a']);
        assert!(bytes[19..].iter().all(|&b| b == 0));
        assert!(matches!(
            Password::new("0123456789abcdefX"),
            Err(ValueError::TooLong {
                len: 17,
                max: 16,
                ..
            })
        ));
        assert!(Password::new("").is_err());
        assert!(Password::new("pw\r").is_err());
        assert_eq!(format!("{p:?}"), "Password(***)");
    }

    #[test]
    fn frame_len_rejects_wrong_id_early() {
        assert_eq!(
            Message::frame_len(b"ESC/XP"),
            Err(DecodeError::Invalid {
                offset: 4,
                kind: InvalidKind::ProtocolId
            })
        );
        assert_eq!(
            Message::frame_len(b"ESC/"),
            Err(DecodeError::Incomplete { needed: 12 })
        );
    }

    #[test]
    fn debug_names_known_and_hex_for_unknown() {
        assert_eq!(format!("{:?}", Status::BUSY), "Status::BUSY");
        assert_eq!(format!("{:?}", Status::new(0x99)), "Status(0x99)");
    }
}
