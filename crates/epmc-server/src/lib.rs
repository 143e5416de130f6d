//! The EPMC-rs server.
//!
//! What exists (see `DESIGN.md` for the whole): the storage layer over SQLite and
//! PostgreSQL ([`store`]), the private certificate authority and enrollment tokens ([`ca`]),
//! the data directory ([`datadir`]), the embedded MQTT/TLS ingest endpoint ([`ingest`]), the
//! scale-mode consumer of an external broker ([`broker`]), signed agent releases
//! ([`release`]) served over HTTPS, the running server ([`server`]) and the operator's command
//! line ([`cli`]). The HTTPS portal and the audit log are not built yet.
#![forbid(unsafe_code)]

pub mod broker;
pub mod ca;
pub mod cli;
pub mod datadir;
pub mod ingest;
pub mod release;
pub mod server;
pub mod store;
