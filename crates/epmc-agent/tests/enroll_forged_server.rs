//! Enrollment against servers that lie, made here with their own certificates: one that
//! hands out the right CA but holds a certificate from another (a man in the middle), and
//! ones that issue certificates the agent must refuse (another agent id, another key, another
//! CA), a CA other than the pinned one, garbage and oversized answers. In every case nothing
//! is written, and the man in the middle never sees the token.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use epmc_agent::enroll::{EnrollError, EnrollOptions, enroll};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOUND: Duration = Duration::from_secs(30);
const AGENT: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const OTHER_AGENT: &str = "0b9e8d7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    fn fingerprint(&self) -> String {
        Sha256::digest(&self.der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A token naming this CA (its id and secret are never checked by the fakes).
    fn token(&self) -> String {
        format!(
            "epmc1.{}.{}.{}",
            "1a".repeat(8),
            "2b".repeat(24),
            self.fingerprint()
        )
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut params =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        Arc::new(config)
    }

    /// A client certificate for `public` (the key of a CSR, or a fresh one) with CN `cn`.
    fn issue(&self, csr_pem: &str, cn: &str, fresh_key: bool) -> String {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        if fresh_key {
            let other = KeyPair::generate().unwrap();
            let other_csr = CertificateParams::new(Vec::<String>::new())
                .unwrap()
                .serialize_request(&other)
                .unwrap()
                .pem()
                .unwrap();
            csr = CertificateSigningRequestParams::from_pem(&other_csr).unwrap();
        }
        csr.params.distinguished_name = rcgen::DistinguishedName::new();
        csr.params.distinguished_name.push(DnType::CommonName, cn);
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.signed_by(&self.issuer).unwrap().pem()
    }
}

type Answer = Box<dyn Fn(&serde_json::Value) -> Vec<u8> + Send + Sync>;

/// A fake enrollment endpoint over TLS with `tls`: `GET /api/v1/ca` answers `ca_pem`,
/// `POST /api/v1/enroll` answers what `answer` makes of the request. Counts the POSTs and
/// keeps the tokens it received.
struct Fake {
    port: u16,
    posts: Arc<AtomicUsize>,
    tokens: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request<S: AsyncReadExt + Unpin>(s: &mut S) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).ok()?;
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some((head, buf[end + 4..end + 4 + len].to_vec()));
            }
        }
        if buf.len() > 256 * 1024 {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Fake {
    async fn start(tls: Arc<rustls::ServerConfig>, ca_pem: String, answer: Answer) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let posts = Arc::new(AtomicUsize::new(0));
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = {
            let (posts, tokens) = (posts.clone(), tokens.clone());
            tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        Ok((tcp, _)) = listener.accept() => {
                            let (acceptor, ca_pem, answer) = (acceptor.clone(), ca_pem.clone(), answer.clone());
                            let (posts, tokens) = (posts.clone(), tokens.clone());
                            conns.spawn(async move {
                                let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
                                    return;
                                };
                                let Some((head, body)) = read_request(&mut s).await else { return };
                                let reply = if head.starts_with("GET /api/v1/ca ") {
                                    ca_pem.into_bytes()
                                } else if head.starts_with("POST /api/v1/enroll ") {
                                    posts.fetch_add(1, Ordering::SeqCst);
                                    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                                    if let Some(t) = req["token"].as_str() {
                                        tokens.lock().unwrap().push(t.to_owned());
                                    }
                                    answer(&req)
                                } else {
                                    b"not found".to_vec()
                                };
                                let head = format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                    reply.len()
                                );
                                let _ = s.write_all(head.as_bytes()).await;
                                let _ = s.write_all(&reply).await;
                                let _ = s.shutdown().await;
                            });
                        }
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                }
            })
        };
        Fake {
            port,
            posts,
            tokens,
            task,
        }
    }

    fn options(&self, token: &str, dir: &Path) -> EnrollOptions {
        let mut o = EnrollOptions::new(
            format!("https://localhost:{}", self.port).parse().unwrap(),
            token.parse().unwrap(),
            dir,
        );
        o.timeout = Duration::from_secs(10);
        o
    }
}

fn answer_json(agent_id: &str, certificate: &str, ca: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "agent_id": agent_id,
        "certificate": certificate,
        "ca": ca,
        "mqtt_port": 8883,
    }))
    .unwrap()
}

fn assert_nothing_written(dir: &Path) {
    assert!(
        !dir.exists() || std::fs::read_dir(dir).unwrap().next().is_none(),
        "something was written in {}",
        dir.display()
    );
}

async fn refused(fake: &Fake, token: &str) -> EnrollError {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("agent");
    let e = tokio::time::timeout(BOUND, enroll(&fake.options(token, &dir)))
        .await
        .expect("within the bound")
        .expect_err("refused");
    assert_nothing_written(&dir);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_man_in_the_middle_with_the_right_ca_file_never_gets_the_token() {
    let real = Ca::new("the real EPMC CA");
    let attacker = Ca::new("attacker CA");
    // It serves the real CA certificate (public), but its TLS certificate is its own.
    let fake = Fake::start(
        attacker.server_config(),
        real.pem.clone(),
        Box::new(|_| b"{}".to_vec()),
    )
    .await;
    let e = refused(&fake, &real.token()).await;
    assert!(matches!(e, EnrollError::UntrustedServer { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains(&real.fingerprint()), "{text}");
    assert!(text.contains("the token was not sent"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert_eq!(fake.posts.load(Ordering::SeqCst), 0);
    assert!(fake.tokens.lock().unwrap().is_empty());
}

#[derive(Clone, Copy, Debug)]
enum Case {
    Good,
    OtherAgentInCn,
    OtherKey,
    OtherCa,
    AnswerNamesOtherCa,
    NotAUuid,
    Garbage,
    Huge,
}

fn respond(case: Case, ca: &Ca, other: &Ca, req: &serde_json::Value) -> Vec<u8> {
    let csr = req["csr"].as_str().unwrap_or_default();
    match case {
        Case::Good => answer_json(AGENT, &ca.issue(csr, AGENT, false), &ca.pem),
        Case::OtherAgentInCn => answer_json(AGENT, &ca.issue(csr, OTHER_AGENT, false), &ca.pem),
        Case::OtherKey => answer_json(AGENT, &ca.issue(csr, AGENT, true), &ca.pem),
        Case::OtherCa => answer_json(AGENT, &other.issue(csr, AGENT, false), &ca.pem),
        Case::AnswerNamesOtherCa => answer_json(AGENT, &ca.issue(csr, AGENT, false), &other.pem),
        Case::NotAUuid => answer_json("agent-1", &ca.issue(csr, "agent-1", false), &ca.pem),
        Case::Garbage => b"<html>hello</html>".to_vec(),
        Case::Huge => answer_json(AGENT, &"A".repeat(100 * 1024), &ca.pem),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_answers_that_do_not_check_out_are_refused() {
    let ca = Arc::new(Ca::new("fake EPMC CA"));
    let other = Arc::new(Ca::new("another CA"));
    let tls = ca.server_config();
    for (case, expected) in [
        (Case::Good, ""),
        (Case::OtherAgentInCn, "its common name \"0b9e8d7c"),
        (Case::OtherKey, "does not carry this agent's public key"),
        (Case::OtherCa, "not a client certificate from the pinned CA"),
        (Case::AnswerNamesOtherCa, "names another CA"),
        (Case::NotAUuid, "is not a UUID"),
        (Case::Garbage, "POST /api/v1/enroll"),
        (Case::Huge, "longer than 65536 bytes"),
    ] {
        let (c, o) = (ca.clone(), other.clone());
        let fake = Fake::start(
            tls.clone(),
            ca.pem.clone(),
            Box::new(move |r| respond(case, &c, &o, r)),
        )
        .await;
        if let Case::Good = case {
            // The fake is a working server: what follows fails for the reason named.
            let out = tempfile::tempdir().unwrap();
            let done = tokio::time::timeout(BOUND, enroll(&fake.options(&ca.token(), out.path())))
                .await
                .unwrap()
                .expect("a good answer enrolls");
            assert_eq!(done.agent_id.to_string(), AGENT);
            assert!(out.path().join("agent.toml").is_file());
            assert_eq!(fake.tokens.lock().unwrap().as_slice(), [ca.token()]);
            continue;
        }
        let e = refused(&fake, &ca.token()).await;
        assert!(
            matches!(
                e,
                EnrollError::BadCertificate(_) | EnrollError::BadAnswer(_)
            ),
            "{case:?}: {e}"
        );
        assert!(e.to_string().contains(expected), "{case:?}: {e}");
        assert_eq!(fake.posts.load(Ordering::SeqCst), 1, "{case:?}");
    }
}
