//! Certificate signing requests: parse, check the self-signature, keep only the public key.
//!
//! Nothing else in the request is trusted: its subject, its requested extensions and its
//! attributes are ignored, and the certificate is built from the server's own parameters.

use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SignatureAlgorithm};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use super::CaError;

/// The largest CSR, in bytes of PEM, that [`super::CertificateAuthority::sign_csr`] reads.
/// A P-256 request is about 400 bytes; this leaves room for attributes without letting a
/// client make the server parse megabytes.
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// Why a certificate signing request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// More than [`MAX_CSR_PEM_LEN`] bytes.
    #[error("the certificate request is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// The length received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No `CERTIFICATE REQUEST` PEM block could be read.
    #[error("the certificate request is not PEM with a CERTIFICATE REQUEST block ({0})")]
    NotPem(String),
    /// The PEM block does not hold a PKCS#10 request.
    #[error("the certificate request is not a valid PKCS#10 structure ({0})")]
    Malformed(String),
    /// The key type is not one the server issues certificates for.
    #[error(
        "the certificate request's public key is not supported ({0}); use ECDSA P-256, ECDSA P-384 or Ed25519"
    )]
    UnsupportedKey(String),
    /// The request is not signed by the key it carries.
    #[error("the certificate request's signature does not verify with its own public key ({0})")]
    BadSignature(String),
    /// The request was valid but issuing the certificate failed.
    #[error(transparent)]
    Issue(#[from] CaError),
}

/// The public key of a verified CSR, in the form rcgen signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CsrPublicKey {
    /// The request's whole SubjectPublicKeyInfo, as received.
    pub(crate) spki_der: Vec<u8>,
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl rcgen::PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Reads a PEM CSR, checks its size, structure, key type and self-signature, and returns its
/// public key.
pub(crate) fn verified_public_key(pem: &[u8]) -> Result<CsrPublicKey, CsrError> {
    if pem.len() > MAX_CSR_PEM_LEN {
        return Err(CsrError::TooLarge {
            len: pem.len(),
            max: MAX_CSR_PEM_LEN,
        });
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem)
        .map_err(|e| CsrError::NotPem(e.to_string()))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let raw: &[u8] = &spki.subject_public_key.data;
    let key_oid = &spki.algorithm.algorithm;
    let alg: &'static SignatureAlgorithm = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC key without a named curve".into()))?;
        // Uncompressed points only (0x04 || X || Y), as TLS peers expect.
        if curve == OID_EC_P256 && raw.len() == 65 && raw[0] == 4 {
            &PKCS_ECDSA_P256_SHA256
        } else if curve == OID_NIST_EC_P384 && raw.len() == 97 && raw[0] == 4 {
            &PKCS_ECDSA_P384_SHA384
        } else {
            return Err(CsrError::UnsupportedKey(format!(
                "EC curve {curve} with a {}-byte point",
                raw.len()
            )));
        }
    } else if *key_oid == OID_SIG_ED25519 {
        if spki.algorithm.parameters.is_some() || raw.len() != 32 {
            return Err(CsrError::UnsupportedKey(
                "Ed25519 key with parameters or of the wrong length".into(),
            ));
        }
        &PKCS_ED25519
    } else {
        return Err(CsrError::UnsupportedKey(format!("key algorithm {key_oid}")));
    };
    csr.verify_signature()
        .map_err(|e| CsrError::BadSignature(e.to_string()))?;
    Ok(CsrPublicKey {
        spki_der: spki.raw.to_vec(),
        raw: raw.to_vec(),
        alg,
    })
}

/// Checks a PEM certificate request (size, PEM, PKCS#10, a supported key, a valid
/// self-signature) without issuing anything, so a bad request costs no enrollment token.
pub fn verify_csr(pem: &[u8]) -> Result<(), CsrError> {
    verified_public_key(pem).map(|_| ())
}
