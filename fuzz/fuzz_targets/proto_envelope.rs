//! Arbitrary bytes into the envelope decoder. Invariants, not just "no panic":
//! - whatever decodes re-encodes, and the re-encoded JSON decodes to an equal envelope and
//!   encodes to the same bytes;
//! - the published schemas (with `format` validated) accept the re-encoded JSON: the envelope
//!   schema the whole document, the kind's schema its body;
//! - the other direction of the contract: a JSON document the envelope schema accepts is
//!   accepted by the decoder.
#![no_main]
use std::collections::HashMap;
use std::sync::OnceLock;

use epmc_proto::Envelope;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn validators() -> &'static HashMap<String, jsonschema::Validator> {
    static V: OnceLock<HashMap<String, jsonschema::Validator>> = OnceLock::new();
    V.get_or_init(|| {
        epmc_proto::schemas()
            .into_iter()
            .map(|(file, schema)| {
                let v = jsonschema::options()
                    .should_validate_formats(true)
                    .build(&schema)
                    .expect("the generated schema compiles");
                (file, v)
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let validators = validators();
    if let Ok(envelope) = Envelope::from_json(data) {
        let json = envelope.to_json().expect("a decoded envelope encodes");
        let again = Envelope::from_json(&json).expect("re-encoded envelope decodes");
        assert_eq!(again, envelope);
        assert_eq!(again.to_json().expect("encodes"), json, "encoding is stable");
        let value: Value = serde_json::from_slice(&json).expect("encoded JSON parses");
        let errors: Vec<String> = validators["envelope.schema.json"]
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "envelope schema refuses {value}: {errors:?}");
        let body = &validators[&format!("{}.schema.json", envelope.kind().as_str())];
        assert!(
            body.is_valid(&value["body"]),
            "body schema refuses {}",
            value["body"]
        );
    }
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        if validators["envelope.schema.json"].is_valid(&value) {
            let bytes = serde_json::to_vec(&value).expect("a value encodes");
            if bytes.len() <= epmc_proto::MAX_PAYLOAD_BYTES {
                if let Err(e) = Envelope::from_json(&bytes) {
                    panic!("the schema accepts what the decoder refuses: {value}: {e}");
                }
            }
        }
    }
});
