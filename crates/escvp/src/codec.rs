//! tokio-util [`Decoder`]/[`Encoder`] adapters (feature `tokio`).
//!
//! - [`ReplyCodec`]: client side of an ESC/VP21 stream: decodes replies and events, encodes
//!   commands.
//! - [`RequestCodec`]: projector side: decodes command lines, encodes replies.
//! - [`MessageCodec`]: ESC/VP.net binary messages (HELLO, CONNECT, PASSWORD).
//!
//! Every decoder returns `Ok(None)` when it needs more bytes and enforces a maximum length.
//! Errors are [`CodecError`]: malformed bytes and I/O are kept apart. After a decode error
//! the ESC/VP21 codecs have already dropped the bad bytes (see [`ReplyDecoder::recover`]), so
//! a caller that goes on decoding resumes with the next reply or line; `FramedRead` itself
//! ends the stream at the first error.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::DecodeError;
use crate::net::{MAX_MESSAGE_LEN, Message};
use crate::vp21::{Command, OwnedReply, OwnedRequest, Reply, ReplyDecoder, RequestDecoder};

/// Error of the tokio-util adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Reading or writing failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Client side of an ESC/VP21 stream.
#[derive(Debug, Default, Clone)]
pub struct ReplyCodec {
    decoder: ReplyDecoder,
}

impl ReplyCodec {
    /// A codec refusing replies longer than `max_len` bytes.
    pub fn with_max_len(max_len: usize) -> Self {
        ReplyCodec {
            decoder: ReplyDecoder::with_max_len(max_len),
        }
    }

    /// A codec refusing lines longer than `max_line` bytes and replies longer than
    /// `max_len` bytes (see [`ReplyDecoder::with_limits`]).
    pub fn with_limits(max_line: usize, max_len: usize) -> Self {
        ReplyCodec {
            decoder: ReplyDecoder::with_limits(max_line, max_len),
        }
    }
}

impl Decoder for ReplyCodec {
    type Item = OwnedReply;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<OwnedReply>, CodecError> {
        match self.decoder.decode(src) {
            Ok(None) => Ok(None),
            Ok(Some((n, reply))) => {
                let owned = OwnedReply::from(reply);
                src.advance(n);
                Ok(Some(owned))
            }
            Err(e) => {
                let n = self.decoder.recover(src);
                src.advance(n);
                Err(e.into())
            }
        }
    }
}

impl Encoder<&Command> for ReplyCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &Command, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.encode(dst);
        Ok(())
    }
}

impl Encoder<Command> for ReplyCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Command, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.encode(dst);
        Ok(())
    }
}

/// Projector side of an ESC/VP21 stream.
#[derive(Debug, Default, Clone)]
pub struct RequestCodec {
    decoder: RequestDecoder,
}

impl RequestCodec {
    /// A codec refusing request lines longer than `max_len` bytes.
    pub fn with_max_len(max_len: usize) -> Self {
        RequestCodec {
            decoder: RequestDecoder::with_max_len(max_len),
        }
    }
}

impl Decoder for RequestCodec {
    type Item = OwnedRequest;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<OwnedRequest>, CodecError> {
        match self.decoder.decode(src) {
            Ok(None) => Ok(None),
            Ok(Some((n, line))) => {
                let owned = OwnedRequest::from(line);
                src.advance(n);
                Ok(Some(owned))
            }
            Err(e) => {
                let n = self.decoder.recover(src);
                src.advance(n);
                Err(e.into())
            }
        }
    }
}

impl Encoder<Reply<'_>> for RequestCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Reply<'_>, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.encode(dst);
        Ok(())
    }
}

impl Encoder<&OwnedReply> for RequestCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &OwnedReply, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.as_reply().encode(dst);
        Ok(())
    }
}

/// ESC/VP.net binary messages. A message is at most [`MAX_MESSAGE_LEN`] bytes by
/// construction (the header count is one byte).
#[derive(Debug, Default, Clone, Copy)]
pub struct MessageCodec;

impl Decoder for MessageCodec {
    type Item = Message;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        match Message::decode(src) {
            Err(DecodeError::Incomplete { needed }) => {
                src.reserve(needed.min(MAX_MESSAGE_LEN));
                Ok(None)
            }
            Err(e) => Err(e.into()),
            Ok((rest, msg)) => {
                let n = src.len() - rest.len();
                src.advance(n);
                Ok(Some(msg))
            }
        }
    }
}

impl Encoder<&Message> for MessageCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codec_splits_and_waits() {
        let mut c = ReplyCodec::default();
        let mut buf = BytesMut::from(&b"PWR=0"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"1\r::ERR\r:");
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(OwnedReply::Value {
                key: "PWR".into(),
                value: "01".into()
            })
        );
        assert_eq!(c.decode(&mut buf).unwrap(), Some(OwnedReply::Ack));
        assert_eq!(c.decode(&mut buf).unwrap(), Some(OwnedReply::Err));
        assert!(buf.is_empty());
    }

    #[test]
    fn request_and_message_codecs() {
        let mut c = RequestCodec::default();
        let mut buf = BytesMut::from(&b"PWR ON\r\nSNO?\r"[..]);
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(OwnedRequest::Set("PWR".into(), "ON".into()))
        );
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(OwnedRequest::Query("SNO".into()))
        );
        let mut m = MessageCodec;
        let mut buf = BytesMut::from(&b"ESC/VP.net\x10\x03\x00\x00\x20"[..]);
        assert!(m.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"\x00rest");
        assert_eq!(
            m.decode(&mut buf).unwrap().map(|m| m.status()),
            Some(crate::net::Status::OK)
        );
        assert_eq!(&buf[..], b"rest");
    }

    #[test]
    fn codecs_resume_after_an_error() {
        let mut c = ReplyCodec::with_limits(8, 64);
        let mut buf = BytesMut::from(&b"LONGVALUE=0123456789\r:ERR\r:"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(CodecError::Decode(DecodeError::Invalid { .. }))
        ));
        assert_eq!(c.decode(&mut buf).unwrap(), Some(OwnedReply::Err));
        assert!(buf.is_empty());

        let mut c = RequestCodec::with_max_len(8);
        let mut buf = BytesMut::from(&b"PWR ONONONON"[..]);
        assert!(c.decode(&mut buf).is_err());
        assert!(buf.is_empty(), "the start of the over-long line is dropped");
        buf.extend_from_slice(b"ON\r\nPWR?\r");
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(OwnedRequest::Query("PWR".into()))
        );
    }
}
