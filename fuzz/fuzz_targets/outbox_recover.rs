//! Outbox recovery from an arbitrary log file: never a panic, and the recovered outbox
//! accepts a push and replays it after reopening.
#![no_main]
use bytes::Bytes;
use epmc_transport::outbox::{Limits, Outbox};
use epmc_transport::{MessageId, OutboundMessage, Priority};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("epmc-outbox-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("outbox.log"), data).unwrap();
    let mut o = Outbox::open(&dir, Limits::default()).expect("opens any file");
    let before = o.stats().messages;
    let id = MessageId::from_bytes([0xEE; 16]);
    let already = o.pending().any(|h| h.message.id == id);
    o.push(OutboundMessage {
        id,
        topic: "t".into(),
        payload: Bytes::from_static(b"x"),
        priority: Priority::Critical,
    })
    .unwrap();
    drop(o);
    let o = Outbox::open(&dir, Limits::default()).unwrap();
    assert_eq!(o.stats().messages, before + usize::from(!already));
    assert!(o.pending().any(|h| h.message.id == id));
    let _ = std::fs::remove_dir_all(&dir);
});
