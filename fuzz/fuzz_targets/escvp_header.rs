//! ESC/VP.net messages: whatever decodes re-encodes to the same bytes (the encoding is
//! canonical: it is byte-exact) and decodes again equal; strict prefixes of it are
//! `Incomplete`, never `Invalid`; input that does not decode fails at the right place.
#![no_main]
use escvp::DecodeError;
use escvp::net::{HEADER_LEN, Message, PROTOCOL_ID};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Message::decode(data) {
        Ok((rest, msg)) => {
            let used = data.len() - rest.len();
            let bytes = msg.to_bytes();
            assert_eq!(&bytes[..], &data[..used]);
            assert_eq!(msg.encoded_len(), used);
            let (r2, again) = Message::decode(&bytes).expect("re-decodes");
            assert!(r2.is_empty());
            assert_eq!(again, msg);
            for k in [0, 1, HEADER_LEN - 1, HEADER_LEN, used - 1] {
                if k < used {
                    match Message::decode(&bytes[..k]) {
                        Err(DecodeError::Incomplete { needed }) => {
                            assert!(needed >= 1 && k + needed <= used)
                        }
                        other => panic!("prefix {k}: {other:?}"),
                    }
                }
            }
        }
        Err(DecodeError::Incomplete { needed }) => {
            assert!(needed >= 1);
            let n = data.len().min(PROTOCOL_ID.len());
            assert_eq!(&data[..n], &PROTOCOL_ID[..n]);
        }
        Err(DecodeError::Invalid { offset, .. }) => {
            assert!(offset < PROTOCOL_ID.len());
            assert_ne!(data[offset], PROTOCOL_ID[offset]);
        }
        Err(e) => panic!("unexpected error kind {e:?}"),
    }
});
