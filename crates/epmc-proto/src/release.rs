//! The agent self-update contract: a release manifest signed with an offline ed25519 key, and
//! the HTTPS routes that serve it.
//!
//! The release manager signs the exact bytes of a [`ReleaseManifest`] (`epmc-server release
//! sign`); the server only stores and serves the manifest, its detached signature and the
//! binary, and never holds the private key. The agent fetches a [`SignedManifest`] from
//! [`MANIFEST_PATH`]`?target=TRIPLE`, verifies the signature over
//! [`SignedManifest::manifest`]'s bytes with the public key it is configured with
//! ([`ReleasePublicKey`]) before it parses the manifest, then downloads
//! [`binary_path`] with a size cap of [`ReleaseManifest::size`] and checks its SHA-256.
//!
//! ```json
//! {"version":"1.2.0","target":"x86_64-unknown-linux-gnu","size":7340032,
//!  "sha256":"…64 hex digits…","file":"epmc-agent"}
//! ```
//!
//! This module has no cryptography: it defines the formats both sides share.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The route that serves the newest [`SignedManifest`] for `?target=TRIPLE`.
pub const MANIFEST_PATH: &str = "/api/v1/update/manifest";
/// The prefix of [`binary_path`].
pub const BINARY_PATH_PREFIX: &str = "/api/v1/update/binary/";
/// Largest manifest text accepted or produced, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024;
/// Largest [`SignedManifest`] JSON document accepted, in bytes.
pub const MAX_SIGNED_MANIFEST_BYTES: usize = 16 * 1024;
/// Largest release binary a manifest may announce (1 GiB).
pub const MAX_RELEASE_SIZE: u64 = 1 << 30;
/// Longest target triple.
pub const MAX_TARGET_LEN: usize = 64;
/// Longest file name.
pub const MAX_FILE_NAME_LEN: usize = 128;

/// `/api/v1/update/binary/{version}/{target}`: where the binary of a release is served.
pub fn binary_path(version: &ReleaseVersion, target: &TargetTriple) -> String {
    format!("{BINARY_PATH_PREFIX}{version}/{target}")
}

/// What is wrong with a release value or document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// Not a `MAJOR.MINOR.PATCH` version.
    #[error("version {0:?}: expected MAJOR.MINOR.PATCH (decimal numbers, no leading zeros)")]
    Version(String),
    /// Not an acceptable target triple.
    #[error(
        "target {0:?}: expected a target triple such as x86_64-unknown-linux-gnu (1 to {MAX_TARGET_LEN} of A-Z a-z 0-9 _ . -, not starting with '.' or '-')"
    )]
    Target(String),
    /// Not an acceptable file name.
    #[error(
        "file name {0:?}: 1 to {MAX_FILE_NAME_LEN} of A-Z a-z 0-9 _ . + -, not starting with '.' or '-'"
    )]
    FileName(String),
    /// Not a SHA-256 digest in hex.
    #[error("sha256 {0:?}: expected 64 hex digits")]
    Digest(String),
    /// The size is zero or too large.
    #[error("size {0}: a release binary has 1 to {MAX_RELEASE_SIZE} bytes")]
    Size(u64),
    /// Not an `ed25519:` public key.
    #[error("public key {0:?}: expected ed25519: followed by 64 hex digits")]
    PublicKey(String),
    /// Not a signature in hex.
    #[error("signature: expected 128 hex digits (an ed25519 signature)")]
    Signature,
    /// The manifest document is larger than [`MAX_MANIFEST_BYTES`] or
    /// [`MAX_SIGNED_MANIFEST_BYTES`].
    #[error("{what} has {size} bytes, at most {max} are accepted")]
    TooLarge {
        /// Which document.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The document is not the expected JSON.
    #[error("{what}: {detail}")]
    Json {
        /// Which document.
        what: &'static str,
        /// What the JSON parser said.
        detail: String,
    },
}

/// A release version `MAJOR.MINOR.PATCH`, ordered numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReleaseVersion {
    major: u64,
    minor: u64,
    patch: u64,
}

impl ReleaseVersion {
    /// A version from its three numbers.
    pub const fn new(major: u64, minor: u64, patch: u64) -> ReleaseVersion {
        ReleaseVersion {
            major,
            minor,
            patch,
        }
    }

    /// The three numbers.
    pub fn parts(&self) -> (u64, u64, u64) {
        (self.major, self.minor, self.patch)
    }
}

impl FromStr for ReleaseVersion {
    type Err = ReleaseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ReleaseError::Version(s.chars().take(64).collect());
        let mut parts = s.split('.');
        let mut next = || -> Result<u64, ReleaseError> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty()
                || p.len() > 19
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let v = ReleaseVersion::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl fmt::Display for ReleaseVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl TryFrom<String> for ReleaseVersion {
    type Error = ReleaseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ReleaseVersion> for String {
    fn from(v: ReleaseVersion) -> String {
        v.to_string()
    }
}

impl Serialize for ReleaseVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReleaseVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn name_ok(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with(['.', '-'])
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-' || extra.contains(&b)
        })
}

macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $max:expr, $extra:expr, $err:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates a value.
            pub fn new(s: impl Into<String>) -> Result<Self, ReleaseError> {
                let s = s.into();
                if name_ok(&s, $max, $extra) {
                    Ok($name(s))
                } else {
                    Err(ReleaseError::$err(s.chars().take(2 * $max).collect()))
                }
            }

            /// The value.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ReleaseError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl FromStr for $name {
            type Err = ReleaseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_name!(
    /// A target triple (`x86_64-unknown-linux-gnu`): safe as one path segment and one URL
    /// path segment.
    TargetTriple,
    MAX_TARGET_LEN,
    b"",
    Target
);

checked_name!(
    /// The release binary's file name: safe as one path segment.
    FileName,
    MAX_FILE_NAME_LEN,
    b"+",
    FileName
);

/// Decodes exactly `N` bytes of hex (either case).
fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    crate::hex::decode_array(s, crate::hex::Case::Any)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// A SHA-256 digest, written as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// Wraps a digest.
    pub const fn new(bytes: [u8; 32]) -> Sha256Digest {
        Sha256Digest(bytes)
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Sha256Digest {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_hex::<32>(s)
            .map(Sha256Digest)
            .ok_or_else(|| ReleaseError::Digest(s.chars().take(80).collect()))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The release public key as an agent's configuration takes it: `ed25519:` and the 32-byte
/// key in hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReleasePublicKey([u8; 32]);

impl ReleasePublicKey {
    /// The prefix of the written form.
    pub const PREFIX: &'static str = "ed25519:";

    /// Wraps a raw ed25519 public key.
    pub const fn new(bytes: [u8; 32]) -> ReleasePublicKey {
        ReleasePublicKey(bytes)
    }

    /// The raw key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for ReleasePublicKey {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .strip_prefix(Self::PREFIX)
            .and_then(decode_hex::<32>)
            .map(ReleasePublicKey)
            .ok_or_else(|| ReleaseError::PublicKey(s.chars().take(80).collect()))
    }
}

impl fmt::Display for ReleasePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::PREFIX)?;
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for ReleasePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleasePublicKey({self})")
    }
}

/// A detached ed25519 signature, written as 128 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReleaseSignature([u8; 64]);

impl ReleaseSignature {
    /// Wraps a raw signature.
    pub const fn new(bytes: [u8; 64]) -> ReleaseSignature {
        ReleaseSignature(bytes)
    }

    /// The raw signature.
    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl FromStr for ReleaseSignature {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_hex::<64>(s.trim())
            .map(ReleaseSignature)
            .ok_or(ReleaseError::Signature)
    }
}

impl fmt::Display for ReleaseSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for ReleaseSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseSignature({self})")
    }
}

/// What a release is: version, target, size and SHA-256 of the binary, and its file name.
/// Every field is validated; [`ReleaseManifest::to_bytes`] is what gets signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawManifest")]
pub struct ReleaseManifest {
    version: ReleaseVersion,
    target: TargetTriple,
    size: u64,
    sha256: Sha256Digest,
    file: FileName,
}

/// The manifest as read, before [`ReleaseManifest::new`] checks the size.
#[derive(Deserialize)]
struct RawManifest {
    version: ReleaseVersion,
    target: TargetTriple,
    size: u64,
    sha256: Sha256Digest,
    file: FileName,
}

impl TryFrom<RawManifest> for ReleaseManifest {
    type Error = ReleaseError;
    fn try_from(m: RawManifest) -> Result<Self, Self::Error> {
        ReleaseManifest::new(m.version, m.target, m.size, m.sha256, m.file)
    }
}

impl ReleaseManifest {
    /// A manifest; the size must be 1 to [`MAX_RELEASE_SIZE`].
    pub fn new(
        version: ReleaseVersion,
        target: TargetTriple,
        size: u64,
        sha256: Sha256Digest,
        file: FileName,
    ) -> Result<ReleaseManifest, ReleaseError> {
        if size == 0 || size > MAX_RELEASE_SIZE {
            return Err(ReleaseError::Size(size));
        }
        Ok(ReleaseManifest {
            version,
            target,
            size,
            sha256,
            file,
        })
    }

    /// The release's version.
    pub fn version(&self) -> ReleaseVersion {
        self.version
    }

    /// The platform the binary is built for.
    pub fn target(&self) -> &TargetTriple {
        &self.target
    }

    /// The binary's exact size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The binary's SHA-256.
    pub fn sha256(&self) -> &Sha256Digest {
        &self.sha256
    }

    /// The binary's file name.
    pub fn file(&self) -> &FileName {
        &self.file
    }

    /// The manifest's bytes (pretty JSON and a newline): what the release key signs.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing these validated fields cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses manifest bytes: at most [`MAX_MANIFEST_BYTES`], every field present and valid.
    /// An agent calls this only after the signature over `bytes` verified.
    pub fn from_bytes(bytes: &[u8]) -> Result<ReleaseManifest, ReleaseError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ReleaseError::TooLarge {
                what: "manifest",
                size: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| ReleaseError::Json {
            what: "manifest",
            detail: e.to_string(),
        })
    }
}

/// What [`MANIFEST_PATH`] answers: the manifest's exact text and the detached signature over
/// its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest text, byte for byte as signed.
    pub manifest: String,
    /// The ed25519 signature over `manifest`'s bytes, 128 hex digits.
    pub signature: String,
}

impl SignedManifest {
    /// Parses the response body (at most [`MAX_SIGNED_MANIFEST_BYTES`]). The manifest inside
    /// is not parsed: verify [`SignedManifest::signature()`] first.
    pub fn from_json(bytes: &[u8]) -> Result<SignedManifest, ReleaseError> {
        if bytes.len() > MAX_SIGNED_MANIFEST_BYTES {
            return Err(ReleaseError::TooLarge {
                what: "signed manifest",
                size: bytes.len(),
                max: MAX_SIGNED_MANIFEST_BYTES,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| ReleaseError::Json {
            what: "signed manifest",
            detail: e.to_string(),
        })
    }

    /// The signature, decoded.
    pub fn signature(&self) -> Result<ReleaseSignature, ReleaseError> {
        self.signature.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_strictly_and_order_numerically() {
        let v = |s: &str| s.parse::<ReleaseVersion>();
        assert_eq!(v("1.2.3"), Ok(ReleaseVersion::new(1, 2, 3)));
        assert_eq!(v("0.10.0").unwrap().to_string(), "0.10.0");
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.02.3",
            "1.2.3-rc1",
            "1.2.+3",
            " 1.2.3",
            "a.b.c",
            "1..3",
            "99999999999999999999.0.0",
        ] {
            assert!(matches!(v(bad), Err(ReleaseError::Version(_))), "{bad:?}");
        }
        assert!(v("0.10.0").unwrap() > v("0.9.9").unwrap());
        assert!(v("1.0.0").unwrap() > v("0.99.99").unwrap());
        assert!(v("1.0.10").unwrap() > v("1.0.9").unwrap());
        assert_eq!(v("2.0.0").unwrap(), v("2.0.0").unwrap());
    }

    #[test]
    fn names_are_single_safe_segments() {
        assert!(TargetTriple::new("x86_64-unknown-linux-gnu").is_ok());
        assert!(TargetTriple::new("aarch64-apple-darwin").is_ok());
        for bad in [
            "",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "a\\b",
            "a b",
            "x%2f",
            &"a".repeat(65),
        ] {
            assert!(TargetTriple::new(bad).is_err(), "{bad:?}");
        }
        assert!(FileName::new("epmc-agent+1.2.3").is_ok());
        assert!(FileName::new("../epmc-agent").is_err());
        assert!(FileName::new("epmc\0agent").is_err());
    }

    #[test]
    fn keys_and_signatures_round_trip() {
        let key = ReleasePublicKey::new([0xab; 32]);
        let text = key.to_string();
        assert_eq!(text, format!("ed25519:{}", "ab".repeat(32)));
        assert_eq!(text.parse::<ReleasePublicKey>(), Ok(key));
        assert_eq!(
            format!("ed25519:{}", "AB".repeat(32)).parse::<ReleasePublicKey>(),
            Ok(key)
        );
        for bad in [
            "ab".repeat(32),
            format!("ed25519:{}", "ab".repeat(31)),
            format!("rsa:{}", "ab".repeat(32)),
            format!("ed25519:{}g", "ab".repeat(31)),
        ] {
            assert!(bad.parse::<ReleasePublicKey>().is_err(), "{bad}");
        }
        let sig = ReleaseSignature::new([7; 64]);
        assert_eq!(sig.to_string().parse::<ReleaseSignature>(), Ok(sig));
        assert!("07".repeat(63).parse::<ReleaseSignature>().is_err());
    }

    fn manifest() -> ReleaseManifest {
        ReleaseManifest::new(
            "1.2.3".parse().unwrap(),
            TargetTriple::new("x86_64-unknown-linux-gnu").unwrap(),
            1234,
            Sha256Digest::new([0x5a; 32]),
            FileName::new("epmc-agent").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn manifest_bytes_round_trip_exactly() {
        let m = manifest();
        let bytes = m.to_bytes();
        assert_eq!(ReleaseManifest::from_bytes(&bytes), Ok(m.clone()));
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"sha256\": \"5a5a"), "{text}");
        // The wire document carries the bytes unchanged.
        let signed = SignedManifest {
            manifest: text,
            signature: ReleaseSignature::new([1; 64]).to_string(),
        };
        let json = serde_json::to_vec(&signed).unwrap();
        let back = SignedManifest::from_json(&json).unwrap();
        assert_eq!(back.manifest.as_bytes(), &bytes[..]);
        assert_eq!(back.signature(), Ok(ReleaseSignature::new([1; 64])));
    }

    #[test]
    fn bad_manifests_are_refused_with_the_field() {
        let good = String::from_utf8(manifest().to_bytes()).unwrap();
        let cases = [
            (good.replace("1234", "0"), "size 0"),
            (good.replace("\"1.2.3\"", "\"1.2\""), "version"),
            (
                good.replace("\"epmc-agent\"", "\"../epmc-agent\""),
                "file name",
            ),
            (good.replace("x86_64-unknown-linux-gnu", "x86/64"), "target"),
            (good.replace("5a5a", "zz5a"), "sha256"),
            (good.replace("\"size\": 1234,", ""), "missing field `size`"),
            ("not json".to_owned(), "manifest"),
            (
                good.replace("\"size\": 1234,", "\"size\": 1234, \"size\": 5,"),
                "duplicate field",
            ),
        ];
        for (text, expect) in cases {
            let e = ReleaseManifest::from_bytes(text.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(expect), "{text}: {e}");
        }
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            ReleaseManifest::from_bytes(&big),
            Err(ReleaseError::TooLarge { .. })
        ));
        assert!(matches!(
            SignedManifest::from_json(br#"{"manifest":"x","signature":"y","extra":1}"#),
            Err(ReleaseError::Json { .. })
        ));
    }
}
