//! Error types of the codec.
//!
//! Malformed bytes ([`DecodeError`]), values that do not fit a wire type ([`ValueError`]) and
//! device refusals (a decoded [`Reply::Err`](crate::vp21::Reply::Err), not an error at all) are
//! kept apart. Nothing here wraps `std::io::Error`: I/O belongs to the async layer.

use core::fmt;

/// Why bytes could not be decoded.
///
/// `Incomplete` means "feed more bytes and call again"; `Invalid` means the bytes can never
/// become a valid frame, whatever follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends before the frame does.
    #[error("incomplete frame: at least {needed} more byte(s) needed")]
    Incomplete {
        /// A lower bound on the number of bytes still missing (at least 1).
        needed: usize,
    },
    /// The input is not a valid frame.
    #[error("invalid frame at byte {offset}: {kind}")]
    Invalid {
        /// Offset, from the start of the input given to the decoder, of the first bad byte.
        offset: usize,
        /// What is wrong.
        kind: InvalidKind,
    },
}

impl DecodeError {
    pub(crate) fn invalid(offset: usize, kind: InvalidKind) -> Self {
        DecodeError::Invalid { offset, kind }
    }

    /// `true` for [`DecodeError::Incomplete`].
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

/// What is wrong with an invalid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidKind {
    /// The first ten bytes are not `ESC/VP.net`.
    ProtocolId,
    /// A line or frame is longer than the configured maximum.
    TooLong {
        /// The maximum, in bytes.
        max: usize,
    },
    /// A line is longer than the configured maximum line length.
    LineTooLong {
        /// The maximum, in bytes (line break excluded).
        max: usize,
    },
    /// A line that should be `KEY=VALUE` has no key, or a malformed command name.
    MalformedLine,
    /// The text is not valid UTF-8.
    NotUtf8,
}

impl fmt::Display for InvalidKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidKind::ProtocolId => f.write_str("protocol identifier is not \"ESC/VP.net\""),
            InvalidKind::TooLong { max } => write!(f, "longer than the maximum of {max} bytes"),
            InvalidKind::LineTooLong { max } => {
                write!(f, "line longer than the maximum of {max} bytes")
            }
            InvalidKind::MalformedLine => f.write_str("malformed line"),
            InvalidKind::NotUtf8 => f.write_str("not valid UTF-8"),
        }
    }
}

/// A value that does not fit a wire type: a too-long password, a source code that is not two
/// hex digits, a reply value that cannot be parsed into the typed value asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Longer than the field allows.
    #[error("{what} is {len} bytes long; at most {max} allowed")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A character the field does not allow.
    #[error("{what} contains a forbidden character {ch:?}")]
    BadChar {
        /// The field.
        what: &'static str,
        /// The character.
        ch: char,
    },
    /// Empty where a value is required.
    #[error("{what} is empty")]
    Empty {
        /// The field.
        what: &'static str,
    },
    /// The text does not have the expected form.
    #[error("{what}: cannot parse {text:?}: expected {expected}")]
    Parse {
        /// The field.
        what: &'static str,
        /// The text, shortened to at most 64 bytes.
        text: String,
        /// What was expected.
        expected: &'static str,
    },
}

impl ValueError {
    pub(crate) fn parse(what: &'static str, text: &str, expected: &'static str) -> Self {
        let mut end = text.len().min(64);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        ValueError::Parse {
            what,
            text: text[..end].to_owned(),
            expected,
        }
    }
}

/// Checks text against a field's rules: not empty (unless allowed), at most `max` bytes, and
/// every character `allowed`.
pub(crate) fn check_text(
    what: &'static str,
    text: &str,
    max: usize,
    allow_empty: bool,
    allowed: impl Fn(char) -> bool,
) -> Result<(), ValueError> {
    if text.is_empty() && !allow_empty {
        return Err(ValueError::Empty { what });
    }
    if text.len() > max {
        return Err(ValueError::TooLong {
            what,
            len: text.len(),
            max,
        });
    }
    match text.chars().find(|&c| !allowed(c)) {
        Some(ch) => Err(ValueError::BadChar { what, ch }),
        None => Ok(()),
    }
}
