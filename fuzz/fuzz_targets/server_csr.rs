//! Arbitrary certificate requests into the CA: never a panic; any request it accepts yields a
//! certificate whose only CN is the server-chosen agent id and whose public key is exactly the
//! request's.
//!
//! The first byte picks the layer: 0 feeds the rest as PEM text; anything else wraps the rest
//! as the DER inside a `CERTIFICATE REQUEST` PEM block, so the fuzzer reaches the PKCS#10 parser.
#![no_main]
use std::sync::OnceLock;

use epmc_server::ca::CertificateAuthority;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use uuid::Uuid;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, X509Certificate};

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        CertificateAuthority::generate("fuzz CA", OffsetDateTime::now_utc()).expect("CA")
    })
}

fn pem(der: &[u8]) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = b"-----BEGIN CERTIFICATE REQUEST-----\n".to_vec();
    for (n, chunk) in der.chunks(3).enumerate() {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                A[((v >> (18 - 6 * i)) & 0x3f) as usize]
            } else {
                b'='
            });
        }
        if n % 16 == 15 {
            out.push(b'\n');
        }
    }
    out.extend_from_slice(b"\n-----END CERTIFICATE REQUEST-----\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input = if mode == 0 { rest.to_vec() } else { pem(rest) };
    let agent_id = Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0001);
    let Ok(issued) = ca().sign_csr(&input, agent_id, OffsetDateTime::now_utc()) else {
        return;
    };
    assert_eq!(issued.agent_id, agent_id);
    let (_, cert) = X509Certificate::from_der(&issued.der).expect("issued certificate parses");
    let cns: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().expect("CN is a string"))
        .collect();
    assert_eq!(cns, [agent_id.hyphenated().to_string().as_str()]);
    let csr_der = CertificateSigningRequestDer::from_pem_slice(&input).expect("accepted is PEM");
    let (_, csr) = X509CertificationRequest::from_der(&csr_der).expect("accepted parses");
    assert_eq!(
        cert.public_key().raw,
        csr.certification_request_info.subject_pki.raw
    );
});
