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
//! - [`enroll`]: enrollment with a one-time token: the CA pinned from the token's
//!   fingerprint, the key made locally, the certificate checked, the files written all or
//!   nothing.
//! - [`update`]: self-update from a signed (ed25519) release manifest: verified, never a
//!   downgrade, installed atomically, rolled back when the new binary fails its self-test.
//! - [`service`]: the agent service (`run`): device tasks, the durable outbox to the server,
//!   orders journaled and executed, the agent screen.
//! - [`progress`]: the progress line of long command-line operations on a terminal.
//! - [`cli`]: the `epmc-agent` command line (`collect --once`, `discover`, `check`, `run`,
//!   `status`, `enroll`, `update`); the binary only sets up logging and calls it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod collect;
pub mod config;
pub mod discover;
pub mod enroll;
pub mod http;
pub mod identity;
pub mod progress;
pub mod service;
pub mod sweep;
pub mod update;
