//! The EPMC-rs server.
//!
//! **Not implemented yet.** This crate is a placeholder in the workspace so that its place in
//! the architecture is visible (see `DESIGN.md`): the MQTT/TLS ingest endpoint, storage
//! (SQLite/PostgreSQL), the private CA and enrollment, order dispatch, the HTTPS portal and the
//! audit log will live here. It exports nothing and does nothing today.
#![forbid(unsafe_code)]
pub mod ingest;
