//! The agent's identity: its id is the CN of its client certificate, and every topic it
//! publishes or subscribes to is built from that id (never from configuration), because a
//! broker may acknowledge a publish that its ACL silently drops.
//!
//! The agent's state directory remembers the id it was started with. Starting with a
//! certificate for another id (a re-enrollment) while the state still holds messages built for
//! the old id is refused: those messages would go out under the old agent's topics and be
//! dropped by the broker's ACL.

use std::path::Path;

use epmc_proto::topic::AgentId;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why the identity could not be established.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The certificate file cannot be read.
    #[error("cannot read the client certificate {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate is not a PEM X.509 certificate.
    #[error("the client certificate {path} is not a PEM X.509 certificate: {detail}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The certificate's CN is not an agent id.
    #[error(
        "the client certificate {path} has CN {cn:?}, which is not an agent id (a UUID); was it issued by epmc-server?"
    )]
    NotAnAgent {
        /// The file.
        path: String,
        /// Its CN.
        cn: String,
    },
    /// The state directory belongs to another agent id.
    #[error(
        "the state directory {dir} belongs to agent {recorded}, but the certificate is for agent {current}; \
         its queued messages would be published under the other agent's topics. \
         Move the state directory away (its unsent messages are lost) or use the matching certificate"
    )]
    Mismatch {
        /// The state directory.
        dir: String,
        /// The id recorded there.
        recorded: String,
        /// The certificate's id.
        current: String,
    },
    /// The state directory's identity file cannot be read or written.
    #[error("identity file {path}: {source}")]
    State {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The agent id in a PEM certificate's subject CN.
pub fn agent_id_from_pem(pem: &[u8], path: &Path) -> Result<AgentId, IdentityError> {
    let shown = || path.display().to_string();
    let malformed = |detail: String| IdentityError::Malformed {
        path: shown(),
        detail,
    };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| malformed(format!("PEM: {e}")))?;
    let (_, cert) =
        X509Certificate::from_der(&pem.contents).map_err(|e| malformed(format!("DER: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| malformed("no subject CN".into()))?;
    AgentId::parse(cn).map_err(|_| IdentityError::NotAnAgent {
        path: shown(),
        cn: cn.to_owned(),
    })
}

/// Reads the agent id from the certificate file.
pub fn agent_id_from_file(path: &Path) -> Result<AgentId, IdentityError> {
    let pem = std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.display().to_string(),
        source,
    })?;
    agent_id_from_pem(&pem, path)
}

/// Records `agent` as the owner of `state_dir` (file `agent-id`), or checks that it already
/// is. A directory without the file is claimed.
pub fn claim_state_dir(state_dir: &Path, agent: &AgentId) -> Result<(), IdentityError> {
    let path = state_dir.join("agent-id");
    let err = |source| IdentityError::State {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(recorded) => {
            let recorded = recorded.trim();
            if recorded == agent.to_string() {
                Ok(())
            } else {
                Err(IdentityError::Mismatch {
                    dir: state_dir.display().to_string(),
                    recorded: recorded.to_owned(),
                    current: agent.to_string(),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(err)?;
            crate::service::write_atomically(&path, format!("{agent}\n").as_bytes()).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}
