//! The JSON contract between the EPMC-rs agent and server.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
