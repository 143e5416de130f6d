#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`net`]: the binary ESC/VP.net messages (HELLO, CONNECT, PASSWORD and their replies).
//! - [`vp21`]: the ESC/VP21 text that follows CONNECT: commands, replies, framing.
//! - [`event`]: `IMEVENT` notifications and `PWSTATUS?` replies.
//! - [`value`]: typed values (power, source, lamp hours…) and the properties carrying them.
//! - [`session`]: a sans-IO client session: handshake, one command in flight, replies paired
//!   with IMEVENT interleaving, timeouts from the ESC/VP21 timing rules.
//! - `client`, `discovery`, `codec` (feature `tokio`): async client, UDP HELLO discovery,
//!   tokio-util codecs.
//! - `http` (feature `http`): the projector's HTTP `json_query` interface and RFC 7616 Digest
//!   headers, sans I/O.
//! - `emulator` (feature `emulator`): an emulated projector fleet with fault injection.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod event;
pub mod net;
pub mod session;
pub mod value;
pub mod vp21;

#[cfg(feature = "tokio")]
pub mod client;
#[cfg(feature = "tokio")]
pub mod codec;
#[cfg(feature = "tokio")]
pub mod discovery;
#[cfg(feature = "emulator")]
pub mod emulator;
#[cfg(feature = "http")]
pub mod http;

pub use error::{DecodeError, InvalidKind, ValueError};
