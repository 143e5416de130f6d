//! The server's private certificate authority.
//!
//! Everything here is pure: values in, values out, no files and no database. The data
//! directory ([`crate::datadir`]) persists the CA and the server certificate; the store keeps
//! the issued serials, the revocations and the enrollment-token hashes.
//!
//! - [`CertificateAuthority`]: creates the CA (ECDSA P-256), the server certificate, agent
//!   certificates from a CSR ([`CertificateAuthority::sign_csr`]) or with a server-generated key
//!   ([`CertificateAuthority::issue_agent_with_key`]), and the CRL
//!   ([`CertificateAuthority::crl`]).
//! - [`EnrollmentToken`]: `epmc1.<token-id>.<secret>.<ca-sha256>`, which lets an agent pin the
//!   CA before its first TLS handshake.
//! - [`mqtt_server_config`]: the rustls configuration of the MQTT/TLS listener (client
//!   certificates from this CA only, CRL checked, ALPN `mqtt`), and [`AgentIdentity`], the
//!   identity a verified client certificate carries.
//!
//! One crypto provider, aws-lc-rs, is used throughout ([`crypto_provider`]).

mod authority;
mod csr;
pub(crate) mod encoding;
mod tls;
mod token;

pub use authority::{
    AGENT_CERT_VALIDITY, AgentBundle, CA_VALIDITY, CaError, CaFingerprint, CertSerial,
    CertificateAuthority, IssuedCertificate, RevokedCert, SERVER_CERT_VALIDITY, ServerCertificate,
};
pub use csr::{CsrError, MAX_CSR_PEM_LEN, verify_csr};
pub use tls::{
    ALPN_MQTT, AgentIdentity, IdentityError, RefusedCertificate, TlsConfigError, crypto_provider,
    install_crypto_provider, mqtt_server_config, noting_refused_certificate,
};
pub use token::{
    EnrollmentToken, SecretHash, TOKEN_PREFIX, TokenError, TokenFormatError, constant_time_eq,
};
