//! The enrollment token's text format, `epmc1.<token-id>.<secret>.<ca-sha256>`, shared by the
//! server that prints it and the agent that reads it.
//!
//! Like kubeadm's `--discovery-token-ca-cert-hash`, the token carries the SHA-256 of the
//! server's CA certificate, so the agent pins that CA before its first request. The id is
//! public (the server looks the token up by it); the secret is what proves possession. Every
//! part is lowercase hex of a fixed length. [`TokenParts`]' `Debug` hides the secret and no
//! error message repeats the token.
//!
//! ```
//! use epmc_proto::token::{TokenFormatError, TokenParts};
//!
//! let text = format!("epmc1.{}.{}.{}", "01".repeat(8), "ab".repeat(24), "cd".repeat(32));
//! let token = TokenParts::parse(&format!("  {text}\n"))?;
//! assert_eq!(token.id_hex(), "01".repeat(8));
//! assert_eq!(token.to_token_string(), text);
//! assert!(!format!("{token:?}").contains(&"ab".repeat(24)));
//! assert_eq!(TokenParts::parse("epmc2.a.b.c"), Err(TokenFormatError::UnknownFormat));
//! # Ok::<(), TokenFormatError>(())
//! ```

use std::fmt;

/// The token's first part: format name and version.
pub const TOKEN_PREFIX: &str = "epmc1";
/// Bytes of the public token id (16 hex characters).
pub const ID_LEN: usize = 8;
/// Bytes of the secret (48 hex characters, 192 bits).
pub const SECRET_LEN: usize = 24;
/// Bytes of the CA fingerprint (SHA-256, 64 hex characters).
pub const CA_SHA256_LEN: usize = 32;

/// Why a string is not an enrollment token. Messages never repeat the token (it holds a
/// secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFormatError {
    /// It does not start with `epmc1.`.
    #[error("not an enrollment token: it must start with \"{TOKEN_PREFIX}.\"")]
    UnknownFormat,
    /// Not four dot-separated parts.
    #[error(
        "an enrollment token has 4 parts, {TOKEN_PREFIX}.<token-id>.<secret>.<ca-sha256>; this one has {0}"
    )]
    WrongPartCount(usize),
    /// The token id is not 16 lowercase hex characters.
    #[error("the enrollment token's id must be {} lowercase hex characters", ID_LEN * 2)]
    BadTokenId,
    /// The secret is not 48 lowercase hex characters.
    #[error("the enrollment token's secret must be {} lowercase hex characters", SECRET_LEN * 2)]
    BadSecret,
    /// The CA fingerprint is not 64 lowercase hex characters.
    #[error("the enrollment token's CA fingerprint must be 64 lowercase hex characters (SHA-256)")]
    BadFingerprint,
}

/// The three values an enrollment token carries.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenParts {
    /// The public token id.
    pub id: [u8; ID_LEN],
    /// The secret.
    pub secret: [u8; SECRET_LEN],
    /// SHA-256 of the server's CA certificate (DER).
    pub ca_sha256: [u8; CA_SHA256_LEN],
}

impl fmt::Debug for TokenParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenParts")
            .field("id", &self.id_hex())
            .field("secret", &"[secret]")
            .field("ca_sha256", &hex(&self.ca_sha256))
            .finish()
    }
}

impl TokenParts {
    /// Parses `epmc1.<token-id>.<secret>.<ca-sha256>`. Surrounding whitespace, as pasted from
    /// a terminal, is ignored; hex must be lowercase.
    pub fn parse(s: &str) -> Result<TokenParts, TokenFormatError> {
        let s = s.trim();
        let parts: Vec<&str> = s.split('.').collect();
        if parts.first() != Some(&TOKEN_PREFIX) {
            return Err(TokenFormatError::UnknownFormat);
        }
        let [_, id, secret, ca] = parts.as_slice() else {
            return Err(TokenFormatError::WrongPartCount(parts.len()));
        };
        Ok(TokenParts {
            id: unhex(id).ok_or(TokenFormatError::BadTokenId)?,
            secret: unhex(secret).ok_or(TokenFormatError::BadSecret)?,
            ca_sha256: unhex(ca).ok_or(TokenFormatError::BadFingerprint)?,
        })
    }

    /// The token as the admin hands it to the agent. It contains the secret.
    pub fn to_token_string(&self) -> String {
        format!(
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.id_hex(),
            hex(&self.secret),
            hex(&self.ca_sha256)
        )
    }

    /// The public token id as 16 lowercase hex characters.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

fn hex(bytes: &[u8]) -> String {
    crate::hex::encode(bytes)
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    crate::hex::decode_array(s, crate::hex::Case::Lower)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "epmc1.0123456789abcdef.0123456789abcdef0123456789abcdef0123456789abcdef.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn each_malformed_part_is_named() {
        let bad = |s: &str| TokenParts::parse(s).unwrap_err();
        assert_eq!(bad("epmc2.a.b.c"), TokenFormatError::UnknownFormat);
        assert_eq!(bad(""), TokenFormatError::UnknownFormat);
        assert_eq!(bad("epmc1.a.b"), TokenFormatError::WrongPartCount(3));
        assert_eq!(
            bad(&TOKEN.replace(".0011", ".x.0011")),
            TokenFormatError::WrongPartCount(5)
        );
        assert_eq!(
            bad(&TOKEN.replace("epmc1.0123456789abcdef.", "epmc1.0123456789ABCDEF.")),
            TokenFormatError::BadTokenId
        );
        assert_eq!(
            bad(&TOKEN.replace(".0123456789abcdef0123", ".0123456789abcdef012")),
            TokenFormatError::BadSecret
        );
        assert_eq!(
            bad(&TOKEN.replace("eeff", "eefg")),
            TokenFormatError::BadFingerprint
        );
        assert_eq!(bad("epmc1..."), TokenFormatError::BadTokenId);
        for e in [
            bad(""),
            bad("epmc1.a.b"),
            bad(&TOKEN.replace("eeff", "eefg")),
        ] {
            assert!(!e.to_string().contains("0123456789abcdef0123"), "{e}");
        }
    }

    #[test]
    fn the_debug_form_hides_the_secret() {
        let t = TokenParts::parse(TOKEN).unwrap();
        let d = format!("{t:?}");
        assert!(d.contains("0123456789abcdef"));
        assert!(!d.contains("0123456789abcdef0123456789abcdef0123456789abcdef"));
    }

    proptest! {
        #[test]
        fn tokens_round_trip(id: [u8; ID_LEN], secret: [u8; SECRET_LEN], ca: [u8; CA_SHA256_LEN]) {
            let t = TokenParts { id, secret, ca_sha256: ca };
            prop_assert_eq!(TokenParts::parse(&t.to_token_string()), Ok(t));
        }

        #[test]
        fn parsing_never_panics_and_accepts_only_its_own_form(s in "\\PC{0,200}") {
            if let Ok(t) = TokenParts::parse(&s) {
                prop_assert_eq!(t.to_token_string(), s.trim());
            }
        }
    }
}
