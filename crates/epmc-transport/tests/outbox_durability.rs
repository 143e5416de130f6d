//! The durable outbox: replay across reopen, torn writes, the full-outbox policy, a publisher
//! killed with SIGKILL mid-stream, and a model-based property test.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use epmc_transport::outbox::{Limits, Outbox, OutboxError};
use epmc_transport::{MessageId, OutboundMessage, Priority};
use proptest::prelude::*;

fn msg(n: u64, priority: Priority, size: usize) -> OutboundMessage {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    OutboundMessage {
        id: MessageId::from_bytes(id),
        topic: format!("epmc/v1/agents/a/telemetry/{n}"),
        payload: Bytes::from(vec![(n % 251) as u8; size]),
        priority,
    }
}

fn ids(o: &Outbox) -> Vec<u64> {
    o.pending()
        .map(|h| u64::from_be_bytes(h.message.id.as_bytes()[..8].try_into().unwrap()))
        .collect()
}

#[test]
fn push_ack_and_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut o = Outbox::open(dir.path(), Limits::default()).unwrap();
        for n in 0..10 {
            assert_eq!(o.push(msg(n, Priority::Routine, 100)).unwrap(), n);
        }
        // Pushing the same id again stores nothing.
        assert_eq!(o.push(msg(3, Priority::Routine, 100)).unwrap(), 3);
        assert!(o.ack(2).unwrap());
        assert!(o.ack_id(&msg(5, Priority::Routine, 0).id).unwrap());
        assert!(!o.ack(2).unwrap(), "acking twice is harmless");
    }
    let o = Outbox::open(dir.path(), Limits::default()).unwrap();
    assert_eq!(ids(&o), vec![0, 1, 3, 4, 6, 7, 8, 9]);
    let stats = o.stats();
    assert_eq!(stats.messages, 8);
    assert_eq!(stats.per_priority, [8, 0, 0]);
    assert!(stats.bytes > 800);
    // New pushes continue the sequence.
    let mut o = o;
    assert_eq!(o.push(msg(100, Priority::Event, 1)).unwrap(), 10);
}

#[test]
fn torn_tail_at_every_offset_keeps_earlier_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.log");
    {
        let mut o = Outbox::open(dir.path(), Limits::default()).unwrap();
        for n in 0..3 {
            o.push(msg(n, Priority::Event, 40)).unwrap();
        }
    }
    let full = std::fs::read(&path).unwrap();
    let record = full.len() / 3;
    let two = 2 * record;
    // Cut the last record at every byte offset: the first two always survive.
    for cut in two..full.len() {
        std::fs::write(&path, &full[..cut]).unwrap();
        let o = Outbox::open(dir.path(), Limits::default()).unwrap();
        assert_eq!(ids(&o), vec![0, 1], "cut at {cut}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            two,
            "tail cut off"
        );
    }
    // Garbage after valid records, and a flipped byte inside the last one.
    let mut garbage = full.clone();
    garbage.extend_from_slice(b"\xff\xff\xff\x7fjunk");
    std::fs::write(&path, &garbage).unwrap();
    assert_eq!(
        ids(&Outbox::open(dir.path(), Limits::default()).unwrap()),
        vec![0, 1, 2]
    );
    let mut flipped = full.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x55;
    std::fs::write(&path, &flipped).unwrap();
    let mut o = Outbox::open(dir.path(), Limits::default()).unwrap();
    assert_eq!(ids(&o), vec![0, 1]);
    // And it keeps working after recovery.
    o.push(msg(7, Priority::Event, 1)).unwrap();
    drop(o);
    assert_eq!(
        ids(&Outbox::open(dir.path(), Limits::default()).unwrap()),
        vec![0, 1, 7]
    );
}

#[test]
fn full_outbox_drops_routine_first_and_never_order_results() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: u64::MAX,
        max_messages: 4,
    };
    let mut o = Outbox::open(dir.path(), limits).unwrap();
    o.push(msg(1, Priority::Routine, 10)).unwrap();
    o.push(msg(2, Priority::Event, 10)).unwrap();
    o.push(msg(3, Priority::Routine, 10)).unwrap();
    o.push(msg(4, Priority::Critical, 10)).unwrap();
    // An event evicts the oldest routine message.
    o.push(msg(5, Priority::Event, 10)).unwrap();
    assert_eq!(ids(&o), vec![2, 3, 4, 5]);
    // A routine message evicts the remaining routine one.
    o.push(msg(6, Priority::Routine, 10)).unwrap();
    assert_eq!(ids(&o), vec![2, 4, 5, 6]);
    // An order result evicts routine, then the oldest event.
    o.push(msg(7, Priority::Critical, 10)).unwrap();
    o.push(msg(8, Priority::Critical, 10)).unwrap();
    assert_eq!(ids(&o), vec![4, 5, 7, 8]);
    // Routine input cannot evict events or order results: refused, nothing lost.
    assert!(matches!(
        o.push(msg(9, Priority::Routine, 10)),
        Err(OutboxError::Full {
            held_messages: 4,
            ..
        })
    ));
    o.push(msg(10, Priority::Critical, 10)).unwrap();
    assert_eq!(ids(&o), vec![4, 7, 8, 10]);
    // Only order results left: even an order result is refused (the caller keeps it).
    assert!(matches!(
        o.push(msg(11, Priority::Critical, 10)),
        Err(OutboxError::Full { .. })
    ));
    let stats = o.stats();
    assert_eq!(stats.dropped, [3, 2, 0]);
    assert_eq!(stats.per_priority, [0, 0, 4]);
    // Drops are durable too.
    drop(o);
    assert_eq!(
        ids(&Outbox::open(dir.path(), limits).unwrap()),
        vec![4, 7, 8, 10]
    );
    // A message larger than the byte limit can never fit.
    let tiny = Limits {
        max_bytes: 100,
        max_messages: 10,
    };
    let d2 = tempfile::tempdir().unwrap();
    assert!(matches!(
        Outbox::open(d2.path(), tiny)
            .unwrap()
            .push(msg(1, Priority::Critical, 200)),
        Err(OutboxError::TooLarge(_))
    ));
}

#[test]
fn compaction_keeps_everything_pending() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Outbox::open(dir.path(), Limits::default()).unwrap();
    for n in 0..400 {
        o.push(msg(n, Priority::Routine, 4000)).unwrap();
        if n % 4 != 0 {
            o.ack(n).unwrap();
        }
    }
    let before = o.stats();
    assert!(
        before.file_bytes < 1_000_000,
        "compacted: {}",
        before.file_bytes
    );
    drop(o);
    let o = Outbox::open(dir.path(), Limits::default()).unwrap();
    assert_eq!(ids(&o), (0..400).filter(|n| n % 4 == 0).collect::<Vec<_>>());
}

/// The child half of `sigkill_mid_stream_loses_nothing_accepted`: pushes until killed and
/// prints each sequence number after `push` returned.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("EPMC_OUTBOX_CHILD_DIR") else {
        return; // only meaningful when started by the parent test
    };
    let mut o = Outbox::open(&dir, Limits::default()).unwrap();
    let start: u64 = std::env::var("EPMC_OUTBOX_CHILD_START")
        .unwrap()
        .parse()
        .unwrap();
    let out = std::io::stdout();
    for n in start..start + 100_000 {
        let seq = o.push(msg(n, Priority::Routine, 200)).unwrap();
        let mut lock = out.lock();
        writeln!(lock, "pushed {n} {seq}").unwrap();
        lock.flush().unwrap();
    }
}

#[test]
fn sigkill_mid_stream_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut accepted: Vec<u64> = Vec::new();
    for round in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("EPMC_OUTBOX_CHILD_DIR", dir.path())
            .env("EPMC_OUTBOX_CHILD_START", (round * 1_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let target = 200 + round as usize * 50;
        let mut this_round = 0;
        while this_round < target && Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            // libtest may print "test crash_child ... " before the first line.
            if let Some((_, rest)) = line.split_once("pushed ") {
                let n: u64 = rest.split(' ').next().unwrap().parse().unwrap();
                accepted.push(n);
                this_round += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL, mid-stream
        child.wait().unwrap();
        // Lines printed before the kill are accepted messages too.
        for line in lines.map_while(Result::ok) {
            if let Some((_, rest)) = line.split_once("pushed ") {
                accepted.push(rest.split(' ').next().unwrap().parse().unwrap());
            }
        }
        assert_eq!(this_round, target, "child pushed in time");
    }
    let o = Outbox::open(dir.path(), Limits::default()).unwrap();
    let held = ids(&o);
    // Every accepted message is there exactly once, in push order (a message whose push had
    // not returned when the child died may or may not be there, after the accepted ones).
    let mut expected_pos = 0;
    for n in &held {
        if expected_pos < accepted.len() && *n == accepted[expected_pos] {
            expected_pos += 1;
        } else {
            assert!(!accepted.contains(n), "{n} out of order or duplicated");
        }
    }
    assert_eq!(
        expected_pos,
        accepted.len(),
        "all accepted messages present, in order"
    );
    let mut dedup = held.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), held.len(), "no duplicates");
}

#[derive(Debug, Clone)]
enum Op {
    Push(u8, u8),
    Ack(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..50).prop_map(|(p, s)| Op::Push(p, s)),
        2 => (0usize..20).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn pending_is_pushed_minus_acked_in_order(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), Limits::default()).unwrap();
        let mut model: Vec<u64> = Vec::new();
        let mut n = 0u64;
        for op in ops {
            match op {
                Op::Push(p, size) => {
                    let prio = [Priority::Routine, Priority::Event, Priority::Critical][p as usize];
                    o.push(msg(n, prio, size as usize)).unwrap();
                    model.push(n);
                    n += 1;
                }
                Op::Ack(i) => {
                    if !model.is_empty() {
                        let i = i % model.len();
                        let seq = o.pending().nth(i).unwrap().seq;
                        prop_assert!(o.ack(seq).unwrap());
                        model.remove(i);
                    }
                }
                Op::Reopen => {
                    drop(o);
                    o = Outbox::open(dir.path(), Limits::default()).unwrap();
                }
            }
            prop_assert_eq!(ids(&o), model.clone());
        }
    }
}
