//! The agent's identity from its TLS client certificate: the subject CN, a UUID.

use epmc_proto::topic::AgentId;
use rustls_pki_types::CertificateDer;

/// Maps the peer's certificate chain (end entity first), already verified by TLS, to an
/// agent id. [`agent_id_from_cn`] is the standard one.
pub type IdentityFn = fn(&[CertificateDer<'_>]) -> Result<AgentId, IdentityError>;

/// Why a verified certificate does not name an agent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// No client certificate (the TLS configuration does not require one).
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("unparsable certificate: {0}")]
    Unparsable(String),
    /// The subject has no CN, or more than one.
    #[error("the subject must have exactly one CN, it has {0}")]
    CommonNameCount(usize),
    /// The CN is not an agent id (a UUID).
    #[error("the CN {0:?} is not an agent id")]
    NotAnAgentId(String),
}

/// The agent id in the end-entity certificate's subject CN (exactly one CN, a UUID).
pub fn agent_id_from_cn(chain: &[CertificateDer<'_>]) -> Result<AgentId, IdentityError> {
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let cns: Vec<_> = cert.subject().iter_common_name().collect();
    let [cn] = cns.as_slice() else {
        return Err(IdentityError::CommonNameCount(cns.len()));
    };
    let cn = cn
        .as_str()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    AgentId::parse(cn).map_err(|_| IdentityError::NotAnAgentId(cn.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_with(cns: &[&str]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for cn in cns {
            params.distinguished_name.push(DnType::CommonName, *cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_cn_must_be_one_uuid() {
        let id = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
        assert_eq!(
            agent_id_from_cn(&[cert_with(&[id])]).unwrap().to_string(),
            id
        );
        assert_eq!(
            agent_id_from_cn(&[cert_with(&["agent-001"])]),
            Err(IdentityError::NotAnAgentId("agent-001".into()))
        );
        assert_eq!(
            agent_id_from_cn(&[cert_with(&[])]),
            Err(IdentityError::CommonNameCount(0))
        );
        assert_eq!(agent_id_from_cn(&[]), Err(IdentityError::NoCertificate));
        assert!(matches!(
            agent_id_from_cn(&[CertificateDer::from(vec![1u8, 2, 3])]),
            Err(IdentityError::Unparsable(_))
        ));
    }
}
