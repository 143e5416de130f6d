//! The EPMC-rs agent.
//!
//! **Not implemented yet.** This crate is a placeholder in the workspace so that its place in
//! the architecture is visible (see `DESIGN.md`): discovery, the collection scheduler,
//! notifications, order execution, enrollment and self-update will live here. It exports
//! nothing and does nothing today.
#![forbid(unsafe_code)]
