//! Agent releases: the offline ed25519 release key, signed manifests, and the data
//! directory's `releases/` folder the HTTPS server serves them from.
//!
//! The release key never reaches the server. On the release manager's machine:
//!
//! ```text
//! epmc-server release keygen --out release.key      # prints ed25519:<hex>, for the agents' [update] public_key
//! epmc-server release sign --key release.key --binary target/release/epmc-agent \
//!     --version 1.2.0 [--target x86_64-unknown-linux-gnu] --out signed/
//! ```
//!
//! `sign` writes `signed/manifest.json` ([`ReleaseManifest`]: version, target, size, SHA-256,
//! file name) and `signed/manifest.json.sig`, the detached signature over the manifest's exact
//! bytes (128 hex digits). On the server:
//!
//! ```text
//! epmc-server release publish --manifest signed/manifest.json --binary epmc-agent [--public-key ed25519:…]
//! ```
//!
//! checks that the binary matches the manifest (size and SHA-256), that the version is newer
//! than the one published for that target (agents never downgrade), optionally that the
//! signature verifies with the given public key, and then installs, never overwriting:
//!
//! | path under `DATA/releases/` | content |
//! |---|---|
//! | `TARGET/VERSION/manifest.json` | the manifest, byte for byte as signed |
//! | `TARGET/VERSION/manifest.json.sig` | its signature |
//! | `TARGET/VERSION/FILE` | the binary |
//! | `TARGET/latest` | the newest published version for that target |
//!
//! A version directory appears complete or not at all (written under a temporary name, then
//! renamed), and `latest` is replaced atomically after it. [`ReleaseStore`] reads this layout
//! for the HTTPS routes.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use epmc_proto::release::{
    FileName, MAX_MANIFEST_BYTES, MAX_RELEASE_SIZE, ReleaseError as FormatError, ReleaseManifest,
    ReleasePublicKey, ReleaseSignature, ReleaseVersion, Sha256Digest, SignedManifest, TargetTriple,
};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

/// The data directory's folder of published releases.
pub const RELEASES_DIR: &str = "releases";
/// The manifest's file name, in `sign`'s output directory and in a published version.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The signature's file name, beside the manifest.
pub const SIGNATURE_FILE: &str = "manifest.json.sig";
/// In a target's folder: the newest published version.
pub const LATEST_FILE: &str = "latest";

/// The target triple this `epmc-server` was built for: `sign`'s default target.
pub const BUILD_TARGET: &str = env!("EPMC_BUILD_TARGET");

/// Why a release command failed. Every variant names the file or value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file exists and will not be overwritten.
    #[error("{}: already exists; it will not be overwritten", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The release key can be read by the group or others.
    #[error(
        "{}: private key file has mode {mode:04o}, readable by group or others; run chmod 600 on it",
        path.display()
    )]
    LoosePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file's content cannot be used.
    #[error("{}: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A version, target, file name or key given on the command line is malformed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The signature does not verify with the given public key.
    #[error(
        "{}: the signature does not verify with {key}: the manifest was changed or signed with another key",
        path.display()
    )]
    BadSignature {
        /// The signature file.
        path: PathBuf,
        /// The public key tried.
        key: ReleasePublicKey,
    },
    /// The binary is not the one the manifest describes.
    #[error("{}: does not match the manifest: {detail}", path.display())]
    BinaryMismatch {
        /// The binary.
        path: PathBuf,
        /// Which of size and SHA-256 differs.
        detail: String,
    },
    /// This version is published already.
    #[error("{target} {version} is already published ({})", path.display())]
    AlreadyPublished {
        /// The target.
        target: TargetTriple,
        /// The version.
        version: ReleaseVersion,
        /// Its folder.
        path: PathBuf,
    },
    /// The version is not newer than the published one.
    #[error(
        "{target} {version} is not newer than the published {latest}: agents never downgrade; publish a higher version"
    )]
    NotNewer {
        /// The target.
        target: TargetTriple,
        /// The version given.
        version: ReleaseVersion,
        /// The version published.
        latest: ReleaseVersion,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, detail: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// The offline release signing key (ed25519).
pub struct ReleaseKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseKey")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl ReleaseKey {
    /// Generates a key; returns it with its PKCS#8 PEM form.
    pub fn generate() -> Result<(ReleaseKey, String), Error> {
        let generated =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| Error::Io {
                path: PathBuf::from("(new release key)"),
                source: io::Error::other(e.to_string()),
            })?;
        let pem = generated.serialize_pem();
        let key = ReleaseKey::from_pem(pem.as_bytes(), Path::new("(new release key)"))?;
        Ok((key, pem))
    }

    /// Parses a PKCS#8 PEM ed25519 key (`PRIVATE KEY`, as written by [`write_new_key`] or
    /// `openssl genpkey -algorithm ed25519`); `path` names it in errors.
    pub fn from_pem(pem: &[u8], path: &Path) -> Result<ReleaseKey, Error> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| invalid(path, format!("not a PKCS#8 PEM private key: {e}")))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|e| invalid(path, format!("not an ed25519 private key: {e}")))?;
        Ok(ReleaseKey { pair })
    }

    /// Loads the key file; refuses one that the group or others can read.
    pub fn load(path: &Path) -> Result<ReleaseKey, Error> {
        check_private_mode(path)?;
        let pem = read_bounded(path, 16 * 1024)?;
        ReleaseKey::from_pem(&pem, path)
    }

    /// The public key, in the form the agents' configuration takes.
    pub fn public_key(&self) -> ReleasePublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        ReleasePublicKey::new(raw)
    }

    /// Signs `message` (a manifest's exact bytes).
    pub fn sign(&self, message: &[u8]) -> ReleaseSignature {
        let mut raw = [0u8; 64];
        raw.copy_from_slice(self.pair.sign(message).as_ref());
        ReleaseSignature::new(raw)
    }
}

/// Whether `signature` is `key`'s signature over `message`.
pub fn verify(key: &ReleasePublicKey, message: &[u8], signature: &ReleaseSignature) -> bool {
    UnparsedPublicKey::new(&signature::ED25519, key.as_bytes())
        .verify(message, signature.as_bytes())
        .is_ok()
}

/// `release keygen`: generates a key and writes it to `path` (mode 0600, never overwriting).
/// Returns the public key.
pub fn write_new_key(path: &Path) -> Result<ReleasePublicKey, Error> {
    let (key, pem) = ReleaseKey::generate()?;
    write_new(path, pem.as_bytes(), true)?;
    Ok(key.public_key())
}

/// The SHA-256 and size of a file, read in blocks.
fn hash_file(path: &Path) -> Result<(Sha256Digest, u64), Error> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    hash_reader(&mut file, path, None)
}

/// Hashes what `reader` yields, copying it to `copy` when given.
fn hash_reader(
    reader: &mut impl Read,
    path: &Path,
    mut copy: Option<(&mut fs::File, &Path)>,
) -> Result<(Sha256Digest, u64), Error> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
        if size > MAX_RELEASE_SIZE {
            return Err(invalid(
                path,
                format!("larger than {MAX_RELEASE_SIZE} bytes, the largest release"),
            ));
        }
        if let Some((file, copy_path)) = copy.as_mut() {
            file.write_all(&buf[..n]).map_err(io_err(copy_path))?;
        }
    }
    Ok((Sha256Digest::new(hasher.finalize().into()), size))
}

/// The manifest of `binary` (its size, SHA-256 and file name).
pub fn manifest_for(
    binary: &Path,
    version: ReleaseVersion,
    target: TargetTriple,
) -> Result<ReleaseManifest, Error> {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid(binary, "not a file name"))?;
    let file = FileName::new(name)?;
    let (sha256, size) = hash_file(binary)?;
    ReleaseManifest::new(version, target, size, sha256, file).map_err(Error::from)
}

/// What [`sign`] wrote.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The manifest.
    pub manifest: ReleaseManifest,
    /// `OUT/manifest.json`.
    pub manifest_path: PathBuf,
    /// `OUT/manifest.json.sig`.
    pub signature_path: PathBuf,
    /// The public key that verifies it.
    pub public_key: ReleasePublicKey,
}

/// `release sign`: writes `out/manifest.json` and `out/manifest.json.sig` for `binary`
/// (creating `out`, never overwriting). The signature is checked before it is written.
pub fn sign(
    key: &ReleaseKey,
    binary: &Path,
    version: ReleaseVersion,
    target: TargetTriple,
    out: &Path,
) -> Result<Signed, Error> {
    let manifest = manifest_for(binary, version, target)?;
    let bytes = manifest.to_bytes();
    let signature = key.sign(&bytes);
    let public_key = key.public_key();
    if !verify(&public_key, &bytes, &signature) {
        return Err(invalid(binary, "the fresh signature does not verify"));
    }
    fs::create_dir_all(out).map_err(io_err(out))?;
    let manifest_path = out.join(MANIFEST_FILE);
    let signature_path = out.join(SIGNATURE_FILE);
    for p in [&manifest_path, &signature_path] {
        if p.exists() {
            return Err(Error::Exists { path: p.clone() });
        }
    }
    write_new(&manifest_path, &bytes, false)?;
    write_new(&signature_path, format!("{signature}\n").as_bytes(), false)?;
    Ok(Signed {
        manifest,
        manifest_path,
        signature_path,
        public_key,
    })
}

/// What [`publish`] installed.
#[derive(Debug, Clone)]
pub struct Published {
    /// The manifest.
    pub manifest: ReleaseManifest,
    /// The version folder.
    pub dir: PathBuf,
    /// The version published before, if any.
    pub previous: Option<ReleaseVersion>,
}

/// Reads a signed manifest pair from files: the manifest (bytes kept exactly) and its
/// signature.
pub fn read_signed(manifest: &Path, signature: &Path) -> Result<SignedManifest, Error> {
    let bytes = read_bounded(manifest, MAX_MANIFEST_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| invalid(manifest, "not UTF-8 text"))?;
    ReleaseManifest::from_bytes(text.as_bytes()).map_err(|e| invalid(manifest, e.to_string()))?;
    let sig = read_bounded(signature, 1024)?;
    let sig = String::from_utf8(sig).map_err(|_| invalid(signature, "not UTF-8 text"))?;
    let parsed: ReleaseSignature = sig
        .parse()
        .map_err(|e: FormatError| invalid(signature, e.to_string()))?;
    Ok(SignedManifest {
        manifest: text,
        signature: parsed.to_string(),
    })
}

/// `release publish`: installs a signed manifest and its binary into
/// `releases_dir` (`DATA/releases`); see the [module docs](self). With `public_key`, the
/// signature must verify with it.
pub fn publish(
    releases_dir: &Path,
    manifest_path: &Path,
    signature_path: &Path,
    binary: &Path,
    public_key: Option<&ReleasePublicKey>,
) -> Result<Published, Error> {
    let signed = read_signed(manifest_path, signature_path)?;
    let manifest = ReleaseManifest::from_bytes(signed.manifest.as_bytes())
        .map_err(|e| invalid(manifest_path, e.to_string()))?;
    if let Some(key) = public_key {
        let sig = signed.signature()?;
        if !verify(key, signed.manifest.as_bytes(), &sig) {
            return Err(Error::BadSignature {
                path: signature_path.to_owned(),
                key: *key,
            });
        }
    }
    let target = manifest.target().clone();
    let version = manifest.version();
    let target_dir = releases_dir.join(target.as_str());
    fs::create_dir_all(&target_dir).map_err(io_err(&target_dir))?;
    let store = ReleaseStore::new(releases_dir);
    let previous = store.latest_version(&target)?;
    let version_dir = target_dir.join(version.to_string());
    if version_dir.exists() {
        return Err(Error::AlreadyPublished {
            target,
            version,
            path: version_dir,
        });
    }
    if let Some(latest) = previous
        && version <= latest
    {
        return Err(Error::NotNewer {
            target,
            version,
            latest,
        });
    }

    // Everything goes into a temporary folder first, which is renamed when complete.
    let staging = target_dir.join(format!(".{version}.{}.tmp", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    fs::create_dir(&staging).map_err(io_err(&staging))?;
    let result = (|| {
        let copy_path = staging.join(manifest.file().as_str());
        let mut copy = create_file(&copy_path, 0o644)?;
        let mut source = fs::File::open(binary).map_err(io_err(binary))?;
        let (sha256, size) = hash_reader(&mut source, binary, Some((&mut copy, &copy_path)))?;
        if size != manifest.size() {
            return Err(Error::BinaryMismatch {
                path: binary.to_owned(),
                detail: format!("{size} bytes, the manifest says {}", manifest.size()),
            });
        }
        if sha256 != *manifest.sha256() {
            return Err(Error::BinaryMismatch {
                path: binary.to_owned(),
                detail: format!("SHA-256 {sha256}, the manifest says {}", manifest.sha256()),
            });
        }
        copy.sync_all().map_err(io_err(&copy_path))?;
        write_new(
            &staging.join(MANIFEST_FILE),
            signed.manifest.as_bytes(),
            false,
        )?;
        write_new(
            &staging.join(SIGNATURE_FILE),
            format!("{}\n", signed.signature).as_bytes(),
            false,
        )?;
        sync_dir(&staging)?;
        fs::rename(&staging, &version_dir).map_err(io_err(&version_dir))?;
        sync_dir(&target_dir)?;
        let latest = target_dir.join(LATEST_FILE);
        replace_file(&latest, format!("{version}\n").as_bytes())?;
        Ok(())
    })();
    if result.is_err() && staging.exists() {
        let _ = fs::remove_dir_all(&staging);
    }
    result?;
    Ok(Published {
        manifest,
        dir: version_dir,
        previous,
    })
}

/// The published releases, as the HTTPS routes read them.
#[derive(Debug, Clone)]
pub struct ReleaseStore {
    root: PathBuf,
}

impl ReleaseStore {
    /// The store at `root` (`DATA/releases`); it need not exist.
    pub fn new(root: impl Into<PathBuf>) -> ReleaseStore {
        ReleaseStore { root: root.into() }
    }

    /// Its folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The newest published version for `target`, if any.
    pub fn latest_version(&self, target: &TargetTriple) -> Result<Option<ReleaseVersion>, Error> {
        let path = self.root.join(target.as_str()).join(LATEST_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e: FormatError| invalid(&path, e.to_string()))
    }

    /// The signed manifest of `version` for `target`, if published.
    pub fn signed_manifest(
        &self,
        target: &TargetTriple,
        version: ReleaseVersion,
    ) -> Result<Option<SignedManifest>, Error> {
        let dir = self.root.join(target.as_str()).join(version.to_string());
        if !dir.is_dir() {
            return Ok(None);
        }
        read_signed(&dir.join(MANIFEST_FILE), &dir.join(SIGNATURE_FILE)).map(Some)
    }

    /// The newest signed manifest for `target`, if any.
    pub fn latest(&self, target: &TargetTriple) -> Result<Option<SignedManifest>, Error> {
        match self.latest_version(target)? {
            Some(v) => self.signed_manifest(target, v),
            None => Ok(None),
        }
    }

    /// The binary of `version` for `target` (its path and manifest), if published.
    pub fn binary(
        &self,
        target: &TargetTriple,
        version: ReleaseVersion,
    ) -> Result<Option<(PathBuf, ReleaseManifest)>, Error> {
        let Some(signed) = self.signed_manifest(target, version)? else {
            return Ok(None);
        };
        let dir = self.root.join(target.as_str()).join(version.to_string());
        let manifest = ReleaseManifest::from_bytes(signed.manifest.as_bytes())
            .map_err(|e| invalid(&dir.join(MANIFEST_FILE), e.to_string()))?;
        if manifest.version() != version || manifest.target() != target {
            return Err(invalid(
                &dir.join(MANIFEST_FILE),
                format!(
                    "describes {} {}, but lies in the folder of {target} {version}",
                    manifest.target(),
                    manifest.version()
                ),
            ));
        }
        Ok(Some((dir.join(manifest.file().as_str()), manifest)))
    }
}

fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, Error> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() > max {
        return Err(invalid(path, format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

fn create_file(path: &Path, mode: u32) -> Result<fs::File, Error> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            Error::Exists {
                path: path.to_owned(),
            }
        } else {
            io_err(path)(e)
        }
    })
}

/// Creates `path` (never overwriting), writes `content` and syncs it; a private file gets
/// mode 0600 from the start.
fn write_new(path: &Path, content: &[u8], private: bool) -> Result<(), Error> {
    let mut file = create_file(path, if private { 0o600 } else { 0o644 })?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

/// Replaces `path` atomically: a synced temporary file renamed over it.
fn replace_file(path: &Path, content: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, content, false)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(unix)]
fn check_private_mode(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::LoosePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_path: &Path) -> Result<(), Error> {
    Ok(())
}

/// The `epmc-server release` commands (the binary's wiring calls [`ReleaseCommand::run`]).
#[derive(Debug, clap::Subcommand)]
pub enum ReleaseCommand {
    /// Generates the release signing key (keep it offline) and prints its public key for the
    /// agents' `[update] public_key`.
    Keygen {
        /// Where to write the private key (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes OUT/manifest.json (version, target, size, SHA-256, file name) for a binary and
    /// OUT/manifest.json.sig, the signature over its exact bytes.
    Sign {
        /// The release key made by `release keygen`.
        #[arg(long)]
        key: PathBuf,
        /// The agent binary to release.
        #[arg(long)]
        binary: PathBuf,
        /// Its version, MAJOR.MINOR.PATCH.
        #[arg(long)]
        version: ReleaseVersion,
        /// The platform it is built for [default: the platform this epmc-server was built for].
        #[arg(long)]
        target: Option<TargetTriple>,
        /// The folder to write the manifest and the signature to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Installs a signed manifest and its binary into the data directory's releases folder,
    /// from where the HTTPS server serves them to agents.
    Publish {
        /// The manifest written by `release sign`.
        #[arg(long)]
        manifest: PathBuf,
        /// Its signature [default: the manifest's path with .sig appended].
        #[arg(long)]
        signature: Option<PathBuf>,
        /// The binary the manifest describes.
        #[arg(long)]
        binary: PathBuf,
        /// Check the signature with this public key (ed25519:…) before publishing.
        #[arg(long)]
        public_key: Option<ReleasePublicKey>,
    },
}

impl ReleaseCommand {
    /// Runs the command; `data` is the data directory. Reports go to `out`.
    pub fn run(&self, data: &Path, out: &mut impl Write) -> Result<(), Error> {
        let report = |out: &mut dyn Write, text: String| -> Result<(), Error> {
            writeln!(out, "{text}").map_err(io_err(Path::new("(standard output)")))
        };
        match self {
            ReleaseCommand::Keygen { out: path } => {
                let public = write_new_key(path)?;
                report(
                    out,
                    format!(
                        "wrote {} (owner-only; keep it offline)\npublic key, for the agents' [update] public_key:\n{public}",
                        path.display()
                    ),
                )
            }
            ReleaseCommand::Sign {
                key,
                binary,
                version,
                target,
                out: dir,
            } => {
                let key = ReleaseKey::load(key)?;
                let target = match target {
                    Some(t) => t.clone(),
                    None => TargetTriple::new(BUILD_TARGET)?,
                };
                let signed = sign(&key, binary, *version, target, dir)?;
                let m = &signed.manifest;
                report(
                    out,
                    format!(
                        "signed {} {} ({} bytes, sha256 {}) with {}\nwrote {} and {}",
                        m.target(),
                        m.version(),
                        m.size(),
                        m.sha256(),
                        signed.public_key,
                        signed.manifest_path.display(),
                        signed.signature_path.display()
                    ),
                )
            }
            ReleaseCommand::Publish {
                manifest,
                signature,
                binary,
                public_key,
            } => {
                let signature = signature.clone().unwrap_or_else(|| {
                    let mut s = manifest.clone().into_os_string();
                    s.push(".sig");
                    PathBuf::from(s)
                });
                let published = publish(
                    &data.join(RELEASES_DIR),
                    manifest,
                    &signature,
                    binary,
                    public_key.as_ref(),
                )?;
                let m = &published.manifest;
                report(
                    out,
                    format!(
                        "published {} {} in {} (before: {}){}",
                        m.target(),
                        m.version(),
                        published.dir.display(),
                        published
                            .previous
                            .map_or("none".to_owned(), |v| v.to_string()),
                        if public_key.is_some() {
                            "; signature verified"
                        } else {
                            "; signature not checked (no --public-key)"
                        }
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_over_the_exact_bytes_and_key() {
        let (key, _) = ReleaseKey::generate().unwrap();
        let (other, _) = ReleaseKey::generate().unwrap();
        let msg = b"{\"version\": \"1.0.0\"}\n";
        let sig = key.sign(msg);
        assert!(verify(&key.public_key(), msg, &sig));
        assert!(!verify(&other.public_key(), msg, &sig));
        assert!(!verify(
            &key.public_key(),
            b"{\"version\": \"1.0.1\"}\n",
            &sig
        ));
        let mut flipped = *sig.as_bytes();
        flipped[10] ^= 1;
        assert!(!verify(
            &key.public_key(),
            msg,
            &ReleaseSignature::new(flipped)
        ));
    }

    /// RFC 8032, section 7.1, TEST 2: the key loads from its seed and signs as specified.
    #[test]
    fn rfc8032_known_answer() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let seed = hex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb");
        let public = hex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
        let sig = hex(
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        );
        let pair = Ed25519KeyPair::from_seed_and_public_key(&seed, &public).unwrap();
        let key = ReleaseKey { pair };
        assert_eq!(key.public_key().as_bytes()[..], public[..]);
        let got = key.sign(&[0x72]);
        assert_eq!(got.as_bytes()[..], sig[..]);
        assert!(verify(&key.public_key(), &[0x72], &got));
    }

    #[test]
    fn keygen_writes_an_owner_only_key_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release.key");
        let public = write_new_key(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let key = ReleaseKey::load(&path).unwrap();
        assert_eq!(key.public_key(), public);
        assert!(matches!(write_new_key(&path), Err(Error::Exists { .. })));
        assert_eq!(ReleaseKey::load(&path).unwrap().public_key(), public);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
            let e = ReleaseKey::load(&path).unwrap_err();
            assert!(
                matches!(e, Error::LoosePermissions { mode: 0o640, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }

    #[test]
    fn a_key_that_is_not_ed25519_is_refused() {
        let ecdsa = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let e = ReleaseKey::from_pem(ecdsa.as_bytes(), Path::new("k.pem")).unwrap_err();
        assert!(e.to_string().contains("k.pem: not an ed25519"), "{e}");
        let e = ReleaseKey::from_pem(b"garbage", Path::new("k.pem")).unwrap_err();
        assert!(e.to_string().contains("PKCS#8"), "{e}");
    }

    fn target() -> TargetTriple {
        TargetTriple::new("x86_64-unknown-linux-gnu").unwrap()
    }

    fn setup(content: &[u8]) -> (tempfile::TempDir, ReleaseKey, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = ReleaseKey::generate().unwrap();
        let bin = dir.path().join("epmc-agent");
        fs::write(&bin, content).unwrap();
        (dir, key, bin)
    }

    #[test]
    fn sign_then_publish_installs_the_layout() {
        let (dir, key, bin) = setup(b"#!/bin/sh\necho v1\n");
        let out = dir.path().join("signed");
        let signed = sign(&key, &bin, "1.0.0".parse().unwrap(), target(), &out).unwrap();
        assert_eq!(signed.manifest.size(), 18);
        let text = fs::read(&signed.manifest_path).unwrap();
        let sig: ReleaseSignature = fs::read_to_string(&signed.signature_path)
            .unwrap()
            .parse()
            .unwrap();
        assert!(verify(&key.public_key(), &text, &sig));
        // Signing again into the same folder refuses.
        assert!(matches!(
            sign(&key, &bin, "1.0.0".parse().unwrap(), target(), &out),
            Err(Error::Exists { .. })
        ));

        let releases = dir.path().join("data").join(RELEASES_DIR);
        let published = publish(
            &releases,
            &signed.manifest_path,
            &signed.signature_path,
            &bin,
            Some(&key.public_key()),
        )
        .unwrap();
        assert_eq!(published.previous, None);
        let store = ReleaseStore::new(&releases);
        assert_eq!(
            store.latest_version(&target()).unwrap(),
            Some("1.0.0".parse().unwrap())
        );
        let served = store.latest(&target()).unwrap().unwrap();
        assert_eq!(served.manifest.as_bytes(), &text[..]);
        assert_eq!(served.signature, sig.to_string());
        let (path, m) = store
            .binary(&target(), "1.0.0".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(fs::read(path).unwrap(), b"#!/bin/sh\necho v1\n");
        assert_eq!(m, signed.manifest);
        assert!(
            store
                .binary(&target(), "1.0.1".parse().unwrap())
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .latest(&TargetTriple::new("aarch64-apple-darwin").unwrap())
                .unwrap()
                .is_none()
        );

        // The same version again, and an older one, are refused; nothing changes.
        let again = publish(
            &releases,
            &signed.manifest_path,
            &signed.signature_path,
            &bin,
            None,
        )
        .unwrap_err();
        assert!(matches!(again, Error::AlreadyPublished { .. }), "{again}");
        let old = sign(
            &key,
            &bin,
            "0.9.0".parse().unwrap(),
            target(),
            &dir.path().join("old"),
        )
        .unwrap();
        let e = publish(
            &releases,
            &old.manifest_path,
            &old.signature_path,
            &bin,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::NotNewer { .. }), "{e}");
        assert!(e.to_string().contains("never downgrade"), "{e}");
        assert_eq!(
            store.latest_version(&target()).unwrap(),
            Some("1.0.0".parse().unwrap())
        );

        // A newer one moves `latest`.
        let newer = sign(
            &key,
            &bin,
            "1.1.0".parse().unwrap(),
            target(),
            &dir.path().join("newer"),
        )
        .unwrap();
        let p = publish(
            &releases,
            &newer.manifest_path,
            &newer.signature_path,
            &bin,
            None,
        )
        .unwrap();
        assert_eq!(p.previous, Some("1.0.0".parse().unwrap()));
        assert_eq!(
            store.latest_version(&target()).unwrap(),
            Some("1.1.0".parse().unwrap())
        );
    }

    #[test]
    fn publish_refuses_a_mismatched_binary_or_signature_and_leaves_nothing() {
        let (dir, key, bin) = setup(b"the real binary");
        let signed = sign(
            &key,
            &bin,
            "2.0.0".parse().unwrap(),
            target(),
            &dir.path().join("s"),
        )
        .unwrap();
        let releases = dir.path().join("releases");
        let other = dir.path().join("other");
        fs::write(&other, b"the real binarY").unwrap();
        let e = publish(
            &releases,
            &signed.manifest_path,
            &signed.signature_path,
            &other,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::BinaryMismatch { .. }), "{e}");
        assert!(e.to_string().contains("SHA-256"), "{e}");
        fs::write(&other, b"short").unwrap();
        let e = publish(
            &releases,
            &signed.manifest_path,
            &signed.signature_path,
            &other,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("5 bytes"), "{e}");

        let (wrong, _) = ReleaseKey::generate().unwrap();
        let e = publish(
            &releases,
            &signed.manifest_path,
            &signed.signature_path,
            &bin,
            Some(&wrong.public_key()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadSignature { .. }), "{e}");

        // A manifest changed after signing fails verification too.
        let text = fs::read_to_string(&signed.manifest_path).unwrap();
        fs::write(&signed.manifest_path, text.replace("2.0.0", "3.0.0")).unwrap();
        let e = publish(
            &releases,
            &signed.manifest_path,
            &signed.signature_path,
            &bin,
            Some(&key.public_key()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadSignature { .. }), "{e}");

        let store = ReleaseStore::new(&releases);
        assert_eq!(store.latest_version(&target()).unwrap(), None);
        let leftovers: Vec<_> = fs::read_dir(releases.join(target().as_str()))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
