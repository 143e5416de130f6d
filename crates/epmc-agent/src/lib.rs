//! The EPMC-rs agent: the projector side.
//!
//! - [`config`]: the agent's TOML configuration, validated with line numbers; targets expand
//!   to the exact list of addresses the agent may contact.
//! - [`collect`]: reads a projector over ESC/VP.net into `epmc-proto` messages
//!   (`DeviceSnapshot`, `FullCollection`); failures are typed (busy, password, timeout,
//!   garbage, dropped, refused).
//! - [`discover`]: a bounded-concurrency TCP sweep of the configured addresses.
//! - [`update`]: self-update from a signed (ed25519) release manifest: verified, never a
//!   downgrade, installed atomically, rolled back when the new binary fails its self-test.
//! - [`cli`]: the `epmc-agent` command line (`collect --once`, `discover`, `check`); the
//!   binary only sets up logging and calls it.
//!
//! Not here yet (see `DESIGN.md`): the scheduler and device tasks, IMEVENT forwarding, the
//! server connection, orders and enrollment.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod collect;
pub mod config;
pub mod discover;
pub mod identity;
pub mod service;
pub mod sweep;
pub mod update;
