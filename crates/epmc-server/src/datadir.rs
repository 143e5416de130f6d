//! The server's data directory: the CA and the server's TLS certificate on disk.
//!
//! | file | content | mode |
//! |---|---|---|
//! | `ca.key` | CA private key, PKCS#8 PEM | 0600 |
//! | `ca.key.sha256` | SHA-256 of the CA's public key, hex: detects a replaced CA key | 0644 |
//! | `ca.crt` | CA certificate, PEM | 0644 |
//! | `server.key` | server TLS private key, PKCS#8 PEM | 0600 |
//! | `server.crt` | server TLS certificate, PEM, issued by the CA | 0644 |
//!
//! [`init`] creates them once and never overwrites; [`load`] checks them before the server
//! starts and names the file at fault. Every error carries the path of that file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{AgentBundle, CaError, CaFingerprint, CertificateAuthority, ServerCertificate};

/// The CA private key.
pub const CA_KEY: &str = "ca.key";
/// The CA certificate.
pub const CA_CERT: &str = "ca.crt";
/// The recorded SHA-256 of the CA's public key.
pub const CA_KEY_HASH: &str = "ca.key.sha256";
/// The server's TLS private key.
pub const SERVER_KEY: &str = "server.key";
/// The server's TLS certificate.
pub const SERVER_CERT: &str = "server.crt";
/// In an agent bundle directory: the agent's certificate.
pub const AGENT_CERT: &str = "agent.crt";
/// In an agent bundle directory: the agent's private key.
pub const AGENT_KEY: &str = "agent.key";
/// The SQLite database, when no `--database` is given.
pub const DATABASE: &str = "epmc.db";

/// Every file of an initialised data directory, in the order [`init`] writes them.
const FILES: [&str; 5] = [CA_KEY, CA_KEY_HASH, CA_CERT, SERVER_KEY, SERVER_CERT];
/// The common name of a CA made by [`init`].
const CA_COMMON_NAME: &str = "EPMC-rs private CA";

/// What is wrong with one file of the data directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The file does not exist.
    #[error("missing; run the server's init command, or restore the file from a backup")]
    Missing,
    /// The file is missing while other files of the directory exist.
    #[error(
        "missing while {} exists: the directory is incompletely initialised; restore the file from a backup, or move the directory away and initialise a new one",
        present.display()
    )]
    Incomplete {
        /// A file that exists.
        present: PathBuf,
    },
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A private key file can be read by the group or others.
    #[error(
        "private key file has mode {mode:04o}, readable by group or others; run chmod 600 on it"
    )]
    LoosePermissions {
        /// The file's permission bits.
        mode: u32,
    },
    /// The content cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// The private key is not the key of its certificate.
    #[error("this key does not match the public key of {}", cert.display())]
    KeyMismatch {
        /// The certificate it should match.
        cert: PathBuf,
    },
    /// The CA key is not the one recorded at initialisation.
    #[error(
        "the CA key changed since the data directory was initialised ({CA_KEY_HASH} records {recorded}, the key's hash is {actual}); agents trust the original CA only: restore the original {CA_KEY} and {CA_CERT}"
    )]
    KeyChanged {
        /// The hash in `ca.key.sha256`.
        recorded: String,
        /// The hash of the key found.
        actual: String,
    },
    /// The certificate was not issued by the CA in `ca.crt`.
    #[error("not issued by the CA in {CA_CERT} ({0})")]
    NotIssuedByCa(String),
    /// Generating the CA or a certificate failed.
    #[error("{0}")]
    Ca(#[from] CaError),
    /// The file exists and will not be overwritten.
    #[error("already exists; it will not be overwritten")]
    AlreadyExists,
}

/// A data directory error: the file at fault and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct DataDirError {
    path: PathBuf,
    problem: Problem,
}

impl DataDirError {
    fn new(path: impl Into<PathBuf>, problem: impl Into<Problem>) -> Self {
        Self {
            path: path.into(),
            problem: problem.into(),
        }
    }

    /// The file at fault.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitOutcome {
    /// A new CA and server certificate were written.
    Created {
        /// The new CA's fingerprint (for enrollment tokens).
        ca_fingerprint: CaFingerprint,
    },
    /// The directory was already initialised; nothing was changed.
    AlreadyInitialized {
        /// The existing CA's fingerprint.
        ca_fingerprint: CaFingerprint,
    },
}

/// The loaded and checked contents of a data directory.
#[derive(Debug)]
pub struct ServerPki {
    /// The CA.
    pub ca: CertificateAuthority,
    /// The server's TLS certificate and key.
    pub server: ServerCertificate,
}

/// Creates the data directory's CA and server certificate (for `hostnames`, plus `localhost`
/// and `127.0.0.1`). On a directory that already holds all the files it changes nothing and
/// returns [`InitOutcome::AlreadyInitialized`]; on one that holds only some, it refuses and
/// names a missing file.
pub fn init(dir: &Path, hostnames: &[String]) -> Result<InitOutcome, DataDirError> {
    if !dir.exists() {
        create_private_dir(dir)?;
    }
    let present: Vec<PathBuf> = FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect();
    if let Some(first_present) = present.first() {
        if let Some(missing) = FILES.iter().map(|f| dir.join(f)).find(|p| !p.exists()) {
            return Err(DataDirError::new(
                missing,
                Problem::Incomplete {
                    present: first_present.clone(),
                },
            ));
        }
        let ca_path = dir.join(CA_CERT);
        let pem = fs::read(&ca_path).map_err(|e| DataDirError::new(&ca_path, e))?;
        let der = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| DataDirError::new(&ca_path, Problem::Invalid(e.to_string())))?;
        return Ok(InitOutcome::AlreadyInitialized {
            ca_fingerprint: CaFingerprint::of_der(&der),
        });
    }

    let now = OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(CA_COMMON_NAME, now)
        .map_err(|e| DataDirError::new(dir.join(CA_KEY), e))?;
    let server = ca
        .issue_server_cert(hostnames, now)
        .map_err(|e| DataDirError::new(dir.join(SERVER_CERT), e))?;
    write_new(&dir.join(CA_KEY), ca.key_pem().as_bytes(), true)?;
    write_new(
        &dir.join(CA_KEY_HASH),
        format!("{}\n", ca.key_sha256_hex()).as_bytes(),
        false,
    )?;
    write_new(&dir.join(CA_CERT), ca.cert_pem().as_bytes(), false)?;
    write_new(&dir.join(SERVER_KEY), server.key_pem.as_bytes(), true)?;
    write_new(&dir.join(SERVER_CERT), server.cert_pem.as_bytes(), false)?;
    Ok(InitOutcome::Created {
        ca_fingerprint: ca.fingerprint(),
    })
}

/// Loads and checks the data directory: every file present, key files not readable by group
/// or others, the CA key matching both `ca.crt` and the hash recorded at initialisation, the
/// server certificate issued by the CA and matching `server.key`.
pub fn load(dir: &Path) -> Result<ServerPki, DataDirError> {
    for file in FILES {
        let path = dir.join(file);
        if !path.exists() {
            return Err(DataDirError::new(path, Problem::Missing));
        }
    }
    for key in [CA_KEY, SERVER_KEY] {
        check_private_mode(&dir.join(key))?;
    }
    let ca_key_path = dir.join(CA_KEY);
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key = read_text(&ca_key_path)?;
    let ca_cert = read_text(&ca_cert_path)?;
    let ca = CertificateAuthority::from_pem(&ca_cert, &ca_key).map_err(|e| match e {
        CaError::KeyMismatch => DataDirError::new(
            &ca_key_path,
            Problem::KeyMismatch {
                cert: ca_cert_path.clone(),
            },
        ),
        CaError::InvalidKey(msg) => DataDirError::new(&ca_key_path, Problem::Invalid(msg)),
        other => DataDirError::new(&ca_cert_path, other),
    })?;

    let hash_path = dir.join(CA_KEY_HASH);
    let recorded = read_text(&hash_path)?.trim().to_owned();
    if recorded.len() != 64 || !recorded.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DataDirError::new(
            &hash_path,
            Problem::Invalid("expected 64 hex characters (SHA-256 of the CA public key)".into()),
        ));
    }
    let actual = ca.key_sha256_hex();
    if !crate::ca::constant_time_eq(recorded.to_ascii_lowercase().as_bytes(), actual.as_bytes()) {
        return Err(DataDirError::new(
            &ca_key_path,
            Problem::KeyChanged { recorded, actual },
        ));
    }

    let server_key_path = dir.join(SERVER_KEY);
    let server_cert_path = dir.join(SERVER_CERT);
    let server = ServerCertificate {
        cert_pem: read_text(&server_cert_path)?,
        key_pem: read_text(&server_key_path)?,
    };
    check_server_cert(&ca, &server, &server_cert_path, &server_key_path)?;
    Ok(ServerPki { ca, server })
}

fn check_server_cert(
    ca: &CertificateAuthority,
    server: &ServerCertificate,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), DataDirError> {
    let invalid = |path: &Path, msg: String| DataDirError::new(path, Problem::Invalid(msg));
    let der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes())
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| invalid(cert_path, e.to_string()))?;
    let (_, ca_cert) =
        X509Certificate::from_der(ca.cert_der()).map_err(|e| invalid(cert_path, e.to_string()))?;
    cert.verify_signature(Some(ca_cert.public_key()))
        .map_err(|e| DataDirError::new(cert_path, Problem::NotIssuedByCa(e.to_string())))?;
    let key = KeyPair::from_pem(&server.key_pem).map_err(|e| invalid(key_path, e.to_string()))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(DataDirError::new(
            key_path,
            Problem::KeyMismatch {
                cert: cert_path.to_owned(),
            },
        ));
    }
    Ok(())
}

/// Writes an agent bundle (`ca.crt`, `agent.crt`, `agent.key` with mode 0600) into `out`,
/// creating it if needed. Refuses, before writing anything, if any of the files exists.
pub fn write_agent_bundle(out: &Path, bundle: &AgentBundle) -> Result<(), DataDirError> {
    check_agent_bundle_target(out)?;
    if !out.exists() {
        create_private_dir(out)?;
    }
    let files = [
        (CA_CERT, bundle.ca_pem.as_bytes(), false),
        (AGENT_CERT, bundle.certificate.pem.as_bytes(), false),
        (AGENT_KEY, bundle.key_pem.as_bytes(), true),
    ];
    for (name, content, private) in files {
        write_new(&out.join(name), content, private)?;
    }
    Ok(())
}

/// Whether [`write_agent_bundle`] could write to `out`: none of its files is there yet.
pub fn check_agent_bundle_target(out: &Path) -> Result<(), DataDirError> {
    match [CA_CERT, AGENT_CERT, AGENT_KEY]
        .iter()
        .find(|name| out.join(name).exists())
    {
        Some(name) => Err(DataDirError::new(out.join(name), Problem::AlreadyExists)),
        None => Ok(()),
    }
}

fn read_text(path: &Path) -> Result<String, DataDirError> {
    fs::read_to_string(path).map_err(|e| DataDirError::new(path, e))
}

fn create_private_dir(dir: &Path) -> Result<(), DataDirError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| DataDirError::new(dir, e))
}

/// Creates `path` (never overwriting), writes `content` and syncs it. A private file is
/// created with mode 0600, so the key is never readable by others, not even briefly.
fn write_new(path: &Path, content: &[u8], private: bool) -> Result<(), DataDirError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            DataDirError::new(path, Problem::AlreadyExists)
        } else {
            DataDirError::new(path, e)
        }
    })?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(|e| DataDirError::new(path, e))
}

#[cfg(unix)]
fn check_private_mode(path: &Path) -> Result<(), DataDirError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|e| DataDirError::new(path, e))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(DataDirError::new(path, Problem::LoosePermissions { mode }));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_path: &Path) -> Result<(), DataDirError> {
    Ok(())
}
