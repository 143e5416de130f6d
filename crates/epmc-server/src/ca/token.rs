//! Enrollment tokens: `epmc1.<token-id>.<secret>.<ca-sha256>`.
//!
//! Like kubeadm's `--discovery-token-ca-cert-hash`, the token carries the SHA-256 of the CA
//! certificate, so an agent pins the server's CA before its first request (no trust on first
//! use). The token id is public (the store looks the token up by it); the secret is random,
//! and the store keeps only its SHA-256 ([`EnrollmentToken::secret_hash`]).

use std::fmt;

use sha2::{Digest, Sha256};

use super::CaFingerprint;
use super::encoding;

use epmc_proto::token::{ID_LEN, SECRET_LEN, TokenParts};
pub use epmc_proto::token::{TOKEN_PREFIX, TokenFormatError};

/// Why a token string was refused, or does not fit the server it names.
/// Messages never repeat the token (it holds a secret).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The text is not an enrollment token (which part is wrong, and how).
    #[error(transparent)]
    Format(#[from] TokenFormatError),
    /// The server presented a CA other than the one the token names.
    #[error(
        "the server's CA certificate (sha256 {actual}) is not the one the enrollment token names (sha256 {expected}); refusing to enroll"
    )]
    CaMismatch {
        /// The fingerprint in the token.
        expected: CaFingerprint,
        /// The fingerprint of the CA the server presented.
        actual: CaFingerprint,
    },
    /// The operating system's random generator failed.
    #[error("the system random generator failed: {0}")]
    Random(getrandom::Error),
}

/// SHA-256 of a token's secret: what the store keeps instead of the secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// From the 32 digest bytes, as stored.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        encoding::encode(&self.0)
    }

    /// Parses 64 lowercase hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        encoding::decode(s)?.try_into().ok().map(Self)
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({})", self.to_hex())
    }
}

/// An enrollment token. `Debug` hides the secret; [`EnrollmentToken::to_token_string`] is the
/// one way to see it (to show it to the admin once).
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    id: [u8; ID_LEN],
    secret: [u8; SECRET_LEN],
    ca: CaFingerprint,
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("id", &self.id())
            .field("secret", &"[secret]")
            .field("ca", &self.ca)
            .finish()
    }
}

impl EnrollmentToken {
    /// A new token for the CA whose fingerprint is `ca`, with a random id and secret.
    pub fn generate(ca: CaFingerprint) -> Result<Self, TokenError> {
        let mut id = [0u8; ID_LEN];
        let mut secret = [0u8; SECRET_LEN];
        getrandom::fill(&mut id).map_err(TokenError::Random)?;
        getrandom::fill(&mut secret).map_err(TokenError::Random)?;
        Ok(Self { id, secret, ca })
    }

    /// Parses `epmc1.<token-id>.<secret>.<ca-sha256>` (lowercase hex parts). Surrounding
    /// whitespace, as pasted from a terminal, is ignored.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let parts = TokenParts::parse(s)?;
        Ok(Self {
            id: parts.id,
            secret: parts.secret,
            ca: CaFingerprint::from_bytes(parts.ca_sha256),
        })
    }

    /// The token as the admin hands it to the agent. It contains the secret.
    pub fn to_token_string(&self) -> String {
        TokenParts {
            id: self.id,
            secret: self.secret,
            ca_sha256: *self.ca.as_bytes(),
        }
        .to_token_string()
    }

    /// The public token id (16 lowercase hex characters), the store's key for this token.
    pub fn id(&self) -> String {
        encoding::encode(&self.id)
    }

    /// The fingerprint of the CA this token is for.
    pub fn ca_fingerprint(&self) -> CaFingerprint {
        self.ca
    }

    /// SHA-256 of the secret, the only form of it the store keeps.
    pub fn secret_hash(&self) -> SecretHash {
        SecretHash(Sha256::digest(self.secret).into())
    }

    /// Whether this token's secret is the one whose hash was stored (constant time).
    pub fn secret_matches(&self, stored: &SecretHash) -> bool {
        constant_time_eq(self.secret_hash().as_bytes(), stored.as_bytes())
    }

    /// Checks that `ca_cert_der`, the CA certificate the server presented, is the one this
    /// token names.
    pub fn verify_ca(&self, ca_cert_der: &[u8]) -> Result<(), TokenError> {
        if self.ca.matches(ca_cert_der) {
            Ok(())
        } else {
            Err(TokenError::CaMismatch {
                expected: self.ca,
                actual: CaFingerprint::of_der(ca_cert_der),
            })
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths, not on where they
/// differ (for secrets and their hashes).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_values() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"bbc"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = EnrollmentToken::generate(CaFingerprint::of_der(b"ca")).expect("random");
        let s = t.to_token_string();
        let secret = s.split('.').nth(2).expect("secret part");
        assert!(!format!("{t:?}").contains(secret));
        assert!(format!("{t:?}").contains(&t.id()));
    }
}
