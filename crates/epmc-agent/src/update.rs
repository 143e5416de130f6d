//! Self-update: install a new agent binary only if it verifies, never a downgrade, atomically,
//! with a rollback when the new binary fails its self-test.
//!
//! [`Updater::update`] does, in this order, and stops at the first refusal (every refusal is an
//! [`UpdateError`] naming what failed):
//!
//! 1. `GET {url}/api/v1/update/manifest?target=TRIPLE` over HTTPS, trusting only the server CA
//!    pinned at enrollment (no system roots), the answer capped at
//!    [`MAX_SIGNED_MANIFEST_BYTES`].
//! 2. The ed25519 signature over the manifest's exact bytes is verified with the configured
//!    release public key *before* the manifest is parsed ([`UpdateError::Signature`]).
//! 3. The manifest must be for this agent's target triple ([`UpdateError::WrongTarget`]) and
//!    newer than the running version ([`UpdateError::NotNewer`]: a downgrade or the same
//!    version is refused).
//! 4. The binary is downloaded into a temporary file beside the binary it replaces, never
//!    more than the manifest's size ([`UpdateError::TooLarge`], [`UpdateError::Truncated`]);
//!    its SHA-256 must be the manifest's ([`UpdateError::Hash`]). The file is synced and gets
//!    mode 0755.
//! 5. [`install`]: the current binary is kept as `<binary>.previous` (a hard link, so it is
//!    never missing), the new one is renamed over it (atomic), and `<binary> self-test` runs
//!    with a timeout; its first output line must be `epmc-agent <new version>`. If it fails,
//!    `<binary>.previous` is put back just as atomically ([`UpdateError::SelfTest`]).
//!
//! Nothing is left behind by a refusal: temporary files are removed, the installed binary is
//! untouched (or restored). The running process keeps running the old code until it is
//! restarted.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use epmc_proto::release::{
    MANIFEST_PATH, MAX_SIGNED_MANIFEST_BYTES, ReleaseError, ReleaseManifest, ReleasePublicKey,
    ReleaseVersion, Sha256Digest, SignedManifest, TargetTriple, binary_path,
};
use sha2::{Digest, Sha256};

use crate::config::{AgentConfig, HttpsUrl, ProxyUrl};

/// The target triple this agent was built for; it asks for releases for this target.
pub const BUILD_TARGET: &str = env!("EPMC_BUILD_TARGET");
/// The subcommand a new binary must pass before it stays installed.
pub const SELF_TEST_COMMAND: &str = "self-test";
/// Default time the self-test may take.
pub const DEFAULT_SELF_TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a TCP connection to the server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Time the server may stay silent during a request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of an error answer quoted in a message.
const MAX_QUOTED: usize = 300;

/// The running agent's version.
pub fn running_version() -> ReleaseVersion {
    env!("CARGO_PKG_VERSION")
        .parse()
        .unwrap_or(ReleaseVersion::new(0, 0, 0))
}

/// Why an update was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// The agent is not set up for updates (configuration, pinned CA, client).
    #[error("update configuration: {0}")]
    Setup(String),
    /// The server could not be reached, or answered with an error.
    #[error("{url}: {detail}")]
    Fetch {
        /// What was requested.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The server's answer is not a signed manifest.
    #[error("{url}: not a signed manifest: {source}")]
    Envelope {
        /// What was requested.
        url: String,
        /// Why.
        source: ReleaseError,
    },
    /// The signature does not verify with the configured release key.
    #[error(
        "signature: the manifest's signature does not verify with the configured release key {key}: refused (tampered manifest, or signed with another key)"
    )]
    Signature {
        /// The configured key.
        key: ReleasePublicKey,
    },
    /// The signed manifest is not valid.
    #[error("manifest: {0}")]
    Manifest(ReleaseError),
    /// The manifest is for another platform.
    #[error("manifest: the release is for {offered}, this agent is {expected}: refused")]
    WrongTarget {
        /// This agent's target.
        expected: TargetTriple,
        /// The manifest's target.
        offered: TargetTriple,
    },
    /// The release is not newer than the running version.
    #[error(
        "version: {offered} is {} the running {current}: {}",
        if offered == current { "the same as" } else { "older than" },
        if offered == current { "nothing to install" } else { "downgrade refused" }
    )]
    NotNewer {
        /// The running version.
        current: ReleaseVersion,
        /// The manifest's version.
        offered: ReleaseVersion,
    },
    /// The download went past the manifest's size.
    #[error(
        "size: the download exceeds the manifest's {expected} bytes: refused (tampered or wrong binary)"
    )]
    TooLarge {
        /// The manifest's size.
        expected: u64,
    },
    /// The download ended before the manifest's size.
    #[error("size: truncated download: {received} of {expected} bytes{}", cause.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Truncated {
        /// Bytes received.
        received: u64,
        /// The manifest's size.
        expected: u64,
        /// The transport error that ended it, if any.
        cause: Option<String>,
    },
    /// The download's SHA-256 is not the manifest's.
    #[error(
        "hash: the download's SHA-256 is {actual}, the signed manifest says {expected}: refused (tampered binary)"
    )]
    Hash {
        /// The manifest's digest.
        expected: Sha256Digest,
        /// The download's digest.
        actual: Sha256Digest,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The new binary failed its self-test; the previous binary was put back.
    #[error(
        "self-test: the new binary ({version}) failed its self-test: {detail}; the previous binary was restored"
    )]
    SelfTest {
        /// The version that failed.
        version: ReleaseVersion,
        /// How it failed.
        detail: String,
    },
    /// The new binary failed its self-test and the previous one could not be put back.
    #[error(
        "self-test: the new binary ({version}) failed its self-test: {detail}; restoring {} failed: {restore}; move it back by hand",
        previous.display()
    )]
    RollbackFailed {
        /// The version that failed.
        version: ReleaseVersion,
        /// How it failed.
        detail: String,
        /// The kept previous binary.
        previous: PathBuf,
        /// Why restoring it failed.
        restore: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What [`Updater::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Check {
    /// The server has no release for this target.
    NotPublished,
    /// The published release is not newer than the running version.
    UpToDate {
        /// The running version.
        current: ReleaseVersion,
        /// The published one.
        published: ReleaseVersion,
    },
    /// A newer release verified.
    Available {
        /// The running version.
        current: ReleaseVersion,
        /// The verified manifest.
        manifest: ReleaseManifest,
    },
}

/// What [`Updater::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpdateOutcome {
    /// Nothing is published for this target.
    NotPublished,
    /// The new binary is installed and passed its self-test.
    Installed {
        /// The version that ran before.
        from: ReleaseVersion,
        /// What was installed.
        installed: Installed,
    },
}

/// A successful installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The version installed.
    pub version: ReleaseVersion,
    /// The binary replaced.
    pub binary: PathBuf,
    /// Where the previous binary is kept.
    pub previous: PathBuf,
}

/// How the new binary's self-test is run: `<binary> self-test [ARGS]`.
#[derive(Debug, Clone)]
pub struct SelfTest {
    /// Arguments after `self-test`.
    pub args: Vec<OsString>,
    /// How long it may take before it is killed and counted as failed.
    pub timeout: Duration,
}

impl SelfTest {
    /// `self-test --config FILE` (the new binary must load the agent's configuration) with
    /// the default timeout.
    pub fn with_config(config: &Path) -> SelfTest {
        SelfTest {
            args: vec!["--config".into(), config.as_os_str().to_owned()],
            timeout: DEFAULT_SELF_TEST_TIMEOUT,
        }
    }
}

impl Default for SelfTest {
    fn default() -> Self {
        SelfTest {
            args: Vec::new(),
            timeout: DEFAULT_SELF_TEST_TIMEOUT,
        }
    }
}

/// Fetches, verifies and installs releases from one server. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Updater {
    client: reqwest::Client,
    base: String,
    public_key: ReleasePublicKey,
    target: TargetTriple,
    current: ReleaseVersion,
}

impl Updater {
    /// An updater for the server at `url` whose certificate must chain to `ca_pem` (the CA
    /// pinned at enrollment) and nothing else, through `proxy` when given (and no other
    /// proxy, whatever the environment says). It asks for [`BUILD_TARGET`] releases and
    /// compares them with [`running_version`].
    pub fn new(
        url: &HttpsUrl,
        ca_pem: &[u8],
        public_key: ReleasePublicKey,
        proxy: Option<&ProxyUrl>,
    ) -> Result<Updater, UpdateError> {
        let ca = reqwest::Certificate::from_pem(ca_pem)
            .map_err(|e| UpdateError::Setup(format!("the pinned server CA: {e}")))?;
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([ca])
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT);
        builder = match proxy {
            Some(p) => builder.proxy(
                reqwest::Proxy::all(format!("http://{}:{}", bracket(&p.host), p.port))
                    .map_err(|e| UpdateError::Setup(format!("proxy: {e}")))?,
            ),
            None => builder.no_proxy(),
        };
        let client = builder
            .build()
            .map_err(|e| UpdateError::Setup(format!("HTTPS client: {e}")))?;
        Ok(Updater {
            client,
            base: url.to_string(),
            public_key,
            target: TargetTriple::new(BUILD_TARGET)
                .map_err(|e| UpdateError::Setup(e.to_string()))?,
            current: running_version(),
        })
    }

    /// The updater a configuration describes: its `[update]` section, the `[server]` CA and
    /// the `[proxy]`.
    pub fn from_config(config: &AgentConfig) -> Result<Updater, UpdateError> {
        let update = config.update.as_ref().ok_or_else(|| {
            UpdateError::Setup(
                "no [update] section (url and public_key) in the configuration".into(),
            )
        })?;
        let ca_path = &config.server.ca_cert;
        let ca = fs::read(ca_path).map_err(|e| {
            UpdateError::Setup(format!("the pinned server CA {}: {e}", ca_path.display()))
        })?;
        Updater::new(&update.url, &ca, update.public_key, config.proxy.as_ref())
    }

    /// Compares releases with `version` instead of the running version.
    pub fn with_current_version(mut self, version: ReleaseVersion) -> Updater {
        self.current = version;
        self
    }

    /// Asks for releases for `target` instead of [`BUILD_TARGET`].
    pub fn with_target(mut self, target: TargetTriple) -> Updater {
        self.target = target;
        self
    }

    /// The version releases are compared with.
    pub fn current_version(&self) -> ReleaseVersion {
        self.current
    }

    /// Fetches and verifies the newest manifest; nothing is downloaded.
    pub async fn check(&self) -> Result<Check, UpdateError> {
        let Some(manifest) = self.fetch_manifest().await? else {
            return Ok(Check::NotPublished);
        };
        if manifest.version() <= self.current {
            return Ok(Check::UpToDate {
                current: self.current,
                published: manifest.version(),
            });
        }
        Ok(Check::Available {
            current: self.current,
            manifest,
        })
    }

    /// Fetches the manifest for this target, verifies its signature, then parses it and
    /// checks its target. `None` when the server has none.
    async fn fetch_manifest(&self) -> Result<Option<ReleaseManifest>, UpdateError> {
        let url = format!("{}{MANIFEST_PATH}?target={}", self.base, self.target);
        let fetch = |detail: String| UpdateError::Fetch {
            url: url.clone(),
            detail,
        };
        let mut response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| fetch(describe(&e)))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(fetch(status_message(response).await));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fetch(describe(&e)))? {
            if body.len() + chunk.len() > MAX_SIGNED_MANIFEST_BYTES {
                return Err(UpdateError::Envelope {
                    url,
                    source: ReleaseError::TooLarge {
                        what: "signed manifest",
                        size: body.len() + chunk.len(),
                        max: MAX_SIGNED_MANIFEST_BYTES,
                    },
                });
            }
            body.extend_from_slice(&chunk);
        }
        let signed = SignedManifest::from_json(&body).map_err(|source| UpdateError::Envelope {
            url: url.clone(),
            source,
        })?;
        let manifest = verify_manifest(&signed, &self.public_key)?;
        if *manifest.target() != self.target {
            return Err(UpdateError::WrongTarget {
                expected: self.target.clone(),
                offered: manifest.target().clone(),
            });
        }
        Ok(Some(manifest))
    }

    /// Downloads the binary `manifest` describes into a temporary file beside `binary`,
    /// capped at the manifest's size and checked against its SHA-256.
    pub async fn download(
        &self,
        manifest: &ReleaseManifest,
        binary: &Path,
    ) -> Result<Staged, UpdateError> {
        let url = format!(
            "{}{}",
            self.base,
            binary_path(&manifest.version(), manifest.target())
        );
        let fetch = |detail: String| UpdateError::Fetch {
            url: url.clone(),
            detail,
        };
        let mut response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| fetch(describe(&e)))?;
        if !response.status().is_success() {
            return Err(fetch(status_message(response).await));
        }
        if let Some(len) = response.content_length()
            && len > manifest.size()
        {
            return Err(UpdateError::TooLarge {
                expected: manifest.size(),
            });
        }
        let mut receiver = Receiver::create(binary, manifest)?;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => receiver.accept(&chunk)?,
                Ok(None) => break,
                Err(e) => return Err(receiver.cut(describe(&e))),
            }
        }
        receiver.finish()
    }

    /// Checks, downloads and installs the newest release over `binary`, then runs its
    /// self-test; see the [module docs](self).
    pub async fn update(
        &self,
        binary: &Path,
        self_test: &SelfTest,
    ) -> Result<UpdateOutcome, UpdateError> {
        let manifest = match self.check().await? {
            Check::NotPublished => return Ok(UpdateOutcome::NotPublished),
            Check::UpToDate { current, published } => {
                return Err(UpdateError::NotNewer {
                    current,
                    offered: published,
                });
            }
            Check::Available { manifest, .. } => manifest,
        };
        let staged = self.download(&manifest, binary).await?;
        let binary = binary.to_owned();
        let test = self_test.clone();
        let from = self.current;
        let installed = tokio::task::spawn_blocking(move || install(staged, &binary, &test))
            .await
            .map_err(|e| UpdateError::Setup(format!("installer task: {e}")))??;
        Ok(UpdateOutcome::Installed { from, installed })
    }
}

impl Updater {
    /// The service's update loop: every `interval` (the configuration's
    /// `check_interval_seconds`), [`Updater::update`]. Returns the installation as soon as one
    /// succeeds (the caller then restarts into the new binary), or `None` once `stop` turns
    /// true or its sender is gone. A refusal is logged and the next round tries again.
    pub async fn watch(
        &self,
        binary: &Path,
        test: &SelfTest,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<Installed> {
        loop {
            if *stop.borrow() {
                return None;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    continue;
                }
            }
            match self.update(binary, test).await {
                Ok(UpdateOutcome::Installed { from, installed }) => {
                    tracing::info!(%from, to = %installed.version, "agent updated");
                    return Some(installed);
                }
                Ok(UpdateOutcome::NotPublished) => {
                    tracing::debug!(target = %self.target, "no agent release published");
                }
                Err(UpdateError::NotNewer { current, offered }) if current == offered => {
                    tracing::debug!(%current, "agent up to date");
                }
                Err(e) => tracing::warn!(error = %e, "agent update refused"),
            }
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// A reqwest error with its causes (the TLS reason is in the chain).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn status_message(response: reqwest::Response) -> String {
    let status = response.status();
    let mut body = Vec::new();
    let mut response = response;
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_QUOTED {
            break;
        }
    }
    body.truncate(MAX_QUOTED);
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

/// Verifies `signed`'s signature over the manifest's exact bytes with `key`, and only then
/// parses the manifest.
pub fn verify_manifest(
    signed: &SignedManifest,
    key: &ReleasePublicKey,
) -> Result<ReleaseManifest, UpdateError> {
    let bytes = signed.manifest.as_bytes();
    let signature = signed
        .signature()
        .map_err(|_| UpdateError::Signature { key: *key })?;
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(bytes, signature.as_bytes())
        .map_err(|_| UpdateError::Signature { key: *key })?;
    ReleaseManifest::from_bytes(bytes).map_err(UpdateError::Manifest)
}

/// A verified download waiting beside the binary it will replace; removed when dropped
/// uninstalled.
#[derive(Debug)]
pub struct Staged {
    path: Option<PathBuf>,
    manifest: ReleaseManifest,
}

impl Staged {
    /// The temporary file.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// The manifest it matches.
    pub fn manifest(&self) -> &ReleaseManifest {
        &self.manifest
    }

    fn take(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn staging_path(binary: &Path, what: &str) -> Result<PathBuf, UpdateError> {
    let name = binary.file_name().ok_or_else(|| UpdateError::Io {
        path: binary.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{what}-{}", std::process::id()));
    Ok(binary.with_file_name(tmp))
}

/// `<binary>.previous`.
pub fn previous_path(binary: &Path) -> PathBuf {
    let mut s = binary.as_os_str().to_owned();
    s.push(".previous");
    PathBuf::from(s)
}

/// Writes a download into its temporary file, enforcing the manifest's size and hash.
#[derive(Debug)]
pub struct Receiver {
    file: fs::File,
    staged: Staged,
    hasher: Sha256,
    received: u64,
}

impl Receiver {
    /// Creates the temporary file beside `binary` (replacing a stale one of this process).
    pub fn create(binary: &Path, manifest: &ReleaseManifest) -> Result<Receiver, UpdateError> {
        let path = staging_path(binary, "update")?;
        let _ = fs::remove_file(&path);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o700);
        }
        let file = options.open(&path).map_err(io_err(&path))?;
        Ok(Receiver {
            file,
            staged: Staged {
                path: Some(path),
                manifest: manifest.clone(),
            },
            hasher: Sha256::new(),
            received: 0,
        })
    }

    /// Takes the next piece; refuses anything past the manifest's size.
    pub fn accept(&mut self, chunk: &[u8]) -> Result<(), UpdateError> {
        let expected = self.staged.manifest.size();
        if self.received + chunk.len() as u64 > expected {
            return Err(UpdateError::TooLarge { expected });
        }
        self.file
            .write_all(chunk)
            .map_err(io_err(self.staged.path()))?;
        self.hasher.update(chunk);
        self.received += chunk.len() as u64;
        Ok(())
    }

    /// The download broke off: a truncation, or a transport error at the full size.
    pub fn cut(self, cause: String) -> UpdateError {
        UpdateError::Truncated {
            received: self.received,
            expected: self.staged.manifest.size(),
            cause: Some(cause),
        }
    }

    /// The download ended: checks size and SHA-256, syncs the file and makes it executable.
    pub fn finish(self) -> Result<Staged, UpdateError> {
        let manifest = &self.staged.manifest;
        if self.received != manifest.size() {
            return Err(UpdateError::Truncated {
                received: self.received,
                expected: manifest.size(),
                cause: None,
            });
        }
        let actual = Sha256Digest::new(self.hasher.finalize().into());
        if actual != *manifest.sha256() {
            return Err(UpdateError::Hash {
                expected: *manifest.sha256(),
                actual,
            });
        }
        let path = self.staged.path().to_owned();
        self.file.sync_all().map_err(io_err(&path))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            self.file
                .set_permissions(fs::Permissions::from_mode(0o755))
                .map_err(io_err(&path))?;
        }
        Ok(self.staged)
    }
}

/// Installs a verified download over `binary`: keeps the current one as `<binary>.previous`,
/// renames the new one into place, runs its self-test, and restores the previous one if the
/// self-test fails. `binary` must exist.
pub fn install(staged: Staged, binary: &Path, test: &SelfTest) -> Result<Installed, UpdateError> {
    let version = staged.manifest().version();
    let dir = parent(binary);
    if !binary.is_file() {
        return Err(UpdateError::Io {
            path: binary.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no binary to replace"),
        });
    }
    let previous = previous_path(binary);
    // previous := binary, atomically (the old `.previous` is replaced, never missing).
    link_or_copy(binary, &staging_path(binary, "previous")?, &previous)?;
    sync_dir(dir)?;
    let new = staged.take();
    fs::rename(&new, binary).map_err(|e| {
        let _ = fs::remove_file(&new);
        io_err(binary)(e)
    })?;
    sync_dir(dir)?;
    match run_self_test(binary, version, test) {
        Ok(()) => Ok(Installed {
            version,
            binary: binary.to_owned(),
            previous,
        }),
        Err(detail) => {
            tracing::warn!(%version, detail, "self-test failed; restoring the previous binary");
            match link_or_copy(&previous, &staging_path(binary, "rollback")?, binary)
                .and_then(|()| sync_dir(dir))
            {
                Ok(()) => Err(UpdateError::SelfTest { version, detail }),
                Err(e) => Err(UpdateError::RollbackFailed {
                    version,
                    detail,
                    previous,
                    restore: e.to_string(),
                }),
            }
        }
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes `to` a copy of `from` atomically: a hard link (or a synced copy where links are not
/// possible) at `tmp`, renamed to `to`.
fn link_or_copy(from: &Path, tmp: &Path, to: &Path) -> Result<(), UpdateError> {
    let _ = fs::remove_file(tmp);
    if fs::hard_link(from, tmp).is_err() {
        fs::copy(from, tmp).map_err(io_err(tmp))?;
        fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err(tmp))?;
    }
    let renamed = fs::rename(tmp, to).map_err(io_err(to));
    // rename() leaves `tmp` in place when both already name the same file (as `binary` and
    // `.previous` do after a rollback); either way it must not stay.
    let _ = fs::remove_file(tmp);
    renamed
}

fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Most output of the self-test kept for the message.
const MAX_OUTPUT: usize = 4096;

/// Runs `<binary> self-test ARGS`; `Err` says how it failed.
fn run_self_test(binary: &Path, version: ReleaseVersion, test: &SelfTest) -> Result<(), String> {
    let mut command = Command::new(binary);
    command
        .arg(SELF_TEST_COMMAND)
        .args(&test.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // "Text file busy": another thread of this process forked while the new file was still
    // open for writing, and the child has not reached exec yet. It passes within moments.
    let mut attempts = 0;
    let mut child = loop {
        match command.spawn() {
            Ok(child) => break child,
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot start it: {e}")),
        }
    };
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() >= test.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("no answer within {:?}, killed", test.timeout));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("waiting for it failed: {e}")),
        }
    };
    // A grandchild may hold the pipes open: wait a moment for the output, no longer.
    let out = stdout
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let err = stderr
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let status = status?;
    let err_tail = err.trim();
    if !status.success() {
        return Err(if err_tail.is_empty() {
            format!("it exited with {status}")
        } else {
            format!("it exited with {status}: {err_tail}")
        });
    }
    let expected = format!("epmc-agent {version}");
    let first = out.lines().next().unwrap_or("").trim();
    if first != expected && !first.starts_with(&format!("{expected} ")) {
        return Err(format!(
            "it reported {first:?}, expected a line starting with {expected:?}"
        ));
    }
    Ok(())
}

/// Reads a pipe to its end on a thread (keeping at most [`MAX_OUTPUT`] bytes).
fn collect(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = MAX_OUTPUT.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
        });
    } else {
        let _ = tx.send(String::new());
    }
    rx
}

/// What `epmc-agent self-test` checks in the running binary: the cryptography updates and
/// the server connection need (SHA-256 and ed25519 known answers, a TLS client), and, with
/// `config`, that the agent's configuration loads. Returns the line to print.
pub fn self_test(config: Option<&Path>) -> Result<String, String> {
    // FIPS 180-2 "abc".
    let abc: [u8; 32] = Sha256::digest(b"abc").into();
    if Sha256Digest::new(abc).to_string()
        != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    {
        return Err("SHA-256 known answer failed".into());
    }
    // RFC 8032 section 7.1, TEST 2.
    let key: ReleasePublicKey =
        "ed25519:3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
            .parse()
            .map_err(|e: ReleaseError| e.to_string())?;
    let signed = SignedManifest {
        manifest: "r".into(),
        signature: "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
                    085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
            .into(),
    };
    match verify_manifest(&signed, &key) {
        // The signature verified; "r" is not a manifest, which is the expected refusal.
        Err(UpdateError::Manifest(_)) => {}
        other => return Err(format!("ed25519 known answer failed: {other:?}")),
    }
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| format!("TLS client: {e}"))?;
    if let Some(path) = config {
        AgentConfig::load(path).map_err(|e| format!("configuration: {e}"))?;
    }
    Ok(format!(
        "epmc-agent {} {BUILD_TARGET}: self-test ok",
        running_version()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(content: &[u8]) -> ReleaseManifest {
        ReleaseManifest::new(
            "2.0.0".parse().unwrap(),
            TargetTriple::new(BUILD_TARGET).unwrap(),
            content.len() as u64,
            Sha256Digest::new(Sha256::digest(content).into()),
            epmc_proto::release::FileName::new("epmc-agent").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_running_version_parses() {
        assert_eq!(
            running_version().to_string(),
            env!("CARGO_PKG_VERSION"),
            "the crate version must be MAJOR.MINOR.PATCH"
        );
    }

    #[test]
    fn self_test_passes_in_this_build() {
        let line = self_test(None).unwrap();
        assert!(
            line.starts_with(&format!("epmc-agent {} ", running_version())),
            "{line}"
        );
    }

    fn staged_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn receiver_accepts_exactly_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("epmc-agent");
        let content = b"0123456789abcdef";
        let m = manifest(content);

        let mut r = Receiver::create(&bin, &m).unwrap();
        r.accept(&content[..5]).unwrap();
        r.accept(&content[5..]).unwrap();
        let staged = r.finish().unwrap();
        assert_eq!(fs::read(staged.path()).unwrap(), content);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(staged.path()).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o755);
        }
        drop(staged);
        assert!(staged_files(dir.path()).is_empty());

        // One byte too many.
        let mut r = Receiver::create(&bin, &m).unwrap();
        r.accept(content).unwrap();
        let e = r.accept(b"x").unwrap_err();
        assert!(matches!(e, UpdateError::TooLarge { expected: 16 }), "{e}");
        drop(r);
        // Short.
        let mut r = Receiver::create(&bin, &m).unwrap();
        r.accept(&content[..15]).unwrap();
        let e = r.finish().unwrap_err();
        assert!(
            matches!(
                e,
                UpdateError::Truncated {
                    received: 15,
                    expected: 16,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
        // Same size, other bytes.
        let mut r = Receiver::create(&bin, &m).unwrap();
        r.accept(b"0123456789abcdeF").unwrap();
        let e = r.finish().unwrap_err();
        assert!(matches!(e, UpdateError::Hash { .. }), "{e}");
        assert!(e.to_string().starts_with("hash:"), "{e}");
        assert!(staged_files(dir.path()).is_empty(), "temporary files left");
    }

    #[test]
    fn the_signature_is_checked_before_the_manifest_is_read() {
        // RFC 8032 section 7.1, TEST 2: a valid signature over one byte that is no manifest.
        let key: ReleasePublicKey =
            "ed25519:3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
                .parse()
                .unwrap();
        let sig = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
                   085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00";
        let signed = |manifest: &str, signature: &str| SignedManifest {
            manifest: manifest.into(),
            signature: signature.into(),
        };
        assert!(matches!(
            verify_manifest(&signed("r", sig), &key),
            Err(UpdateError::Manifest(_))
        ));
        // Any other text, or a malformed or other signature: refused as a signature
        // failure, whatever the text holds.
        for (text, signature) in [
            ("s", sig),
            ("not json at all {", sig),
            ("r", &sig[..126]),
            ("r", "zz"),
            ("r", ""),
        ] {
            let e = verify_manifest(&signed(text, signature), &key).unwrap_err();
            assert!(matches!(e, UpdateError::Signature { .. }), "{text:?}: {e}");
        }
    }

    #[test]
    fn messages_name_what_failed() {
        let v = |s: &str| s.parse::<ReleaseVersion>().unwrap();
        let down = UpdateError::NotNewer {
            current: v("1.2.0"),
            offered: v("1.1.9"),
        };
        assert_eq!(
            down.to_string(),
            "version: 1.1.9 is older than the running 1.2.0: downgrade refused"
        );
        let same = UpdateError::NotNewer {
            current: v("1.2.0"),
            offered: v("1.2.0"),
        };
        assert_eq!(
            same.to_string(),
            "version: 1.2.0 is the same as the running 1.2.0: nothing to install"
        );
    }
}
