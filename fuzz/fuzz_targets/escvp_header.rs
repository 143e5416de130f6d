//! ESC/VP.net messages: whatever decodes re-encodes to the same bytes and decodes again.
#![no_main]
use escvp::net::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((rest, msg)) = Message::decode(data) {
        let bytes = msg.to_bytes();
        assert_eq!(&bytes[..], &data[..data.len() - rest.len()]);
        let (r2, again) = Message::decode(&bytes).expect("re-decodes");
        assert!(r2.is_empty());
        assert_eq!(again, msg);
    }
});
