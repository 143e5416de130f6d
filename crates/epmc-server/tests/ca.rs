//! The private CA end to end: real rustls handshakes on 127.0.0.1 with certificates the CA
//! issued, CSR checks, enrollment tokens and the data directory's start-up checks.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use epmc_server::ca::{
    self, AgentIdentity, CaFingerprint, CertificateAuthority, CsrError, EnrollmentToken,
    IssuedCertificate, RevokedCert, TokenError, TokenFormatError,
};
use epmc_server::datadir::{self, InitOutcome, Problem, ServerPki};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ECDSA_P521_SHA512, PKCS_ED25519, PublicKeyData,
    SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use uuid::Uuid;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const BOUND: Duration = Duration::from_secs(10);

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A fresh data directory, initialised and loaded.
fn server_pki() -> (tempfile::TempDir, ServerPki) {
    let dir = tempfile::tempdir().expect("tempdir");
    let outcome = datadir::init(dir.path(), &["epmc.example.test".to_owned()]).expect("init");
    assert!(matches!(outcome, InitOutcome::Created { .. }));
    let pki = datadir::load(dir.path()).expect("load");
    (dir, pki)
}

fn mqtt_config(pki: &ServerPki, revoked: &[RevokedCert]) -> Arc<ServerConfig> {
    let crl = pki.ca.crl(revoked, now()).expect("crl");
    let (chain, key) = pki.server.to_der().expect("server der");
    ca::mqtt_server_config(pki.ca.cert_der(), crl, chain, key).expect("server config")
}

/// A CSR made the way an agent makes one: its own key, a subject the server must ignore.
fn csr_for(alg: &'static SignatureAlgorithm) -> (KeyPair, String) {
    let key = KeyPair::generate_for(alg).expect("key");
    let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, Uuid::new_v4().to_string());
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let csr = params.serialize_request(&key).expect("csr");
    (key, csr.pem().expect("csr pem"))
}

struct ClientCreds {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn creds(cert_pem: &str, key_pem: &str) -> ClientCreds {
    ClientCreds {
        chain: vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert pem")],
        key: PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key pem"),
    }
}

fn client_config(
    ca_der: &CertificateDer<'static>,
    creds: Option<ClientCreds>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone()).expect("root");
    let builder = ClientConfig::builder_with_provider(ca::crypto_provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match creds {
        Some(c) => builder
            .with_client_auth_cert(c.chain, c.key)
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ca::ALPN_MQTT.to_vec()];
    Arc::new(config)
}

/// What the server saw of one connection.
#[derive(Debug)]
struct Accepted {
    identity: Result<AgentIdentity, ca::IdentityError>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
    kind: Option<rustls::HandshakeKind>,
    suite: Option<rustls::CipherSuite>,
}

/// One TLS connection on 127.0.0.1. The server side's result is the verdict (with TLS 1.3
/// the client finishes its handshake before the server has judged its certificate); the
/// client must also read the server's first bytes, which it gets only when accepted.
async fn connect(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
) -> Result<Accepted, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| format!("server refused: {e}"))?;
        let conn = tls.get_ref().1;
        let accepted = Accepted {
            identity: AgentIdentity::from_connection(conn),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
            kind: conn.handshake_kind(),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
        };
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(accepted)
    });
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    let client_result = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client handshake: {e}"))?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        Ok::<_, String>(buf)
    };
    let client_result = tokio::time::timeout(BOUND, client_result)
        .await
        .expect("client bounded");
    let server_result = tokio::time::timeout(BOUND, server_task)
        .await
        .expect("server bounded")
        .expect("server task");
    match (server_result, client_result) {
        (Ok(accepted), Ok(buf)) => {
            assert_eq!(&buf, b"ok");
            Ok(accepted)
        }
        (Ok(_), Err(e)) => panic!("server accepted but the client failed: {e}"),
        (Err(e), Ok(_)) => panic!("server refused ({e}) but the client read data"),
        (Err(e), Err(_)) => Err(e),
    }
}

fn parse_cert(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).expect("x509").1
}

fn cn_of(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject()
        .iter_common_name()
        .map(|cn| cn.as_str().expect("cn").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------
// TLS: who gets in

#[tokio::test]
async fn agent_with_csr_certificate_connects_and_its_identity_is_the_chosen_id() {
    let (_dir, pki) = server_pki();
    let (agent_key, csr_pem) = csr_for(&PKCS_ECDSA_P256_SHA256);
    let agent_id = Uuid::new_v4();
    let issued = pki
        .ca
        .sign_csr(csr_pem.as_bytes(), agent_id, now())
        .expect("sign");
    let client = client_config(
        pki.ca.cert_der(),
        Some(creds(&issued.pem, &agent_key.serialize_pem())),
        &[&rustls::version::TLS13],
    );
    let accepted = connect(mqtt_config(&pki, &[]), client, "localhost")
        .await
        .expect("accepted");
    let identity = accepted.identity.expect("identity");
    assert_eq!(identity.agent_id(), agent_id);
    assert_eq!(identity.serial(), &issued.serial);
    assert_eq!(accepted.alpn.as_deref(), Some(&b"mqtt"[..]));
    assert_eq!(accepted.version, Some(rustls::ProtocolVersion::TLSv1_3));
}

#[tokio::test]
async fn server_generated_key_bundle_connects_over_tls12_by_ip() {
    let (_dir, pki) = server_pki();
    let agent_id = Uuid::new_v4();
    let bundle = pki
        .ca
        .issue_agent_with_key(agent_id, now())
        .expect("bundle");
    assert_eq!(bundle.ca_pem, pki.ca.cert_pem());
    let ca_der = CertificateDer::from_pem_slice(bundle.ca_pem.as_bytes()).expect("ca pem");
    let client = client_config(
        &ca_der,
        Some(creds(&bundle.certificate.pem, &bundle.key_pem)),
        &[&rustls::version::TLS12],
    );
    let accepted = connect(mqtt_config(&pki, &[]), client, "127.0.0.1")
        .await
        .expect("accepted");
    assert_eq!(accepted.identity.expect("identity").agent_id(), agent_id);
    assert_eq!(accepted.version, Some(rustls::ProtocolVersion::TLSv1_2));
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let (_dir, pki) = server_pki();
    let client = client_config(pki.ca.cert_der(), None, &[&rustls::version::TLS13]);
    let err = connect(mqtt_config(&pki, &[]), client, "localhost")
        .await
        .expect_err("must be refused");
    assert!(err.contains("server refused"), "{err}");
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let (_dir, pki) = server_pki();
    let other = CertificateAuthority::generate("EPMC-rs private CA", now()).expect("other ca");
    let agent_id = Uuid::new_v4();
    let bundle = other.issue_agent_with_key(agent_id, now()).expect("bundle");
    // Same CN, same CA name, valid chain to its own CA: only the issuing key differs.
    let client = client_config(
        pki.ca.cert_der(),
        Some(creds(&bundle.certificate.pem, &bundle.key_pem)),
        &[&rustls::version::TLS13],
    );
    let err = connect(mqtt_config(&pki, &[]), client, "localhost")
        .await
        .expect_err("must be refused");
    assert!(err.contains("server refused"), "{err}");
}

#[tokio::test]
async fn revoked_certificate_is_refused_and_others_still_connect() {
    let (_dir, pki) = server_pki();
    let revoked_bundle = pki
        .ca
        .issue_agent_with_key(Uuid::new_v4(), now())
        .expect("bundle");
    let good_bundle = pki
        .ca
        .issue_agent_with_key(Uuid::new_v4(), now())
        .expect("bundle");
    let revoked = [RevokedCert {
        serial: revoked_bundle.certificate.serial.clone(),
        revoked_at: now(),
    }];
    let server = mqtt_config(&pki, &revoked);

    let client = |b: &ca::AgentBundle| {
        client_config(
            pki.ca.cert_der(),
            Some(creds(&b.certificate.pem, &b.key_pem)),
            &[&rustls::version::TLS13],
        )
    };
    let err = connect(server.clone(), client(&revoked_bundle), "localhost")
        .await
        .expect_err("revoked must be refused");
    assert!(err.contains("server refused"), "{err}");
    assert!(err.to_lowercase().contains("revoked"), "{err}");

    let accepted = connect(server, client(&good_bundle), "localhost")
        .await
        .expect("the one not revoked connects");
    assert_eq!(
        accepted.identity.expect("identity").agent_id(),
        good_bundle.certificate.agent_id
    );
}

#[tokio::test]
async fn every_connection_is_a_full_handshake_even_for_a_client_that_would_resume() {
    // A resumed session skips the client certificate's verification, so the listener offers
    // none: each connection is checked against the CRL in force.
    let (_dir, pki) = server_pki();
    let server = mqtt_config(&pki, &[]);
    let bundle = pki
        .ca
        .issue_agent_with_key(Uuid::new_v4(), now())
        .expect("bundle");
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client configuration (resumption on, as by default) for both connections.
        let client = client_config(
            pki.ca.cert_der(),
            Some(creds(&bundle.certificate.pem, &bundle.key_pem)),
            &[version],
        );
        for attempt in 0..2 {
            let accepted = connect(server.clone(), client.clone(), "localhost")
                .await
                .expect("connects");
            assert_eq!(
                accepted.kind,
                Some(rustls::HandshakeKind::Full),
                "{version:?}, connection {attempt}"
            );
        }
    }
}

#[tokio::test]
async fn the_listener_chooses_a_sha256_suite_over_a_client_preferring_aes_256() {
    // The agent's client lists AES-256-GCM-SHA384 first (the provider's order).
    let (_dir, pki) = server_pki();
    let server = mqtt_config(&pki, &[]);
    let bundle = pki
        .ca
        .issue_agent_with_key(Uuid::new_v4(), now())
        .expect("bundle");
    for (version, expected) in [
        (
            &rustls::version::TLS13,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ] {
        let client = client_config(
            pki.ca.cert_der(),
            Some(creds(&bundle.certificate.pem, &bundle.key_pem)),
            &[version],
        );
        let accepted = connect(server.clone(), client, "localhost")
            .await
            .expect("connects");
        assert_eq!(accepted.suite, Some(expected), "{version:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Certificates

#[test]
fn issued_certificates_have_the_servers_parameters_not_the_requests() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let ca_cert = parse_cert(ca.cert_der());
    assert!(ca_cert.is_ca());
    let ku = ca_cert.key_usage().expect("ku").expect("ku present").value;
    assert!(ku.key_cert_sign() && ku.crl_sign());

    let (agent_key, csr_pem) = csr_for(&PKCS_ECDSA_P256_SHA256);
    let agent_id = Uuid::new_v4();
    let t = now();
    let issued: IssuedCertificate = ca.sign_csr(csr_pem.as_bytes(), agent_id, t).expect("sign");
    let cert = parse_cert(&issued.der);
    assert_eq!(cn_of(&cert), vec![agent_id.to_string()]);
    assert_eq!(
        cert.subject().iter().count(),
        1,
        "the subject is the CN alone"
    );
    assert!(
        !cert.is_ca(),
        "the request asked for CA, the server says no"
    );
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("eku present")
        .value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    assert!(cert.subject_alternative_name().expect("san").is_none());
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        agent_key.public_key_raw()
    );
    assert_eq!(
        cert.raw_serial(),
        issued.serial.as_bytes(),
        "the serial reported is the certificate's"
    );
    let lifetime = issued.not_after - t;
    assert!(lifetime <= ca::AGENT_CERT_VALIDITY && lifetime > time::Duration::days(300));
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("signed by the CA");

    // Serials are random.
    let again = ca.sign_csr(csr_pem.as_bytes(), agent_id, t).expect("sign");
    assert_ne!(again.serial, issued.serial);
}

#[test]
fn server_certificate_always_names_localhost_and_loopback() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let server = ca
        .issue_server_cert(
            &["epmc.example.test".to_owned(), "192.0.2.7".to_owned()],
            now(),
        )
        .expect("server cert");
    let der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).expect("pem");
    let cert = parse_cert(&der);
    let names: Vec<String> = cert
        .subject_alternative_name()
        .expect("san")
        .expect("san present")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(s) => (*s).to_owned(),
            GeneralName::IPAddress(b) => match b.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).expect("v4")).to_string(),
                _ => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).expect("v6")).to_string(),
            },
            other => panic!("unexpected SAN {other}"),
        })
        .collect();
    assert_eq!(
        names,
        ["localhost", "127.0.0.1", "epmc.example.test", "192.0.2.7"]
    );
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("eku present")
        .value;
    assert!(eku.server_auth && !eku.client_auth);
    assert!(matches!(
        ca.issue_server_cert(&["not a host name".to_owned()], now()),
        Err(ca::CaError::InvalidHostname(_))
    ));
}

#[test]
fn other_supported_key_types_are_issued_with_their_own_key() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
        let (key, pem) = csr_for(alg);
        let id = Uuid::new_v4();
        let issued = ca.sign_csr(pem.as_bytes(), id, now()).expect("sign");
        let cert = parse_cert(&issued.der);
        assert_eq!(cn_of(&cert), vec![id.to_string()]);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
    }
}

fn tamper_pem(pem: &str, f: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("csr pem")
        .as_ref()
        .to_vec();
    f(&mut der);
    pem_encode("CERTIFICATE REQUEST", &der)
}

#[test]
fn csr_with_tampered_signature_or_content_is_refused() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let (_key, pem) = csr_for(&PKCS_ECDSA_P256_SHA256);
    // The untampered request is accepted (so the refusals below are the tampering's doing).
    ca.sign_csr(pem.as_bytes(), Uuid::new_v4(), now())
        .expect("valid CSR");

    // Flip a bit in the last byte: the signature's S value.
    let bad_sig = tamper_pem(&pem, |der| {
        let last = der.len() - 1;
        der[last] ^= 0x01;
    });
    let err = ca
        .sign_csr(bad_sig.as_bytes(), Uuid::new_v4(), now())
        .expect_err("tampered signature");
    assert!(matches!(err, CsrError::BadSignature(_)), "{err}");

    // Change the signed content (a letter of the SAN "evil.example") and keep the signature.
    let bad_content = tamper_pem(&pem, |der| {
        let at = der
            .windows(4)
            .position(|w| w == b"evil")
            .expect("SAN in request");
        der[at] = b'f';
    });
    let err = ca
        .sign_csr(bad_content.as_bytes(), Uuid::new_v4(), now())
        .expect_err("tampered content");
    assert!(matches!(err, CsrError::BadSignature(_)), "{err}");
}

#[test]
fn csr_that_is_not_pem_garbage_or_unsupported_is_a_clear_error() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let id = Uuid::new_v4();
    let (_key, pem) = csr_for(&PKCS_ECDSA_P256_SHA256);
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .as_ref()
        .to_vec();

    let err = ca.sign_csr(&der, id, now()).expect_err("DER is not PEM");
    assert!(matches!(err, CsrError::NotPem(_)), "{err}");
    let err = ca.sign_csr(b"hello", id, now()).expect_err("text");
    assert!(matches!(err, CsrError::NotPem(_)), "{err}");
    let err = ca
        .sign_csr(
            pem_encode("CERTIFICATE REQUEST", b"\x30\x03abc").as_bytes(),
            id,
            now(),
        )
        .expect_err("garbage");
    assert!(matches!(err, CsrError::Malformed(_)), "{err}");
    let huge = vec![b'A'; ca::MAX_CSR_PEM_LEN + 1];
    let err = ca.sign_csr(&huge, id, now()).expect_err("huge");
    assert!(matches!(err, CsrError::TooLarge { .. }), "{err}");

    let (_key, p521) = csr_for(&PKCS_ECDSA_P521_SHA512);
    let err = ca
        .sign_csr(p521.as_bytes(), id, now())
        .expect_err("P-521 is not supported");
    assert!(matches!(err, CsrError::UnsupportedKey(_)), "{err}");
    assert!(
        err.to_string().contains("P-256"),
        "the error says what is: {err}"
    );
}

#[test]
fn no_single_byte_corruption_of_the_signed_request_is_accepted() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let (key, pem) = csr_for(&PKCS_ECDSA_P256_SHA256);
    let spki = key.subject_public_key_info();
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .as_ref()
        .to_vec();
    // Where the signed part (certificationRequestInfo, which holds the key) lies in the DER.
    let (_, parsed) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&der).expect("csr");
    let info = parsed.certification_request_info.raw;
    let info_start = der
        .windows(info.len())
        .position(|w| w == info)
        .expect("info in der");
    let signed = info_start..info_start + info.len();
    let mut accepted = Vec::new();
    for i in 0..der.len() {
        let corrupted = tamper_pem(&pem, |d| d[i] ^= 0x5a);
        let id = Uuid::new_v4();
        if let Ok(issued) = ca.sign_csr(corrupted.as_bytes(), id, now()) {
            // Whatever gets through keeps the invariant: the chosen CN, the request's key.
            let cert = parse_cert(&issued.der);
            assert_eq!(cn_of(&cert), vec![id.to_string()], "byte {i}");
            assert_eq!(cert.public_key().raw, spki.as_slice(), "byte {i}");
            accepted.push(i);
        }
    }
    // A change to the signed part is always refused. (x509-parser is lenient about the
    // outer, unsigned signatureAlgorithm tag: that byte may pass, harmlessly.)
    assert!(
        accepted.iter().all(|i| !signed.contains(i)),
        "accepted corruptions {accepted:?} inside the signed bytes {signed:?}"
    );
    assert!(accepted.len() <= 2, "{accepted:?}");
}

#[test]
fn crl_lists_the_revoked_serials() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let a = ca.issue_agent_with_key(Uuid::new_v4(), now()).expect("a");
    let b = ca.issue_agent_with_key(Uuid::new_v4(), now()).expect("b");
    let crl_der = ca
        .crl(
            &[RevokedCert {
                serial: a.certificate.serial.clone(),
                revoked_at: now(),
            }],
            now(),
        )
        .expect("crl");
    let (_, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&crl_der).expect("crl");
    let serials: Vec<Vec<u8>> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    assert_eq!(serials, vec![a.certificate.serial.as_bytes().to_vec()]);
    assert!(!serials.contains(&b.certificate.serial.as_bytes().to_vec()));
    let ca_cert = parse_cert(ca.cert_der());
    crl.verify_signature(ca_cert.public_key())
        .expect("CRL signed by the CA");
}

#[test]
fn identity_requires_a_single_uuid_common_name() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    // The CA certificate's CN is not a UUID.
    assert!(matches!(
        AgentIdentity::from_certificate(ca.cert_der()),
        Err(ca::IdentityError::NotAnAgentId(_))
    ));
    assert!(matches!(
        AgentIdentity::from_peer_certificates(None),
        Err(ca::IdentityError::NoCertificate)
    ));
    assert!(matches!(
        AgentIdentity::from_certificate(b"junk"),
        Err(ca::IdentityError::Malformed(_))
    ));
    let id = Uuid::new_v4();
    let bundle = ca.issue_agent_with_key(id, now()).expect("bundle");
    let identity = AgentIdentity::from_certificate(&bundle.certificate.der).expect("identity");
    assert_eq!(identity.agent_id(), id);
}

// ---------------------------------------------------------------------------------------
// Enrollment tokens

#[test]
fn token_round_trips_and_pins_the_ca() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let token = EnrollmentToken::generate(ca.fingerprint()).expect("token");
    let text = token.to_token_string();
    let parts: Vec<&str> = text.split('.').collect();
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[0], "epmc1");
    assert!(parts[2].len() * 4 >= 128, "secret of at least 128 bits");
    assert_eq!(parts[3], ca.fingerprint().to_hex());

    let parsed = EnrollmentToken::parse(&format!("  {text}\n")).expect("parse");
    assert_eq!(parsed, token);
    assert_eq!(parsed.id(), token.id());
    parsed.verify_ca(ca.cert_der()).expect("same CA");
    assert!(parsed.secret_matches(&token.secret_hash()));

    let other = EnrollmentToken::generate(ca.fingerprint()).expect("token");
    assert_ne!(other.to_token_string(), text, "random");
    assert!(!parsed.secret_matches(&other.secret_hash()));
    assert_eq!(
        ca::SecretHash::from_hex(&token.secret_hash().to_hex()),
        Some(token.secret_hash())
    );
}

#[test]
fn forged_tokens_are_refused() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let other_ca = CertificateAuthority::generate("test CA", now()).expect("other ca");
    let text = EnrollmentToken::generate(ca.fingerprint())
        .expect("token")
        .to_token_string();

    // A token that names another CA parses but does not verify against this server's CA.
    let wrong_ca = EnrollmentToken::generate(other_ca.fingerprint())
        .expect("token")
        .to_token_string();
    let err = EnrollmentToken::parse(&wrong_ca)
        .expect("well-formed")
        .verify_ca(ca.cert_der())
        .expect_err("wrong CA");
    assert!(matches!(err, TokenError::CaMismatch { .. }), "{err}");

    let (head, fp) = text.rsplit_once('.').expect("parts");
    let mut flipped = fp.to_owned().into_bytes();
    flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
    let flipped = format!("{head}.{}", String::from_utf8(flipped).expect("ascii"));
    let err = EnrollmentToken::parse(&flipped)
        .expect("well-formed")
        .verify_ca(ca.cert_der())
        .expect_err("one digit of the fingerprint changed");
    assert!(matches!(err, TokenError::CaMismatch { .. }), "{err}");

    let secret = text.split('.').nth(2).expect("secret").to_owned();
    let refused = |input: &str, expected: fn(&TokenError) -> bool| {
        let err = EnrollmentToken::parse(input).expect_err("malformed token");
        assert!(expected(&err), "{input:?} gave {err:?}");
        assert!(
            !err.to_string().contains(&secret),
            "errors never echo the secret"
        );
    };
    refused(&text[..text.len() - 1], |e| {
        matches!(e, TokenError::Format(TokenFormatError::BadFingerprint))
    });
    refused(head, |e| {
        matches!(e, TokenError::Format(TokenFormatError::WrongPartCount(3)))
    });
    refused(&text.replacen("epmc1", "epmc2", 1), |e| {
        matches!(e, TokenError::Format(TokenFormatError::UnknownFormat))
    });
    refused(&format!("{text}.extra"), |e| {
        matches!(e, TokenError::Format(TokenFormatError::WrongPartCount(5)))
    });
    refused(&text.to_uppercase().replacen("EPMC1", "epmc1", 1), |e| {
        matches!(e, TokenError::Format(TokenFormatError::BadTokenId))
    });
    let p: Vec<&str> = text.split('.').collect();
    let short_secret = format!("{}.{}.{}.{}", p[0], p[1], &p[2][..p[2].len() - 2], p[3]);
    refused(&short_secret, |e| {
        matches!(e, TokenError::Format(TokenFormatError::BadSecret))
    });
    refused("", |e| {
        matches!(e, TokenError::Format(TokenFormatError::UnknownFormat))
    });
    refused("epmc1...", |e| {
        matches!(e, TokenError::Format(TokenFormatError::BadTokenId))
    });
    assert!(CaFingerprint::from_hex(fp).is_some());
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(256))]

    /// Whatever parses is in canonical form: printing it gives back the input.
    #[test]
    fn a_parsed_token_prints_as_its_input(
        id in "[0-9a-f]{15,17}",
        secret in "[0-9a-f]{47,49}",
        fp in "[0-9a-f]{63,65}",
    ) {
        let input = format!("epmc1.{id}.{secret}.{fp}");
        if let Ok(token) = EnrollmentToken::parse(&input) {
            proptest::prop_assert_eq!(token.to_token_string(), input);
            proptest::prop_assert_eq!(token.ca_fingerprint().to_hex(), fp);
        } else {
            proptest::prop_assert!(id.len() != 16 || secret.len() != 48 || fp.len() != 64);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Data directory

fn read_all(dir: &Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("entry");
            let meta = e.metadata().expect("meta");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
                meta.modified().expect("mtime"),
            )
        })
        .collect();
    files.sort();
    files
}

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
}

#[cfg(unix)]
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[cfg(unix)]
#[test]
fn init_creates_private_keys_and_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("data");
    let created = datadir::init(&root, &[]).expect("init");
    let InitOutcome::Created { ca_fingerprint } = created else {
        panic!("first init creates: {created:?}");
    };
    let names: Vec<String> = read_all(&root).into_iter().map(|f| f.0).collect();
    assert_eq!(
        names,
        [
            "ca.crt",
            "ca.key",
            "ca.key.sha256",
            "server.crt",
            "server.key"
        ]
    );
    assert_eq!(mode_of(&root.join("ca.key")), 0o600);
    assert_eq!(mode_of(&root.join("server.key")), 0o600);
    assert_eq!(mode_of(&root), 0o700);

    let before = read_all(&root);
    let again = datadir::init(&root, &["other.example".to_owned()]).expect("init again");
    assert_eq!(again, InitOutcome::AlreadyInitialized { ca_fingerprint });
    assert_eq!(read_all(&root), before, "nothing changed");

    let pki = datadir::load(&root).expect("load");
    assert_eq!(pki.ca.fingerprint(), ca_fingerprint);
}

#[cfg(unix)]
#[test]
fn init_refuses_an_incomplete_directory() {
    let (dir, _pki) = server_pki();
    std::fs::remove_file(dir.path().join("server.crt")).expect("rm");
    let err = datadir::init(dir.path(), &[]).expect_err("incomplete");
    assert_eq!(err.path(), dir.path().join("server.crt"));
    assert!(matches!(err.problem(), Problem::Incomplete { .. }), "{err}");
    let err = datadir::load(dir.path()).expect_err("missing");
    assert_eq!(err.path(), dir.path().join("server.crt"));
    assert!(matches!(err.problem(), Problem::Missing), "{err}");
}

#[cfg(unix)]
#[test]
fn load_refuses_a_key_readable_by_others() {
    for key in ["ca.key", "server.key"] {
        let (dir, _pki) = server_pki();
        let path = dir.path().join(key);
        chmod(&path, 0o644);
        let err = datadir::load(dir.path()).expect_err("0644 key");
        assert_eq!(err.path(), path);
        assert!(
            matches!(err.problem(), Problem::LoosePermissions { mode: 0o644 }),
            "{err}"
        );
        assert!(err.to_string().contains(key) && err.to_string().contains("chmod 600"));
        chmod(&path, 0o640);
        assert!(datadir::load(dir.path()).is_err(), "group-readable too");
        chmod(&path, 0o600);
        datadir::load(dir.path()).expect("fixed");
    }
}

#[cfg(unix)]
#[test]
fn load_refuses_a_swapped_ca_key() {
    let (dir, _pki) = server_pki();
    let (other_dir, _other) = server_pki();

    // Another CA's key beside this CA's certificate.
    std::fs::copy(other_dir.path().join("ca.key"), dir.path().join("ca.key")).expect("copy");
    chmod(&dir.path().join("ca.key"), 0o600);
    let err = datadir::load(dir.path()).expect_err("swapped key");
    assert_eq!(err.path(), dir.path().join("ca.key"));
    assert!(
        matches!(err.problem(), Problem::KeyMismatch { .. }),
        "{err}"
    );

    // Another whole PKI (CA key and certificate, server key and certificate): consistent, but
    // not the CA the agents trust; only the hash recorded at init tells.
    for f in ["ca.crt", "ca.key", "server.crt", "server.key"] {
        std::fs::copy(other_dir.path().join(f), dir.path().join(f)).expect("copy");
    }
    for f in ["ca.key", "server.key"] {
        chmod(&dir.path().join(f), 0o600);
    }
    let err = datadir::load(dir.path()).expect_err("swapped CA");
    assert_eq!(err.path(), dir.path().join("ca.key"));
    assert!(matches!(err.problem(), Problem::KeyChanged { .. }), "{err}");
    assert!(err.to_string().contains("ca.key.sha256"), "{err}");
}

#[cfg(unix)]
#[test]
fn load_refuses_a_server_certificate_from_another_ca() {
    let (dir, _pki) = server_pki();
    let (other_dir, _other) = server_pki();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(other_dir.path().join(f), dir.path().join(f)).expect("copy");
    }
    chmod(&dir.path().join("server.key"), 0o600);
    let err = datadir::load(dir.path()).expect_err("foreign server cert");
    assert_eq!(err.path(), dir.path().join("server.crt"));
    assert!(matches!(err.problem(), Problem::NotIssuedByCa(_)), "{err}");
}

#[cfg(unix)]
#[test]
fn agent_bundle_is_written_once_with_a_private_key() {
    let ca = CertificateAuthority::generate("test CA", now()).expect("ca");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("agent");
    let bundle = ca
        .issue_agent_with_key(Uuid::new_v4(), now())
        .expect("bundle");
    datadir::write_agent_bundle(&out, &bundle).expect("write");
    assert_eq!(mode_of(&out.join("agent.key")), 0o600);
    assert_eq!(
        std::fs::read_to_string(out.join("agent.crt")).expect("read"),
        bundle.certificate.pem
    );
    assert_eq!(
        std::fs::read_to_string(out.join("ca.crt")).expect("read"),
        ca.cert_pem()
    );
    let err = datadir::write_agent_bundle(&out, &bundle).expect_err("no overwrite");
    assert!(matches!(err.problem(), Problem::AlreadyExists), "{err}");
}

// ---------------------------------------------------------------------------------------

/// PEM of `der` (the tests re-encode tampered requests).
fn pem_encode(label: &str, der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(A[((v >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

/// The listener reads the CRL once, so it checks it once: a CRL of another CA, or one whose
/// signature does not verify, is refused when the configuration is built.
#[test]
fn a_crl_of_another_ca_or_with_a_bad_signature_is_refused() {
    let (_dir, pki) = server_pki();
    let (_other_dir, other) = server_pki();
    let (chain, key) = pki.server.to_der().expect("server der");
    let foreign = other.ca.crl(&[], now()).expect("crl");
    let refused =
        ca::mqtt_server_config(pki.ca.cert_der(), foreign, chain.clone(), key.clone_key());
    assert!(
        matches!(refused, Err(ca::TlsConfigError::Crl(ref m)) if m.contains("not by the CA") || m.contains("signature")),
        "{refused:?}"
    );
    let mut tampered = pki.ca.crl(&[], now()).expect("crl").as_ref().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let refused = ca::mqtt_server_config(pki.ca.cert_der(), tampered.into(), chain, key);
    assert!(
        matches!(refused, Err(ca::TlsConfigError::Crl(_))),
        "{refused:?}"
    );
}
