//! ESC/VP.net and ESC/VP21: the protocol Epson projectors speak on TCP 3629.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
