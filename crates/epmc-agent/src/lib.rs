//! The EPMC-rs agent: the projector side.
//!
//! - [`config`]: the agent's TOML configuration, validated with line numbers; targets expand
//!   to the exact list of addresses the agent may contact.
//! - [`collect`]: reads a projector over ESC/VP.net into `epmc-proto` messages
//!   (`DeviceSnapshot`, `FullCollection`); failures are typed (busy, password, timeout,
//!   garbage, dropped, refused).
//! - [`http`]: the HTTP `json_query` collector (Digest auth), the fallback where port 3629
//!   is closed.
//! - [`discover`]: a bounded-concurrency TCP sweep of the configured addresses, combined
//!   with UDP HELLO.
//! - [`cli`]: the `epmc-agent` command line (`collect --once`, `discover`, `check`); the
//!   binary only sets up logging and calls it.
//!
//! Not here yet (see `DESIGN.md`): the scheduler and device tasks, IMEVENT forwarding, the
//! server connection, orders, enrollment and self-update.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod collect;
pub mod config;
pub mod discover;
pub mod http;
pub mod identity;
pub mod service;
pub mod sweep;
