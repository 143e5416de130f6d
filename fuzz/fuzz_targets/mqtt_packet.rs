//! MQTT packets: arbitrary bytes never panic; whatever decodes re-encodes and decodes equal.
#![no_main]
use epmc_transport::mqtt::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((packet, used)) = Packet::decode(rest, 64 * 1024) {
        let bytes = packet.to_bytes().expect("a decoded packet encodes");
        let (again, n) = Packet::decode(&bytes, 64 * 1024).expect("re-encoded packet decodes");
        assert_eq!(n, bytes.len());
        assert_eq!(again, packet);
        rest = &rest[used..];
    }
});
