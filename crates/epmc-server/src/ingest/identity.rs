//! The agent's identity from its TLS client certificate: the subject CN, a UUID.

use epmc_proto::topic::AgentId;
use rustls_pki_types::CertificateDer;

/// Maps the peer's certificate chain (end entity first), already verified by TLS, to an
/// agent id. [`agent_id_from_cn`] is the standard one.
pub type IdentityFn = fn(&[CertificateDer<'_>]) -> Result<AgentId, IdentityError>;

pub use crate::ca::IdentityError;

/// The agent id in the end-entity certificate's subject CN (exactly one CN, a hyphenated
/// UUID): [`crate::ca::AgentIdentity`], the one identity type the MQTT listener and the
/// HTTPS routes share.
pub fn agent_id_from_cn(chain: &[CertificateDer<'_>]) -> Result<AgentId, IdentityError> {
    crate::ca::AgentIdentity::from_peer_certificates(Some(chain))
        .map(|id| AgentId::new(id.agent_id()))
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
            Err(IdentityError::Malformed(_))
        ));
    }
}
