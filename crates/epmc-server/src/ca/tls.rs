//! The MQTT/TLS listener's rustls configuration, and the identity a client certificate gives.

use std::cell::RefCell;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use uuid::Uuid;
use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

use super::CertSerial;

/// The ALPN protocol name of MQTT over TLS.
pub const ALPN_MQTT: &[u8] = b"mqtt";

/// The workspace's one crypto provider, aws-lc-rs. Every configuration built here names it
/// explicitly, so nothing depends on a process-wide default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide default provider, for code (axum-server, reqwest)
/// that uses the default. Call once at start-up; returns `false` when a default was already
/// installed (a second call, or a test process).
pub fn install_crypto_provider() -> bool {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_ok()
}

/// The provider of the MQTT listener: aws-lc-rs with the SHA-384 suites after the SHA-256
/// ones. The certificates are ECDSA P-256 (128-bit security), which AES-256/SHA-384 does not
/// raise, and SHA-384 is the costlier hash in every handshake's key schedule (clients such as
/// the agent list AES-256-GCM-SHA384 first).
fn listener_provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // A stable sort: otherwise the provider's order.
    provider.cipher_suites.sort_by_key(|s| {
        matches!(
            s.suite(),
            S::TLS13_AES_256_GCM_SHA384
                | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
    Arc::new(provider)
}

/// Why the listener's TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// rustls refused the CA certificate, the server certificate or the key.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier refused the CA certificate or the CRL.
    #[error("client certificate verifier refused its inputs: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// The CRL cannot be parsed, is not the CA's, or its signature does not verify.
    #[error("the certificate revocation list is not usable: {0}")]
    Crl(String),
}

/// The listener's client-certificate verifier: webpki verifies the chain up to the agents'
/// CA (signatures, validity, key usage), then the leaf's serial is looked up in the revoked
/// serials read from the CRL when the configuration was built, after checking the CRL's
/// issuer and signature once. rustls-webpki, given the CRL, verifies the CRL's signature
/// again on every handshake: one of the three ECDSA verifications a handshake cost.
#[derive(Debug)]
struct RevokedSerialsVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    /// Serial numbers as their DER content bytes, as a certificate carries them.
    revoked: HashSet<Vec<u8>>,
}

impl RevokedSerialsVerifier {
    fn new(
        chain: Arc<dyn ClientCertVerifier>,
        ca_cert: &CertificateDer<'_>,
        crl: &CertificateRevocationListDer<'_>,
    ) -> Result<RevokedSerialsVerifier, TlsConfigError> {
        let bad = |what: String| TlsConfigError::Crl(what);
        let (_, ca) = X509Certificate::from_der(ca_cert.as_ref())
            .map_err(|e| bad(format!("the CA certificate: {e}")))?;
        let (rest, list) = CertificateRevocationList::from_der(crl.as_ref())
            .map_err(|e| bad(format!("cannot be parsed: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after it".into()));
        }
        if list.issuer() != ca.subject() {
            return Err(bad(format!("issued by {}, not by the CA", list.issuer())));
        }
        list.verify_signature(ca.public_key())
            .map_err(|e| bad(format!("its signature does not verify: {e}")))?;
        let revoked = list
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        Ok(RevokedSerialsVerifier { chain, revoked })
    }
}

/// What the listener's verifier read from a client certificate it refused, for the security
/// event the refusal becomes. The TLS error says only why; this says whose.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusedCertificate {
    /// The subject's common name as the certificate states it: unverified unless `issued`
    /// (anyone can write any name in a certificate of their own), at most 64 characters.
    pub subject: Option<String>,
    /// The serial number, hexadecimal.
    pub serial: String,
    /// Whether the chain verified up to the CA, i.e. the certificate is the CA's and was
    /// refused for its revocation: then `subject` names the agent.
    pub issued: bool,
}

/// The longest subject name kept from a refused certificate.
const REFUSED_SUBJECT_MAX: usize = 64;

impl RefusedCertificate {
    fn read(cert: &X509Certificate<'_>, issued: bool) -> RefusedCertificate {
        let subject = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(|cn| cn.chars().take(REFUSED_SUBJECT_MAX).collect());
        RefusedCertificate {
            subject,
            serial: CertSerial::from_der_bytes(cert.raw_serial()).to_hex(),
            issued,
        }
    }
}

thread_local! {
    /// The certificate the verifier refused during the current poll of a handshake on this
    /// thread (see [`noting_refused_certificate`]).
    static REFUSED: RefCell<Option<RefusedCertificate>> = const { RefCell::new(None) };
}

fn note_refused(certificate: RefusedCertificate) {
    REFUSED.with(|r| *r.borrow_mut() = Some(certificate));
}

fn take_refused() -> Option<RefusedCertificate> {
    REFUSED.with(|r| r.borrow_mut().take())
}

/// Runs `handshake` (a TLS accept on a configuration from [`mqtt_server_config`]) and returns,
/// with its output, the certificate its verifier refused, if any. rustls calls the verifier
/// inside a poll of the handshake, on the polling thread; the note is cleared before and taken
/// after each poll, so a note can only come from this handshake.
pub async fn noting_refused_certificate<F: Future>(
    handshake: F,
) -> (F::Output, Option<RefusedCertificate>) {
    let mut handshake = std::pin::pin!(handshake);
    let mut refused = None;
    let output = std::future::poll_fn(|cx| {
        take_refused();
        let poll = handshake.as_mut().poll(cx);
        if let Some(note) = take_refused() {
            refused = Some(note);
        }
        poll
    })
    .await;
    (output, refused)
}

impl ClientCertVerifier for RevokedSerialsVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = match self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(verified) => verified,
            Err(e) => {
                // Only on refusal: what the certificate claims, for the security event.
                if let Ok((_, cert)) = X509Certificate::from_der(end_entity.as_ref()) {
                    note_refused(RefusedCertificate::read(&cert, false));
                }
                return Err(e);
            }
        };
        let (_, leaf) = X509Certificate::from_der(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.revoked.contains(leaf.raw_serial()) {
            note_refused(RefusedCertificate::read(&leaf, true));
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The rustls configuration of the MQTT/TLS listener.
///
/// Clients must present a certificate issued by `ca_cert` that `crl` does not revoke (the
/// CRL is always checked: pass the CA's current one, even if it lists nothing). The CRL must
/// be `ca_cert`'s and its signature is verified here, once ([`TlsConfigError::Crl`]
/// otherwise); each handshake then looks the client's serial up in it. TLS 1.3 and
/// 1.2, ALPN `mqtt`, the server's `cert_chain` and `key`, no session resumption. When a
/// revocation is added, build a new configuration with the new CRL for the next handshakes.
pub fn mqtt_server_config(
    ca_cert: &CertificateDer<'static>,
    crl: CertificateRevocationListDer<'static>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = listener_provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.clone())?;
    let chain =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = Arc::new(RevokedSerialsVerifier::new(chain, ca_cert, &crl)?);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    config.alpn_protocols = vec![ALPN_MQTT.to_vec()];
    // The listener's suite order, not the client's (see `listener_provider`).
    config.ignore_client_order = true;
    // No session resumption: every connection is a full handshake, so every client
    // certificate is checked against the CRL of the configuration in force. The defaults sent
    // two TLS 1.3 tickets after each handshake (work and bytes per connection) into a cache of
    // 256 sessions, which thousands of agents evict before they reconnect.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// Why a peer has no agent identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The peer presented no certificate.
    #[error("the peer presented no client certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("the client certificate cannot be parsed: {0}")]
    Malformed(String),
    /// The subject has no common name, or more than one.
    #[error("the client certificate's subject has {0} common names; an agent certificate has one")]
    CommonNameCount(usize),
    /// The common name is not an agent id.
    #[error("the client certificate's common name {0:?} is not an agent id (a hyphenated UUID)")]
    NotAnAgentId(String),
}

/// Who an agent is, taken from its verified TLS client certificate: the CN is its agent id,
/// and the serial lets the connection be closed when that certificate is revoked. The MQTT
/// listener and the HTTPS routes both carry this type with the connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    agent_id: Uuid,
    serial: CertSerial,
}

impl AgentIdentity {
    /// The identity of a connection's peer. Call it after the handshake, on a connection whose
    /// configuration verified the client certificate ([`mqtt_server_config`]); this function
    /// only reads the certificate.
    pub fn from_connection(conn: &CommonState) -> Result<Self, IdentityError> {
        Self::from_peer_certificates(conn.peer_certificates())
    }

    /// The identity in a verified peer chain (end-entity certificate first).
    pub fn from_peer_certificates(
        chain: Option<&[CertificateDer<'_>]>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain
            .and_then(<[CertificateDer<'_>]>::first)
            .ok_or(IdentityError::NoCertificate)?;
        Self::from_certificate(leaf)
    }

    /// The identity in one certificate (DER).
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let cns: Vec<_> = cert.subject().iter_common_name().collect();
        let [cn] = cns.as_slice() else {
            return Err(IdentityError::CommonNameCount(cns.len()));
        };
        let cn = cn
            .as_str()
            .map_err(|e| IdentityError::Malformed(format!("common name: {e}")))?;
        let agent_id = Uuid::parse_str(cn)
            .ok()
            .filter(|id| id.hyphenated().to_string() == cn)
            .ok_or_else(|| IdentityError::NotAnAgentId(cn.to_owned()))?;
        Ok(Self {
            agent_id,
            serial: CertSerial::from_der_bytes(cert.raw_serial()),
        })
    }

    /// The agent id (the certificate's CN).
    pub fn agent_id(&self) -> Uuid {
        self.agent_id
    }

    /// The certificate's serial number.
    pub fn serial(&self) -> &CertSerial {
        &self.serial
    }
}
