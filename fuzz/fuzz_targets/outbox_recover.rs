//! Outbox recovery, over the simulated storage.
//!
//! Two shapes of input, chosen by the first byte:
//! - an arbitrary log file: opening never fails or panics, recovery is stable (a second open
//!   finds the same messages), and the recovered outbox accepts a push that survives a power
//!   loss together with everything it recovered;
//! - a valid log of eight messages with the fuzzer's bytes XORed into one stretch of it: every
//!   message whose record the damage did not touch is recovered, in order, unless the damage
//!   forged a record boundary that overlaps it (which `scan_records` shows).
#![no_main]
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use epmc_transport::outbox::{Limits, Outbox, scan_records};
use epmc_transport::storage::Storage;
use epmc_transport::storage::sim::{CrashMode, SimStorage};
use epmc_transport::{MessageId, OutboundMessage, Priority};
use libfuzzer_sys::fuzz_target;

const DIR: &str = "/o";

fn open(sim: &SimStorage) -> Outbox {
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    Outbox::open_in(storage, DIR, Limits::default()).expect("opens any file")
}

fn log() -> PathBuf {
    Path::new(DIR).join("outbox.log")
}

fn msg(n: u8) -> OutboundMessage {
    OutboundMessage {
        id: MessageId::from_bytes([n; 16]),
        topic: format!("epmc/v1/agents/a/events/{n}"),
        payload: Bytes::from(vec![n; 20 + usize::from(n) * 7]),
        priority: Priority::Critical,
    }
}

fn ids(o: &Outbox) -> Vec<MessageId> {
    o.pending().map(|h| h.message.id).collect()
}

/// A file system holding `raw` as a durable outbox log.
fn with_log(raw: &[u8]) -> SimStorage {
    let sim = SimStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    storage.create_dir_all(Path::new(DIR)).unwrap();
    let (mut f, _) = storage.open_append(&log()).unwrap();
    f.append(raw).unwrap();
    f.sync().unwrap();
    storage.sync_dir(Path::new(DIR)).unwrap();
    storage.sync_dir(Path::new("/")).unwrap();
    sim
}

fn arbitrary_file(data: &[u8]) {
    let sim = with_log(data);
    let mut o = open(&sim);
    let first = ids(&o);
    let stats = o.stats();
    drop(o);
    let again = open(&sim);
    assert_eq!(ids(&again), first, "recovery is stable");
    assert_eq!(again.stats().messages, stats.messages);
    drop(again);
    o = open(&sim);
    let new = msg(0xEE);
    let already = first.contains(&new.id);
    // A forged log may say the id was acknowledged already: then the push stores nothing.
    let acked = o.recently_acked(&new.id);
    o.push(new.clone()).expect("push after recovery");
    drop(o);
    sim.crash(CrashMode::LoseUnsynced);
    let after = ids(&open(&sim));
    for id in &first {
        assert!(
            after.contains(id),
            "a recovered message survives the next power loss"
        );
    }
    assert_eq!(after.contains(&new.id), already || !acked);
    assert_eq!(after.len(), first.len() + usize::from(!already && !acked));
}

fn damaged_log(data: &[u8]) {
    let Some((&at, mask)) = data.split_first() else {
        return;
    };
    if mask.iter().all(|&b| b == 0) {
        return;
    }
    // A valid log of eight messages.
    let clean = SimStorage::new();
    let mut o = open(&clean);
    for n in 1..=8 {
        o.push(msg(n)).unwrap();
    }
    drop(o);
    let raw = clean.contents(&log()).unwrap();
    let records = scan_records(&raw);
    assert_eq!(records.len(), 8);
    // XOR the mask into the file at a fuzzer-chosen offset.
    let start = usize::from(at) * raw.len() / 256;
    let mut bad = raw.clone();
    for (i, b) in mask.iter().enumerate() {
        if let Some(x) = bad.get_mut(start + i) {
            *x ^= b;
        }
    }
    let touched = |s: usize, len: usize| (s..s + len).any(|i| bad.get(i) != raw.get(i));
    let found = scan_records(&bad);
    let sim = with_log(&bad);
    let o = open(&sim);
    let got = ids(&o);
    let mut expected = Vec::new();
    for (k, &(s, len)) in records.iter().enumerate() {
        if touched(s, len) {
            continue;
        }
        // A forged boundary inside the damage that swallows this record: the only way an
        // intact record can be lost, and only by bytes crafted to pass two checksums.
        let forged = found
            .iter()
            .any(|&(fs, flen)| fs != s && fs < s + len && s < fs + flen);
        if !forged {
            expected.push(msg(k as u8 + 1).id);
        }
    }
    let kept: Vec<MessageId> = got
        .iter()
        .copied()
        .filter(|id| expected.contains(id))
        .collect();
    assert_eq!(kept, expected, "every intact record is recovered, in order");
    if found.iter().all(|r| records.contains(r)) {
        // No forged records: nothing but the original messages.
        for id in &got {
            assert!((1..=8).any(|n| msg(n).id == *id));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&mode, rest)) if mode % 2 == 0 => arbitrary_file(rest),
        Some((_, rest)) => damaged_log(rest),
        None => {}
    }
});
