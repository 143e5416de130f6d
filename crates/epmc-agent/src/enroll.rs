//! Enrollment: `epmc-agent enroll --server https://HOST:PORT --token TOKEN`.
//!
//! The token (`epmc1.<token-id>.<secret>.<ca-sha256>`, printed by `epmc-server token create`)
//! carries the SHA-256 fingerprint of the server's CA, so the agent trusts nothing that
//! answers before it has checked that CA (as `kubeadm join --discovery-token-ca-cert-hash`
//! does):
//!
//! 1. The token and the arguments are checked, and `DIR` must not hold an enrollment already
//!    (unless `--force`).
//! 2. `GET /api/v1/ca` fetches the CA certificate without trusting the connection (nothing
//!    secret is sent); its SHA-256 must be the token's fingerprint, otherwise enrollment
//!    stops with both fingerprints named and the token never leaves the agent.
//! 3. From then on only that CA is trusted: the key pair is generated here (ECDSA P-256; the
//!    private key never leaves the agent), and the token and a certificate request go to
//!    `POST /api/v1/enroll` over a connection whose server certificate must chain to the
//!    pinned CA.
//! 4. The answer is checked: the certificate's CN is the agent id the server chose, it is a
//!    client certificate issued by the pinned CA, and it carries our public key.
//! 5. `DIR/ca.crt`, `agent.crt`, `agent.key` (owner-only) and `agent.toml` (owner-only; a
//!    valid configuration with the server, mode bidirectional and no targets yet) are written
//!    to temporary files, synced, and renamed into place, `agent.toml` last: a failure at any
//!    earlier step leaves none of them.
//!
//! With `--proxy http://HOST:PORT` (and optional credentials) both requests go through that
//! HTTP proxy (CONNECT) and the configuration written uses it for MQTT too. Without it no
//! proxy is used, whatever the environment says.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use epmc_proto::topic::AgentId;
use epmc_transport::client::ProxyCredentials;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{AgentConfig, ProxyUrl};

/// The files an enrollment writes, in the order they are put in place (`agent.toml` last).
pub const FILES: [&str; 4] = [CA_FILE, CERT_FILE, KEY_FILE, CONFIG_FILE];
/// The pinned server CA certificate.
pub const CA_FILE: &str = "ca.crt";
/// The agent's certificate.
pub const CERT_FILE: &str = "agent.crt";
/// The agent's private key (owner-only).
pub const KEY_FILE: &str = "agent.key";
/// The agent's configuration (owner-only).
pub const CONFIG_FILE: &str = "agent.toml";

/// Largest answer read from the server (the CA, the enrollment answer, an error message).
pub const MAX_ANSWER: usize = 64 * 1024;

use epmc_proto::token::TokenParts;
pub use epmc_proto::token::{TOKEN_PREFIX, TokenFormatError as TokenError};

/// A SHA-256 fingerprint of a CA certificate (of its DER encoding).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// An enrollment token. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    text: String,
    id: String,
    ca: Fingerprint,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .field("secret", &"[secret]")
            .field("ca", &self.ca)
            .finish()
    }
}

impl FromStr for Token {
    type Err = TokenError;

    /// Parses `epmc1.<token-id>.<secret>.<ca-sha256>` (lowercase hex parts); surrounding
    /// whitespace, as pasted from a terminal, is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts = TokenParts::parse(s)?;
        Ok(Token {
            text: s.trim().to_owned(),
            id: parts.id_hex(),
            ca: Fingerprint(parts.ca_sha256),
        })
    }
}

impl Token {
    /// The public token id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The fingerprint of the CA the token is for.
    pub fn ca_fingerprint(&self) -> Fingerprint {
        self.ca
    }
}

/// `https://HOST[:PORT]` (port 443 by default), the server's enrollment endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    /// Host name or address (an IPv6 address without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl FromStr for ServerAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = crate::config::parse_url(s.trim(), "https", Some(443))?;
        Ok(ServerAddress { host, port })
    }
}

impl ServerAddress {
    fn authority(&self) -> String {
        bracket(&self.host, self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.authority())
    }
}

fn bracket(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An HTTP proxy for enrollment (and for the MQTT connection the written configuration
/// describes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollProxy {
    /// `http://HOST:PORT`.
    pub url: ProxyUrl,
    /// Basic credentials, if the proxy wants them.
    pub credentials: Option<ProxyCredentials>,
}

/// What `enroll` needs.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    /// The server's HTTPS endpoint.
    pub server: ServerAddress,
    /// The enrollment token.
    pub token: Token,
    /// Where to write the files.
    pub dir: PathBuf,
    /// A name for the agent on the server (its id when absent).
    pub name: Option<String>,
    /// An HTTP proxy to go through.
    pub proxy: Option<EnrollProxy>,
    /// Replace an existing enrollment in `dir`.
    pub force: bool,
    /// Each HTTP request (connection included) must complete within this.
    pub timeout: Duration,
    /// The release public key (`epmc-server release keygen` prints it): when given, the
    /// configuration enables signed self-update from this server (`[update]`).
    pub release_key: Option<epmc_proto::release::ReleasePublicKey>,
}

impl EnrollOptions {
    /// Options with no name, no proxy, no `force` and a 30 s timeout per request.
    pub fn new(server: ServerAddress, token: Token, dir: impl Into<PathBuf>) -> Self {
        EnrollOptions {
            server,
            token,
            dir: dir.into(),
            name: None,
            proxy: None,
            force: false,
            timeout: Duration::from_secs(30),
            release_key: None,
        }
    }
}

/// A successful enrollment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrolled {
    /// The id the server gave the agent (its certificate's CN).
    pub agent_id: AgentId,
    /// The pinned CA's fingerprint.
    pub ca_fingerprint: Fingerprint,
    /// The configuration written.
    pub config: PathBuf,
    /// The MQTT endpoint the configuration names.
    pub mqtt: String,
}

/// Why enrollment failed. In every case nothing was written to the directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The token is malformed.
    #[error("--token: {0}")]
    Token(#[from] TokenError),
    /// A bad argument (name, directory).
    #[error("{0}")]
    Argument(String),
    /// The directory already holds an enrollment.
    #[error(
        "{dir} already holds an enrollment ({files}); use --force to replace it, or choose another --dir"
    )]
    AlreadyEnrolled {
        /// The directory.
        dir: PathBuf,
        /// The files present.
        files: String,
    },
    /// The server (or the proxy) could not be reached.
    #[error("cannot reach {what}: {detail}")]
    Unreachable {
        /// What was being reached (the URL, and the proxy).
        what: String,
        /// Why, with its causes.
        detail: String,
    },
    /// The server did not present a certificate from the pinned CA when the token was to be
    /// sent (someone else answers at that address); the token was not sent.
    #[error(
        "{server} did not present a certificate from the pinned CA (sha256 {ca}): {detail}; the token was not sent"
    )]
    UntrustedServer {
        /// The server's URL.
        server: String,
        /// The pinned CA's fingerprint.
        ca: Fingerprint,
        /// What TLS said.
        detail: String,
    },
    /// The CA the server presented is not the one the token names.
    #[error(
        "the server's CA certificate (sha256 {actual}) is not the one the enrollment token names (sha256 {expected}); the token was not sent. Check --server, or ask for a token from this server"
    )]
    CaMismatch {
        /// The token's fingerprint.
        expected: Fingerprint,
        /// The fingerprint of what the server sent.
        actual: Fingerprint,
    },
    /// The server refused the token (unknown, used or expired).
    #[error("the server refused the enrollment token ({status}): {message}")]
    TokenRefused {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The server refused the request for another reason.
    #[error("the server refused the enrollment ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The server's answer is not what an EPMC server sends.
    #[error("the server's answer is not valid: {0}")]
    BadAnswer(String),
    /// The issued certificate does not check out.
    #[error("the certificate the server issued is not acceptable: {0}")]
    BadCertificate(String),
    /// Generating the key or the request failed.
    #[error("generating the key pair or certificate request failed: {0}")]
    Key(String),
    /// Writing the files failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The enrollment answer (`POST /api/v1/enroll`).
#[derive(Debug, Deserialize)]
struct EnrollAnswer {
    agent_id: String,
    certificate: String,
    ca: String,
    mqtt_port: u16,
}

#[derive(Serialize)]
struct EnrollRequest<'a> {
    token: &'a str,
    csr: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// Longest agent name the server accepts.
pub const MAX_NAME_LEN: usize = 128;

/// Enrolls: see the [module docs](self).
pub async fn enroll(options: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    // One crypto provider for the process (aws-lc-rs); already installed is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let name = match options.name.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(n) if n.chars().count() > MAX_NAME_LEN || n.chars().any(char::is_control) => {
            return Err(EnrollError::Argument(format!(
                "--name: at most {MAX_NAME_LEN} characters, no control characters"
            )));
        }
        Some(n) => Some(n),
    };
    refuse_existing(&options.dir, options.force)?;

    // 2. The CA, fetched without trusting the connection; nothing secret is sent.
    let untrusted = http_client(options, None)?;
    let ca_pem = fetch(
        options,
        None,
        untrusted.get(options.server.url("/api/v1/ca")),
        "the CA certificate",
    )
    .await?;
    let ca_der = single_certificate(&ca_pem, "GET /api/v1/ca")?;
    let actual = Fingerprint::of_der(&ca_der);
    if actual != options.token.ca_fingerprint() {
        return Err(EnrollError::CaMismatch {
            expected: options.token.ca_fingerprint(),
            actual,
        });
    }

    // 3. Pinned from here on. The key is made here and never leaves.
    let pinned = http_client(options, Some(&ca_der))?;
    let key = rcgen::KeyPair::generate().map_err(|e| EnrollError::Key(e.to_string()))?;
    let csr = {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| EnrollError::Key(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "epmc-agent");
        params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| EnrollError::Key(e.to_string()))?
    };
    let body = fetch(
        options,
        Some(actual),
        pinned
            .post(options.server.url("/api/v1/enroll"))
            .json(&EnrollRequest {
                token: &options.token.text,
                csr: &csr,
                name,
            }),
        "enrollment",
    )
    .await?;
    let answer: EnrollAnswer = serde_json::from_slice(&body)
        .map_err(|e| EnrollError::BadAnswer(format!("POST /api/v1/enroll: {e}")))?;

    // 4. Check what came back.
    let agent_id = AgentId::parse(&answer.agent_id).map_err(|_| {
        EnrollError::BadAnswer(format!(
            "the agent id {:?} is not a UUID",
            truncate(&answer.agent_id)
        ))
    })?;
    if answer.mqtt_port == 0 {
        return Err(EnrollError::BadAnswer("the MQTT port is 0".into()));
    }
    let answered_ca = single_certificate(answer.ca.as_bytes(), "the enrollment answer's CA")?;
    if answered_ca != ca_der {
        return Err(EnrollError::BadAnswer(format!(
            "the enrollment answer names another CA (sha256 {}) than the pinned one (sha256 {actual})",
            Fingerprint::of_der(&answered_ca)
        )));
    }
    let cert_der = check_certificate(&answer.certificate, &ca_der, &agent_id, &key)?;

    // 5. Write everything, or nothing.
    let mqtt = format!(
        "mqtts://{}",
        bracket(&options.server.host, answer.mqtt_port)
    );
    let update = options
        .release_key
        .as_ref()
        .map(|key| (&options.server, key));
    let config = config_text(&mqtt, &agent_id, actual, options.proxy.as_ref(), update);
    if let Err(e) = AgentConfig::parse(&config) {
        return Err(EnrollError::Argument(format!(
            "the configuration to write is not valid ({e}); nothing was written"
        )));
    }
    let cert_pem = certificate_pem(&cert_der);
    let key_pem = key.serialize_pem();
    let ca_file = certificate_pem(&ca_der);
    write_all_or_nothing(
        &options.dir,
        options.force,
        &[
            (CA_FILE, ca_file.as_bytes(), 0o644),
            (CERT_FILE, cert_pem.as_bytes(), 0o644),
            (KEY_FILE, key_pem.as_bytes(), 0o600),
            (CONFIG_FILE, config.as_bytes(), 0o600),
        ],
    )?;
    Ok(Enrolled {
        agent_id,
        ca_fingerprint: actual,
        config: options.dir.join(CONFIG_FILE),
        mqtt,
    })
}

fn truncate(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Which of the enrollment files exist in `dir`.
fn existing(dir: &Path) -> Vec<&'static str> {
    FILES
        .into_iter()
        .filter(|f| dir.join(f).symlink_metadata().is_ok())
        .collect()
}

fn refuse_existing(dir: &Path, force: bool) -> Result<(), EnrollError> {
    if dir.exists() && !dir.is_dir() {
        return Err(EnrollError::Argument(format!(
            "--dir {}: not a directory",
            dir.display()
        )));
    }
    let present = existing(dir);
    if !force && !present.is_empty() {
        return Err(EnrollError::AlreadyEnrolled {
            dir: dir.to_owned(),
            files: present.join(", "),
        });
    }
    Ok(())
}

/// The HTTP client: no redirects, HTTPS only, the proxy given or none (the environment's
/// proxy variables are ignored), and either only `pinned_ca` trusted or, for the CA fetch,
/// nothing checked.
fn http_client(
    options: &EnrollOptions,
    pinned_ca: Option<&[u8]>,
) -> Result<reqwest::Client, EnrollError> {
    let mut builder = reqwest::Client::builder()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(options.timeout)
        .timeout(options.timeout)
        .user_agent(concat!("epmc-agent/", env!("CARGO_PKG_VERSION")));
    builder = match &options.proxy {
        None => builder.no_proxy(),
        Some(p) => {
            let url = format!("http://{}", bracket(&p.url.host, p.url.port));
            let mut proxy = reqwest::Proxy::all(&url)
                .map_err(|e| EnrollError::Argument(format!("--proxy {url}: {e}")))?;
            if let Some(c) = &p.credentials {
                proxy = proxy.basic_auth(c.username(), c.password());
            }
            builder.proxy(proxy)
        }
    };
    builder = match pinned_ca {
        None => builder.tls_danger_accept_invalid_certs(true),
        Some(der) => builder.tls_certs_only([reqwest::Certificate::from_der(der)
            .map_err(|e| EnrollError::BadAnswer(format!("the CA certificate: {e}")))?]),
    };
    builder
        .build()
        .map_err(|e| EnrollError::Argument(format!("HTTP client: {}", chain(&e))))
}

/// An error with its causes, `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The certificate problem rustls found, if that is why `e` happened. The rustls error sits
/// inside `io::Error`s (which do not list what they wrap as their source).
fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(tls @ rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>()
        {
            return Some(tls.to_string());
        }
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// Sends `request`; returns the body of a 2xx answer (at most [`MAX_ANSWER`] bytes) or the
/// error the status and the server's message mean. With `pinned`, the connection trusts only
/// that CA, and a certificate it did not issue is [`EnrollError::UntrustedServer`].
async fn fetch(
    options: &EnrollOptions,
    pinned: Option<Fingerprint>,
    request: reqwest::RequestBuilder,
    what: &str,
) -> Result<Vec<u8>, EnrollError> {
    let target = || match &options.proxy {
        None => options.server.url(""),
        Some(p) => format!(
            "{} through the HTTP proxy {}",
            options.server.url(""),
            bracket(&p.url.host, p.url.port)
        ),
    };
    let failed = |e: reqwest::Error| {
        if let (Some(ca), Some(detail)) = (pinned, certificate_problem(&e)) {
            EnrollError::UntrustedServer {
                server: options.server.url(""),
                ca,
                detail,
            }
        } else if e.is_timeout() {
            EnrollError::Unreachable {
                what: target(),
                detail: format!("no answer for {what} within {:?}", options.timeout),
            }
        } else {
            EnrollError::Unreachable {
                what: target(),
                detail: chain(&e),
            }
        }
    };
    let mut response = request.send().await.map_err(failed)?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(EnrollError::BadAnswer(format!(
                "{what}: the answer is longer than {MAX_ANSWER} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok(body);
    }
    let message = truncate(String::from_utf8_lossy(&body).trim());
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("no message").to_owned()
    } else {
        message
    };
    Err(match status.as_u16() {
        403 => EnrollError::TokenRefused {
            status: 403,
            message,
        },
        code => EnrollError::Refused {
            status: code,
            message,
        },
    })
}

/// Exactly one certificate in PEM text.
fn single_certificate(pem: &[u8], what: &str) -> Result<Vec<u8>, EnrollError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EnrollError::BadAnswer(format!("{what}: not PEM certificates ({e})")))?;
    match certs.as_slice() {
        [one] => Ok(one.to_vec()),
        [] => Err(EnrollError::BadAnswer(format!(
            "{what}: no certificate in the answer"
        ))),
        more => Err(EnrollError::BadAnswer(format!(
            "{what}: {} certificates where one was expected",
            more.len()
        ))),
    }
}

/// Checks the issued certificate: a client certificate chaining to the pinned CA, valid
/// now, CN = the agent id, carrying our public key. Returns its DER.
fn check_certificate(
    pem: &str,
    ca_der: &[u8],
    agent_id: &AgentId,
    key: &rcgen::KeyPair,
) -> Result<Vec<u8>, EnrollError> {
    let bad = |m: String| EnrollError::BadCertificate(m);
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM ({e})")))?;
    let Some((leaf, intermediates)) = certs.split_first() else {
        return Err(bad("no certificate in the answer".into()));
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| bad(format!("the pinned CA cannot be a trust anchor: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .map_err(|e| bad(format!("verifier: {e}")))?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map_err(|e| {
            bad(format!(
                "it is not a client certificate from the pinned CA valid now ({e})"
            ))
        })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(format!("not X.509 ({e})")))?;
    let mut names = cert.subject().iter_common_name();
    let cn = names
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad("it has no common name".into()))?;
    if names.next().is_some() {
        return Err(bad("it has more than one common name".into()));
    }
    if cn != agent_id.to_string() {
        return Err(bad(format!(
            "its common name {:?} is not the agent id {agent_id}",
            truncate(cn)
        )));
    }
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err(bad("it does not carry this agent's public key".into()));
    }
    Ok(leaf.to_vec())
}

/// A certificate as PEM (RFC 7468): base64 in lines of 64 characters.
fn certificate_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A TOML string literal (quoted and escaped).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The configuration written at enrollment.
fn config_text(
    mqtt: &str,
    agent_id: &AgentId,
    ca: Fingerprint,
    proxy: Option<&EnrollProxy>,
    update: Option<(&ServerAddress, &epmc_proto::release::ReleasePublicKey)>,
) -> String {
    let mut t = format!(
        "# epmc-agent configuration, written by `epmc-agent enroll`.\n\
         # Agent id {agent_id}; server CA sha256 {ca}.\n\
         # Check it with: epmc-agent check --config agent.toml\n\
         \n\
         # \"bidirectional\": report and execute the server's orders; \"monitor-only\": report only.\n\
         mode = \"bidirectional\"\n\
         \n\
         [server]\n\
         url = {}\n\
         # Relative paths are taken from this file's directory.\n\
         ca_cert = \"{CA_FILE}\"\n\
         client_cert = \"{CERT_FILE}\"\n\
         client_key = \"{KEY_FILE}\"\n",
        toml_string(mqtt)
    );
    if let Some(p) = proxy {
        t.push_str("\n[proxy]\n");
        t.push_str(&format!(
            "url = {}\n",
            toml_string(&format!("http://{}", bracket(&p.url.host, p.url.port)))
        ));
        if let Some(c) = &p.credentials {
            t.push_str(&format!("username = {}\n", toml_string(c.username())));
            t.push_str(&format!("password = {}\n", toml_string(c.password())));
        }
    }
    if let Some((server, key)) = update {
        t.push_str(
            "\n# Signed self-update from the server the agent enrolled with: only releases signed\n\
             # with this key's private half (kept offline) are installed, never a downgrade.\n\
             [update]\n",
        );
        t.push_str(&format!(
            "url = {}\npublic_key = {}\n",
            toml_string(&format!("https://{}", bracket(&server.host, server.port))),
            toml_string(&key.to_string())
        ));
    }
    t.push_str(
        "\n# No projectors yet. Add one [[target]] section per projector or range, then check\n\
         # this file and restart the agent. Only the addresses listed here are ever contacted.\n\
         #\n\
         # [[target]]\n\
         # address = \"192.168.10.21\"     # ADDR[:PORT], port 3629 by default\n\
         # password = \"monitor-pw\"       # ESC/VP.net password, if the projector has one\n\
         # display_name = \"Room 101\"\n\
         # group = \"Building A\"\n\
         # session = \"poll\"              # or \"hold\": keep the session open for notifications\n\
         #\n\
         # [[target]]\n\
         # address = \"192.168.20.0/24\"   # CIDR[:PORT], at most 65536 addresses\n",
    );
    t
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError + '_ {
    move |source| EnrollError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes each file to a temporary name in `dir`, syncs it, then renames them all into place
/// (in order) and syncs the directory. On a failure before the renames the temporary files
/// are removed and nothing is left.
fn write_all_or_nothing(
    dir: &Path,
    force: bool,
    files: &[(&str, &[u8], u32)],
) -> Result<(), EnrollError> {
    if !dir.exists() {
        create_private_dir(dir)?;
    }
    let mut temps: Vec<(PathBuf, PathBuf)> = Vec::new();
    let result = (|| {
        for (name, content, mode) in files {
            let temp = dir.join(format!(".{name}.enroll-{}", std::process::id()));
            let _ = std::fs::remove_file(&temp);
            temps.push((temp.clone(), dir.join(name)));
            let mut f = create_new(&temp, *mode).map_err(io_error(&temp))?;
            f.write_all(content).map_err(io_error(&temp))?;
            f.sync_all().map_err(io_error(&temp))?;
        }
        // Checked again: another enrollment may have finished meanwhile.
        refuse_existing(dir, force)?;
        Ok(())
    })();
    if let Err(e) = result {
        for (temp, _) in &temps {
            let _ = std::fs::remove_file(temp);
        }
        return Err(e);
    }
    for (i, (temp, target)) in temps.iter().enumerate() {
        if let Err(source) = std::fs::rename(temp, target) {
            // Leave no partial enrollment: what was already renamed goes too.
            for (_, placed) in &temps[..i] {
                let _ = std::fs::remove_file(placed);
            }
            for (t, _) in &temps[i..] {
                let _ = std::fs::remove_file(t);
            }
            return Err(EnrollError::Io {
                path: target.clone(),
                source,
            });
        }
    }
    sync_dir(dir)
}

#[cfg(unix)]
fn create_new(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

#[cfg(not(unix))]
fn create_new(path: &Path, _mode: u32) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<(), EnrollError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<(), EnrollError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), EnrollError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), EnrollError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "epmc1.0123456789abcdef.0123456789abcdef0123456789abcdef0123456789abcdef.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn tokens_parse_and_hide_their_secret() {
        let t: Token = format!("  {TOKEN}\n").parse().unwrap();
        assert_eq!(t.id(), "0123456789abcdef");
        assert_eq!(
            t.ca_fingerprint().to_string(),
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
        );
        assert!(!format!("{t:?}").contains("0123456789abcdef0123456789abcdef0123"));
        // The format's own errors are tested in `epmc_proto::token`; here, that they pass through.
        assert_eq!(
            "epmc1.a.b".parse::<Token>().unwrap_err(),
            TokenError::WrongPartCount(3)
        );
    }

    #[test]
    fn certificates_are_written_as_pem_that_reads_back() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        // Every length modulo 3, and rcgen's own encoder as the reference.
        assert_eq!(
            certificate_pem(cert.der()),
            cert.pem().replace("\r\n", "\n")
        );
        for der in [&b"a"[..], b"ab", b"abc", b"abcd", &[0xff; 100]] {
            let pem = certificate_pem(der);
            let back: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(back.len(), 1, "{pem}");
            assert_eq!(&back[0][..], der);
            assert!(pem.lines().all(|l| l.len() <= 64));
        }
    }

    #[test]
    fn server_addresses() {
        let a: ServerAddress = "https://epmc.example.com:8443".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("epmc.example.com", 8443));
        let a: ServerAddress = "https://[::1]".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 443));
        assert_eq!(a.url("/api/v1/ca"), "https://[::1]:443/api/v1/ca");
        assert!("http://epmc.example.com".parse::<ServerAddress>().is_err());
        assert!(
            "https://epmc.example.com/path"
                .parse::<ServerAddress>()
                .is_err()
        );
        assert!(
            "https://user@epmc.example.com"
                .parse::<ServerAddress>()
                .is_err()
        );
    }

    #[test]
    fn the_written_configuration_is_valid_and_quotes_what_it_holds() {
        let id = AgentId::parse("6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f").unwrap();
        let proxy = EnrollProxy {
            url: ProxyUrl {
                host: "::1".into(),
                port: 3128,
                credentials: None,
            },
            credentials: Some(ProxyCredentials::new("agent", "p\"w\\d").unwrap()),
        };
        let text = config_text(
            "mqtts://[::1]:8883",
            &id,
            Fingerprint([0xab; 32]),
            Some(&proxy),
            None,
        );
        let c = AgentConfig::parse(&text).unwrap();
        assert!(c.update.is_none(), "no release key, no [update]");
        assert_eq!(
            (c.server.url.host.as_str(), c.server.url.port),
            ("::1", 8883)
        );
        assert_eq!(c.server.ca_cert, Path::new("ca.crt"));
        assert_eq!(c.server.client_cert, Path::new("agent.crt"));
        assert_eq!(c.server.client_key, Path::new("agent.key"));
        assert_eq!(c.mode, crate::config::Mode::Bidirectional);
        assert!(c.targets.is_empty());
        let p = c.proxy.expect("proxy");
        assert_eq!((p.host.as_str(), p.port), ("::1", 3128));
        let creds = p.credentials.expect("credentials");
        assert_eq!((creds.username(), creds.password()), ("agent", "p\"w\\d"));
    }

    #[test]
    fn a_release_key_enables_self_update_from_the_enrollment_server() {
        let id = AgentId::parse("6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f").unwrap();
        let server: ServerAddress = "https://[::1]:8443".parse().unwrap();
        let key = epmc_proto::release::ReleasePublicKey::new([7; 32]);
        let text = config_text(
            "mqtts://[::1]:8883",
            &id,
            Fingerprint([0xab; 32]),
            None,
            Some((&server, &key)),
        );
        let c = AgentConfig::parse(&text).unwrap();
        let u = c.update.expect("[update] written");
        assert_eq!((u.url.host.as_str(), u.url.port), ("::1", 8443));
        assert_eq!(u.public_key, key);
    }
}
