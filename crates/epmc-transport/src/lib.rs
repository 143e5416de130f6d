//! Transport for EPMC-rs: how agent telemetry reaches the server.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
