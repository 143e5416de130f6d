//! The CA itself: key, certificate, issuance and revocation list.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::csr::{self, CsrError};
use super::encoding;

/// Lifetime of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::days(20 * 365);
/// Lifetime of the server's TLS certificate.
pub const SERVER_CERT_VALIDITY: Duration = Duration::days(825);
/// Lifetime of an agent certificate; an agent renews before it ends.
pub const AGENT_CERT_VALIDITY: Duration = Duration::days(365);
/// How far before "now" a certificate's validity starts, for peers whose clock is behind.
const CLOCK_SKEW: Duration = Duration::minutes(5);
/// How long a CRL is announced to be current (`nextUpdate`).
const CRL_VALIDITY: Duration = Duration::days(7);
/// Random bytes in a serial number (RFC 5280 allows up to 20 octets).
const SERIAL_LEN: usize = 16;

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The operating system's random generator failed.
    #[error("the system random generator failed: {0}")]
    Random(getrandom::Error),
    /// A server host name is neither an IP address nor a valid DNS name.
    #[error("{0:?} is neither an IP address nor a valid DNS name")]
    InvalidHostname(String),
    /// The CA certificate could not be read or is not a CA certificate.
    #[error("the CA certificate is not usable: {0}")]
    InvalidCaCertificate(String),
    /// The CA key could not be read.
    #[error("the CA key is not usable: {0}")]
    InvalidKey(String),
    /// The CA key is not the key of the CA certificate.
    #[error("the CA key does not match the CA certificate's public key")]
    KeyMismatch,
    /// A serial number's text is not 1 to 20 bytes of lowercase hex.
    #[error("{0:?} is not a serial number (1 to 20 bytes of lowercase hex)")]
    InvalidSerial(String),
    /// A name for a server replica's broker certificate is empty, too long, not made of
    /// letters, digits, `.`, `_` and `-`, or a UUID (the CN of agents).
    #[error("{0:?} is not a service name (1 to 64 letters, digits, '.', '_' or '-', not a UUID)")]
    InvalidServiceName(String),
    /// A certificate the CA just issued did not carry the request's public key.
    #[error("the issued certificate does not carry the request's public key")]
    IssuedKeyMismatch,
}

/// SHA-256 of the CA certificate (DER): what an enrollment token carries and an agent pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint([u8; 32]);

impl CaFingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// From the 32 digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        encoding::encode(&self.0)
    }

    /// Parses 64 lowercase hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        encoding::decode(s)?.try_into().ok().map(Self)
    }

    /// Whether `der` is the certificate this fingerprint names (constant time).
    pub fn matches(&self, der: &[u8]) -> bool {
        super::constant_time_eq(&self.0, Self::of_der(der).as_bytes())
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaFingerprint({})", self.to_hex())
    }
}

/// A certificate serial number, as positive big-endian bytes without leading zeros.
/// Its text form (for the store and for logs) is lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertSerial(Vec<u8>);

impl CertSerial {
    /// A fresh random serial: 16 bytes, positive, first byte non-zero so its length is fixed.
    pub fn random() -> Result<Self, CaError> {
        let mut bytes = [0u8; SERIAL_LEN];
        getrandom::fill(&mut bytes).map_err(CaError::Random)?;
        bytes[0] = (bytes[0] & 0x7f) | 0x40;
        Ok(Self(bytes.to_vec()))
    }

    /// From a DER INTEGER's content bytes (as x509-parser's `raw_serial` gives them); leading
    /// zero bytes are dropped so that equal numbers compare equal.
    pub fn from_der_bytes(bytes: &[u8]) -> Self {
        let start = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        Self(bytes[start..].to_vec())
    }

    /// The big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        encoding::encode(&self.0)
    }
}

impl FromStr for CertSerial {
    type Err = CaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match encoding::decode(s) {
            Some(bytes) if !bytes.is_empty() && bytes.len() <= 20 => {
                Ok(Self::from_der_bytes(&bytes))
            }
            _ => Err(CaError::InvalidSerial(s.to_owned())),
        }
    }
}

impl fmt::Display for CertSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CertSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertSerial({})", self.to_hex())
    }
}

/// A certificate the CA issued to an agent: what the store records and the agent receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The agent id, the certificate's only CN.
    pub agent_id: Uuid,
    /// The random serial number.
    pub serial: CertSerial,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// The certificate, PEM.
    pub pem: String,
}

/// An agent certificate with its server-generated key (`epmc-server agent issue --out DIR`).
#[derive(Clone)]
pub struct AgentBundle {
    /// The certificate.
    pub certificate: IssuedCertificate,
    /// The agent's private key, PKCS#8 PEM. Secret.
    pub key_pem: String,
    /// The CA certificate, PEM, for the agent to pin.
    pub ca_pem: String,
}

impl fmt::Debug for AgentBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBundle")
            .field("certificate", &self.certificate)
            .field("key_pem", &"[secret]")
            .finish_non_exhaustive()
    }
}

/// The server's TLS certificate and key.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM. Secret.
    pub key_pem: String,
}

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[secret]")
            .finish()
    }
}

/// A revoked certificate, as the store lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedCert {
    /// Its serial number.
    pub serial: CertSerial,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
}

/// The private CA: an ECDSA P-256 key and its self-signed certificate.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    fingerprint: CaFingerprint,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn new_p256_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl CertificateAuthority {
    /// Creates a CA: a new P-256 key and a self-signed certificate valid for [`CA_VALIDITY`],
    /// basic constraints CA (path length 0: it signs end-entity certificates only), key usage
    /// keyCertSign and cRLSign.
    pub fn generate(common_name_text: &str, now: OffsetDateTime) -> Result<Self, CaError> {
        let key = new_p256_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(common_name_text);
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(SerialNumber::from_slice(CertSerial::random()?.as_bytes()));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(Self {
            fingerprint: CaFingerprint::of_der(&cert_der),
            issuer: Issuer::new(params, key),
            cert_der,
        })
    }

    /// Loads a CA from its certificate and key (PEM). Refuses a certificate that is not a
    /// self-signed CA certificate and a key that is not the certificate's key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::InvalidCaCertificate(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::InvalidKey(e.to_string()))?;
        {
            let (_, cert) = X509Certificate::from_der(&cert_der)
                .map_err(|e| CaError::InvalidCaCertificate(e.to_string()))?;
            if !cert.is_ca() {
                return Err(CaError::InvalidCaCertificate(
                    "basic constraints do not mark it as a CA".into(),
                ));
            }
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(CaError::KeyMismatch);
            }
            cert.verify_signature(None).map_err(|e| {
                CaError::InvalidCaCertificate(format!("its self-signature does not verify ({e})"))
            })?;
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            fingerprint: CaFingerprint::of_der(&cert_der),
            issuer,
            cert_der,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        encoding::pem("CERTIFICATE", &self.cert_der)
    }

    /// The CA private key, PKCS#8 PEM. Secret: write it with mode 0600.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// SHA-256 of the CA key's public key (SubjectPublicKeyInfo DER), hex: recorded at
    /// initialisation so a replaced key is noticed even if the certificate was replaced too.
    pub fn key_sha256_hex(&self) -> String {
        encoding::encode(&Sha256::digest(self.issuer.key().subject_public_key_info()))
    }

    /// SHA-256 of the CA certificate (DER).
    pub fn fingerprint(&self) -> CaFingerprint {
        self.fingerprint
    }

    /// Issues the server's TLS certificate (serverAuth) with a new P-256 key, for `hostnames`
    /// (DNS names or IP addresses) plus `localhost` and `127.0.0.1`, which are always included.
    pub fn issue_server_cert(
        &self,
        hostnames: &[String],
        now: OffsetDateTime,
    ) -> Result<ServerCertificate, CaError> {
        let mut sans: Vec<SanType> = Vec::new();
        let always = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        for name in always.iter().chain(hostnames) {
            let san = if let Ok(ip) = name.parse::<IpAddr>() {
                SanType::IpAddress(ip)
            } else {
                let lower = name.to_ascii_lowercase();
                if rustls_pki_types::DnsName::try_from(lower.as_str()).is_err() {
                    return Err(CaError::InvalidHostname(name.clone()));
                }
                SanType::DnsName(
                    lower
                        .try_into()
                        .map_err(|_| CaError::InvalidHostname(name.clone()))?,
                )
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let key = new_p256_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name("epmc-server");
        params.subject_alt_names = sans;
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + SERVER_CERT_VALIDITY;
        params.serial_number = Some(SerialNumber::from_slice(CertSerial::random()?.as_bytes()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a client certificate (clientAuth) with a new P-256 key for a server replica
    /// that connects to an external MQTT broker (`serve --broker`): CN `name`, valid for
    /// `validity` from `now`. The broker's ACL grants the server's rights to that CN, so the
    /// name may never be a UUID, the form of every agent's CN.
    pub fn issue_service_client(
        &self,
        name: &str,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<ServerCertificate, CaError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && Uuid::try_parse(name).is_err();
        if !valid {
            return Err(CaError::InvalidServiceName(name.to_owned()));
        }
        let key = new_p256_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + validity;
        params.serial_number = Some(SerialNumber::from_slice(CertSerial::random()?.as_bytes()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues an agent certificate for the public key of a PEM CSR.
    ///
    /// The request's self-signature is checked; its key must be ECDSA P-256/P-384 or Ed25519.
    /// Nothing else from the request is used: the certificate's only subject attribute is
    /// `CN=<agent_id>` (chosen by the server), its serial is random, its extended key usage is
    /// clientAuth only and it is valid for [`AGENT_CERT_VALIDITY`] from `now`.
    ///
    /// `agent_id` is the server's choice: `Uuid::new_v4()` at enrollment, or for a renewal the
    /// id in the [`super::AgentIdentity`] of the authenticated connection; never a value the
    /// agent sent.
    pub fn sign_csr(
        &self,
        pem: &[u8],
        agent_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CsrError> {
        let key = csr::verified_public_key(pem)?;
        let issued = self.issue_agent(&key, agent_id, now)?;
        // Belt and braces: the certificate must carry exactly the key that signed the request.
        let (_, cert) = X509Certificate::from_der(&issued.der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if cert.public_key().raw != key.spki_der.as_slice() {
            return Err(CsrError::Issue(CaError::IssuedKeyMismatch));
        }
        Ok(issued)
    }

    /// Issues an agent certificate with a key generated here (P-256), for an agent installed
    /// from files rather than enrolled with a token.
    pub fn issue_agent_with_key(
        &self,
        agent_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<AgentBundle, CaError> {
        let key = new_p256_key()?;
        let certificate = self.issue_agent(&key, agent_id, now)?;
        Ok(AgentBundle {
            certificate,
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem(),
        })
    }

    fn issue_agent(
        &self,
        public_key: &impl PublicKeyData,
        agent_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        let serial = CertSerial::random()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&agent_id.hyphenated().to_string());
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + AGENT_CERT_VALIDITY;
        params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedCertificate {
            agent_id,
            serial,
            not_before: params.not_before,
            not_after: params.not_after,
            pem: cert.pem(),
            der: cert.der().clone(),
        })
    }

    /// A CRL listing `revoked`, signed by the CA, current from `now` for seven days. Its CRL
    /// number is `now` in Unix seconds, so later lists have larger numbers.
    pub fn crl(
        &self,
        revoked: &[RevokedCert],
        now: OffsetDateTime,
    ) -> Result<CertificateRevocationListDer<'static>, CaError> {
        let number = u64::try_from(now.unix_timestamp()).unwrap_or(0);
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_VALIDITY,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(r.serial.as_bytes()),
                    revocation_time: r.revoked_at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().clone())
    }
}

/// Reads a PEM private key for rustls.
pub(crate) fn private_key_der(key_pem: &str) -> Result<PrivateKeyDer<'static>, CaError> {
    PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CaError::InvalidKey(e.to_string()))
}

impl ServerCertificate {
    /// The certificate chain and key for rustls.
    pub fn to_der(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| CaError::InvalidCaCertificate(e.to_string()))?;
        Ok((vec![cert], private_key_der(&self.key_pem)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_normalises_leading_zeros_and_round_trips_as_hex() {
        let s = CertSerial::from_der_bytes(&[0, 0, 0x81, 0x02]);
        assert_eq!(s.as_bytes(), &[0x81, 0x02]);
        assert_eq!(s.to_hex(), "8102");
        assert_eq!("008102".parse::<CertSerial>().ok(), Some(s));
        assert!("".parse::<CertSerial>().is_err());
        assert!("XYZ".parse::<CertSerial>().is_err());
        assert_eq!(CertSerial::from_der_bytes(&[0]).as_bytes(), &[0]);
    }

    #[test]
    fn random_serials_are_positive_fixed_length_and_distinct() {
        let a = CertSerial::random().expect("random");
        let b = CertSerial::random().expect("random");
        assert_ne!(a, b);
        for s in [a, b] {
            assert_eq!(s.as_bytes().len(), SERIAL_LEN);
            assert_eq!(s.as_bytes()[0] & 0xc0, 0x40);
        }
    }

    #[test]
    fn fingerprint_hex_round_trip() {
        let f = CaFingerprint::of_der(b"not a certificate");
        assert_eq!(CaFingerprint::from_hex(&f.to_hex()), Some(f));
        assert_eq!(f.to_hex().len(), 64);
        assert!(f.matches(b"not a certificate"));
        assert!(!f.matches(b"another"));
        assert_eq!(CaFingerprint::from_hex("abcd"), None);
    }
}
