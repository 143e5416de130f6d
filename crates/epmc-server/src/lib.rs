//! The EPMC-rs server.
//!
//! What exists (see `DESIGN.md` for the whole): the storage layer over SQLite and
//! PostgreSQL ([`store`]), the private certificate authority and enrollment tokens ([`ca`]),
//! the data directory ([`datadir`]), the embedded MQTT/TLS ingest endpoint ([`ingest`]), and
//! signed agent releases ([`release`]) served over HTTPS by [`server`].
//! The HTTPS portal and the audit log are not built yet.
#![forbid(unsafe_code)]

pub mod ca;
pub mod datadir;
pub mod ingest;
pub mod release;
pub mod server;
pub mod store;
