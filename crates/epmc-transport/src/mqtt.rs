//! MQTT 3.1.1 packets: the subset a QoS-1 client needs, encoded and decoded without I/O.
//!
//! Why our own codec: `mqttbytes` is no longer maintained (its code moved into `rumqttc` in
//! 2022 and the crate never had another release), and `rumqttc` pins a `rustls-webpki` with
//! open advisories. The subset here (CONNECT, CONNACK, PUBLISH at QoS 0/1, PUBACK, SUBSCRIBE,
//! SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT) is small, fuzzed, and checked
//! against `rumqttc`'s codec in the tests (`tests/mqtt_codec.rs`, rumqttc without its TLS
//! features as a dev-dependency only): the same packet gives the same bytes, each decodes the
//! other's output, and on mutated packets the two read the same thing wherever both accept.
//! We accept two things rumqttc refuses, on purpose: a binary (non-UTF-8) password, as MQTT
//! 3.1.1 allows, and an unknown CONNACK code, read as [`ConnectReturn::Other`] so the client
//! reports a refusal rather than bad bytes.
//!
//! Rules enforced: a maximum packet size both ways ([`Packet::decode`] refuses a larger
//! remaining length before buffering it, [`Packet::encode`] refuses to produce one); the
//! remaining-length varint is at most four bytes and minimal-or-not is accepted as the spec
//! allows; topic names are UTF-8 without NUL and without wildcards (filters may have them in
//! the allowed places); QoS 2 is refused (this client never asks for it).

use bytes::{Buf, BufMut, Bytes};

/// Default maximum packet size: 1 MiB.
pub const DEFAULT_MAX_PACKET: usize = 1024 * 1024;

/// Why bytes are not a valid packet, or a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// More bytes are needed (at least `needed`).
    #[error("incomplete packet: {needed} more byte(s) needed")]
    Incomplete {
        /// A lower bound.
        needed: usize,
    },
    /// The packet is larger than the maximum.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// Malformed bytes.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A packet type or feature this codec does not support (e.g. QoS 2).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// An invalid topic name or filter.
    #[error("invalid topic: {0}")]
    Topic(&'static str),
}

/// Quality of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce,
    /// At least once.
    AtLeastOnce,
}

impl QoS {
    fn bits(self) -> u8 {
        match self {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
        }
    }

    fn from_bits(b: u8) -> Result<QoS, PacketError> {
        match b {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Err(PacketError::Unsupported("QoS 2")),
            _ => Err(PacketError::Malformed("QoS 3")),
        }
    }
}

/// A validated topic name (no wildcards, no NUL, 1..=65535 bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicName(String);

impl TopicName {
    /// Validates a topic name.
    pub fn new(s: impl Into<String>) -> Result<Self, PacketError> {
        let s = s.into();
        if s.is_empty() || s.len() > u16::MAX as usize {
            return Err(PacketError::Topic("empty or longer than 65535 bytes"));
        }
        if s.contains(['+', '#', '\0']) {
            return Err(PacketError::Topic("wildcard or NUL in a topic name"));
        }
        Ok(TopicName(s))
    }

    /// The topic.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated topic filter (wildcards only as whole levels, `#` last).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Validates a filter.
    pub fn new(s: impl Into<String>) -> Result<Self, PacketError> {
        let s = s.into();
        if s.is_empty() || s.len() > u16::MAX as usize || s.contains('\0') {
            return Err(PacketError::Topic("empty, too long, or NUL in a filter"));
        }
        let levels: Vec<&str> = s.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let ok = match *level {
                "#" => i == levels.len() - 1,
                "+" => true,
                l => !l.contains(['+', '#']),
            };
            if !ok {
                return Err(PacketError::Topic("misplaced wildcard in a filter"));
            }
        }
        Ok(TopicFilter(s))
    }

    /// The filter.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The last will.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// Topic.
    pub topic: TopicName,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
}

/// CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// Client id (UTF-8, at most 65535 bytes).
    pub client_id: String,
    /// Start a new session (`true`) or resume the persistent one.
    pub clean_session: bool,
    /// Keep-alive in seconds (0 = off).
    pub keep_alive: u16,
    /// Last will.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
}

/// CONNACK return codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectReturn {
    /// 0: accepted.
    Accepted,
    /// 1: unacceptable protocol version.
    BadProtocol,
    /// 2: identifier rejected.
    IdentifierRejected,
    /// 3: server unavailable.
    ServerUnavailable,
    /// 4: bad user name or password.
    BadCredentials,
    /// 5: not authorized.
    NotAuthorized,
    /// Any other value.
    Other(u8),
}

impl ConnectReturn {
    fn from_byte(b: u8) -> Self {
        match b {
            0 => ConnectReturn::Accepted,
            1 => ConnectReturn::BadProtocol,
            2 => ConnectReturn::IdentifierRejected,
            3 => ConnectReturn::ServerUnavailable,
            4 => ConnectReturn::BadCredentials,
            5 => ConnectReturn::NotAuthorized,
            o => ConnectReturn::Other(o),
        }
    }

    fn byte(self) -> u8 {
        match self {
            ConnectReturn::Accepted => 0,
            ConnectReturn::BadProtocol => 1,
            ConnectReturn::IdentifierRejected => 2,
            ConnectReturn::ServerUnavailable => 3,
            ConnectReturn::BadCredentials => 4,
            ConnectReturn::NotAuthorized => 5,
            ConnectReturn::Other(o) => o,
        }
    }
}

/// PUBLISH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: TopicName,
    /// QoS.
    pub qos: QoS,
    /// Packet id (QoS 1 only; must be non-zero).
    pub packet_id: Option<u16>,
    /// Retain flag.
    pub retain: bool,
    /// Duplicate flag (a retransmission).
    pub dup: bool,
    /// Payload.
    pub payload: Bytes,
}

/// A packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT.
    Connect(Connect),
    /// CONNACK: session present, return code.
    ConnAck {
        /// The server resumed a session.
        session_present: bool,
        /// The result.
        code: ConnectReturn,
    },
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(u16),
    /// SUBSCRIBE: packet id, filters with requested QoS.
    Subscribe(u16, Vec<(TopicFilter, QoS)>),
    /// SUBACK: packet id, granted QoS per filter (`None` = 0x80 failure).
    SubAck(u16, Vec<Option<QoS>>),
    /// UNSUBSCRIBE.
    Unsubscribe(u16, Vec<TopicFilter>),
    /// UNSUBACK.
    UnsubAck(u16),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) -> Result<(), PacketError> {
    let len =
        u16::try_from(s.len()).map_err(|_| PacketError::Malformed("string over 65535 bytes"))?;
    out.put_u16(len);
    out.put_slice(s);
    Ok(())
}

fn get_u16(b: &mut &[u8]) -> Result<u16, PacketError> {
    if b.len() < 2 {
        return Err(PacketError::Malformed("truncated"));
    }
    Ok(b.get_u16())
}

fn get_bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], PacketError> {
    let len = get_u16(b)? as usize;
    if b.len() < len {
        return Err(PacketError::Malformed("truncated string"));
    }
    let (s, rest) = b.split_at(len);
    *b = rest;
    Ok(s)
}

fn get_str(b: &mut &[u8]) -> Result<String, PacketError> {
    let s = std::str::from_utf8(get_bytes(b)?).map_err(|_| PacketError::Malformed("not UTF-8"))?;
    if s.contains('\0') {
        return Err(PacketError::Malformed("NUL in a string"));
    }
    Ok(s.to_owned())
}

fn packet_id(b: &mut &[u8]) -> Result<u16, PacketError> {
    match get_u16(b)? {
        0 => Err(PacketError::Malformed("packet id 0")),
        id => Ok(id),
    }
}

impl Packet {
    /// Decodes one packet from the start of `input`, returning it and the bytes it used.
    pub fn decode(input: &[u8], max_packet: usize) -> Result<(Packet, usize), PacketError> {
        let Some(&first) = input.first() else {
            return Err(PacketError::Incomplete { needed: 2 });
        };
        // Remaining length: up to four 7-bit groups.
        let mut len: usize = 0;
        let mut header = 1;
        loop {
            let Some(&b) = input.get(header) else {
                return Err(PacketError::Incomplete { needed: 1 });
            };
            len |= usize::from(b & 0x7F) << (7 * (header - 1));
            header += 1;
            if b & 0x80 == 0 {
                break;
            }
            if header > 4 {
                return Err(PacketError::Malformed("remaining length over four bytes"));
            }
        }
        let total = header + len;
        if total > max_packet {
            return Err(PacketError::TooLarge {
                size: total,
                max: max_packet,
            });
        }
        let Some(body) = input.get(header..total) else {
            return Err(PacketError::Incomplete {
                needed: total - input.len(),
            });
        };
        let flags = first & 0x0F;
        let mut b = body;
        let packet = match first >> 4 {
            1 => Packet::Connect(decode_connect(&mut b)?),
            2 => {
                if flags != 0 || b.len() != 2 {
                    return Err(PacketError::Malformed("CONNACK"));
                }
                if b[0] & 0xFE != 0 {
                    return Err(PacketError::Malformed("CONNACK flags"));
                }
                Packet::ConnAck {
                    session_present: b[0] & 1 == 1,
                    code: ConnectReturn::from_byte(b[1]),
                }
            }
            3 => {
                let qos = QoS::from_bits((flags >> 1) & 3)?;
                let topic = TopicName::new(get_str(&mut b)?)?;
                let packet_id = match qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(packet_id(&mut b)?),
                };
                if qos == QoS::AtMostOnce && flags & 0x08 != 0 {
                    return Err(PacketError::Malformed("DUP set on QoS 0"));
                }
                Packet::Publish(Publish {
                    topic,
                    qos,
                    packet_id,
                    retain: flags & 1 == 1,
                    dup: flags & 0x08 != 0,
                    payload: Bytes::copy_from_slice(b),
                })
            }
            4 | 11 => {
                if flags != 0 || b.len() != 2 {
                    return Err(PacketError::Malformed("PUBACK/UNSUBACK"));
                }
                let id = packet_id(&mut b)?;
                if first >> 4 == 4 {
                    Packet::PubAck(id)
                } else {
                    Packet::UnsubAck(id)
                }
            }
            8 => {
                if flags != 2 {
                    return Err(PacketError::Malformed("SUBSCRIBE flags"));
                }
                let id = packet_id(&mut b)?;
                let mut filters = Vec::new();
                while !b.is_empty() {
                    let f = TopicFilter::new(get_str(&mut b)?)?;
                    let Some((&q, rest)) = b.split_first() else {
                        return Err(PacketError::Malformed("SUBSCRIBE without QoS"));
                    };
                    if q & 0xFC != 0 {
                        return Err(PacketError::Malformed("SUBSCRIBE reserved bits"));
                    }
                    b = rest;
                    filters.push((f, QoS::from_bits(q)?));
                }
                if filters.is_empty() {
                    return Err(PacketError::Malformed("SUBSCRIBE without filters"));
                }
                Packet::Subscribe(id, filters)
            }
            9 => {
                if flags != 0 {
                    return Err(PacketError::Malformed("SUBACK flags"));
                }
                let id = packet_id(&mut b)?;
                let codes = b
                    .iter()
                    .map(|&c| match c {
                        0x80 => Ok(None),
                        c => QoS::from_bits(c).map(Some),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if codes.is_empty() {
                    // One code per filter, and a SUBSCRIBE has at least one (MQTT-3.8.3-3).
                    return Err(PacketError::Malformed("SUBACK without return codes"));
                }
                Packet::SubAck(id, codes)
            }
            10 => {
                if flags != 2 {
                    return Err(PacketError::Malformed("UNSUBSCRIBE flags"));
                }
                let id = packet_id(&mut b)?;
                let mut filters = Vec::new();
                while !b.is_empty() {
                    filters.push(TopicFilter::new(get_str(&mut b)?)?);
                }
                if filters.is_empty() {
                    return Err(PacketError::Malformed("UNSUBSCRIBE without filters"));
                }
                Packet::Unsubscribe(id, filters)
            }
            12..=14 => {
                if flags != 0 || !b.is_empty() {
                    return Err(PacketError::Malformed("PINGREQ/PINGRESP/DISCONNECT"));
                }
                match first >> 4 {
                    12 => Packet::PingReq,
                    13 => Packet::PingResp,
                    _ => Packet::Disconnect,
                }
            }
            5..=7 => return Err(PacketError::Unsupported("QoS 2 flow")),
            _ => return Err(PacketError::Malformed("reserved packet type")),
        };
        Ok((packet, total))
    }

    /// Appends the packet, refusing to produce more than `max_packet` bytes.
    pub fn encode(&self, out: &mut Vec<u8>, max_packet: usize) -> Result<(), PacketError> {
        let mut body = Vec::new();
        let first: u8 = match self {
            Packet::Connect(c) => {
                encode_connect(c, &mut body)?;
                0x10
            }
            Packet::ConnAck {
                session_present,
                code,
            } => {
                body.put_u8(u8::from(*session_present));
                body.put_u8(code.byte());
                0x20
            }
            Packet::Publish(p) => {
                put_str(&mut body, p.topic.as_str().as_bytes())?;
                match (p.qos, p.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) if id != 0 => body.put_u16(id),
                    (QoS::AtMostOnce, None) => {}
                    _ => return Err(PacketError::Malformed("packet id does not fit the QoS")),
                }
                body.put_slice(&p.payload);
                0x30 | (u8::from(p.dup && p.qos == QoS::AtLeastOnce) << 3)
                    | (p.qos.bits() << 1)
                    | u8::from(p.retain)
            }
            Packet::PubAck(id) => {
                body.put_u16(nonzero(*id)?);
                0x40
            }
            Packet::Subscribe(id, filters) => {
                if filters.is_empty() {
                    return Err(PacketError::Malformed("SUBSCRIBE without filters"));
                }
                body.put_u16(nonzero(*id)?);
                for (f, q) in filters {
                    put_str(&mut body, f.as_str().as_bytes())?;
                    body.put_u8(q.bits());
                }
                0x82
            }
            Packet::SubAck(id, codes) => {
                if codes.is_empty() {
                    return Err(PacketError::Malformed("SUBACK without return codes"));
                }
                body.put_u16(nonzero(*id)?);
                for c in codes {
                    body.put_u8(c.map_or(0x80, QoS::bits));
                }
                0x90
            }
            Packet::Unsubscribe(id, filters) => {
                if filters.is_empty() {
                    return Err(PacketError::Malformed("UNSUBSCRIBE without filters"));
                }
                body.put_u16(nonzero(*id)?);
                for f in filters {
                    put_str(&mut body, f.as_str().as_bytes())?;
                }
                0xA2
            }
            Packet::UnsubAck(id) => {
                body.put_u16(nonzero(*id)?);
                0xB0
            }
            Packet::PingReq => 0xC0,
            Packet::PingResp => 0xD0,
            Packet::Disconnect => 0xE0,
        };
        let mut len_bytes = [0u8; 4];
        let mut n = body.len();
        if n > 268_435_455 {
            return Err(PacketError::TooLarge {
                size: n,
                max: max_packet,
            });
        }
        let mut used = 0;
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            len_bytes[used] = byte;
            used += 1;
            if n == 0 {
                break;
            }
        }
        let total = 1 + used + body.len();
        if total > max_packet {
            return Err(PacketError::TooLarge {
                size: total,
                max: max_packet,
            });
        }
        out.put_u8(first);
        out.put_slice(&len_bytes[..used]);
        out.put_slice(&body);
        Ok(())
    }

    /// The packet as bytes (with [`DEFAULT_MAX_PACKET`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>, PacketError> {
        let mut v = Vec::new();
        self.encode(&mut v, DEFAULT_MAX_PACKET)?;
        Ok(v)
    }
}

fn nonzero(id: u16) -> Result<u16, PacketError> {
    if id == 0 {
        Err(PacketError::Malformed("packet id 0"))
    } else {
        Ok(id)
    }
}

fn decode_connect(b: &mut &[u8]) -> Result<Connect, PacketError> {
    if get_bytes(b)? != b"MQTT" {
        return Err(PacketError::Malformed("protocol name is not MQTT"));
    }
    let Some((&level, rest)) = b.split_first() else {
        return Err(PacketError::Malformed("truncated CONNECT"));
    };
    *b = rest;
    if level != 4 {
        return Err(PacketError::Unsupported(
            "protocol level other than 4 (3.1.1)",
        ));
    }
    let Some((&flags, rest)) = b.split_first() else {
        return Err(PacketError::Malformed("truncated CONNECT"));
    };
    *b = rest;
    if flags & 1 != 0 {
        return Err(PacketError::Malformed("CONNECT reserved flag"));
    }
    let keep_alive = get_u16(b)?;
    let client_id = get_str(b)?;
    let will = if flags & 0x04 != 0 {
        let topic = TopicName::new(get_str(b)?)?;
        let payload = Bytes::copy_from_slice(get_bytes(b)?);
        Some(Will {
            topic,
            payload,
            qos: QoS::from_bits((flags >> 3) & 3)?,
            retain: flags & 0x20 != 0,
        })
    } else {
        if flags & 0x38 != 0 {
            return Err(PacketError::Malformed("will flags without a will"));
        }
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(get_str(b)?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(Bytes::copy_from_slice(get_bytes(b)?))
    } else {
        None
    };
    if !b.is_empty() {
        return Err(PacketError::Malformed("trailing bytes in CONNECT"));
    }
    Ok(Connect {
        client_id,
        clean_session: flags & 0x02 != 0,
        keep_alive,
        will,
        username,
        password,
    })
}

fn encode_connect(c: &Connect, body: &mut Vec<u8>) -> Result<(), PacketError> {
    put_str(body, b"MQTT")?;
    body.put_u8(4);
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.bits() << 3) | (u8::from(w.retain) << 5);
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    body.put_u8(flags);
    body.put_u16(c.keep_alive);
    put_str(body, c.client_id.as_bytes())?;
    if let Some(w) = &c.will {
        put_str(body, w.topic.as_str().as_bytes())?;
        put_str(body, &w.payload)?;
    }
    if let Some(u) = &c.username {
        put_str(body, u.as_bytes())?;
    }
    if let Some(p) = &c.password {
        put_str(body, p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_bytes() {
        assert_eq!(Packet::PingReq.to_bytes().unwrap(), [0xC0, 0]);
        assert_eq!(Packet::PubAck(10).to_bytes().unwrap(), [0x40, 2, 0, 10]);
        let p = Packet::Publish(Publish {
            topic: TopicName::new("a/b").unwrap(),
            qos: QoS::AtLeastOnce,
            packet_id: Some(1),
            retain: false,
            dup: false,
            payload: Bytes::from_static(b"hi"),
        });
        assert_eq!(
            p.to_bytes().unwrap(),
            [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 1, b'h', b'i']
        );
        // 128 bytes of remaining length take two varint bytes.
        let big = Packet::Publish(Publish {
            topic: TopicName::new("t").unwrap(),
            qos: QoS::AtMostOnce,
            packet_id: None,
            retain: true,
            dup: false,
            payload: Bytes::from(vec![7u8; 125]),
        });
        let bytes = big.to_bytes().unwrap();
        assert_eq!(&bytes[..3], &[0x31, 0x80, 0x01]);
        assert_eq!(Packet::decode(&bytes, 1024).unwrap(), (big, bytes.len()));
    }

    #[test]
    fn limits_and_refusals() {
        assert!(matches!(
            Packet::decode(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], 1024),
            Err(PacketError::TooLarge { .. })
        ));
        assert!(matches!(
            Packet::decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], usize::MAX),
            Err(PacketError::Malformed(_))
        ));
        assert!(matches!(
            Packet::decode(&[0x34, 3, 0, 1, b'a'], 1024),
            Err(PacketError::Unsupported(_))
        ));
        assert!(TopicName::new("a/+").is_err());
        assert!(TopicFilter::new("a/#/b").is_err());
        assert!(TopicFilter::new("a/+/b/#").is_ok());
        let big = Packet::Publish(Publish {
            topic: TopicName::new("t").unwrap(),
            qos: QoS::AtMostOnce,
            packet_id: None,
            retain: false,
            dup: false,
            payload: Bytes::from(vec![0u8; 2000]),
        });
        assert!(matches!(
            big.encode(&mut Vec::new(), 1024),
            Err(PacketError::TooLarge { .. })
        ));
    }
}
