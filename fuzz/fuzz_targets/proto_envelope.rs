//! Arbitrary bytes into the envelope decoder: never a panic; whatever decodes re-encodes and
//! decodes to the same envelope.
#![no_main]
use epmc_proto::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::from_json(data) {
        let json = envelope.to_json().expect("a decoded envelope encodes");
        let again = Envelope::from_json(&json).expect("re-encoded envelope decodes");
        assert_eq!(again, envelope);
    }
});
