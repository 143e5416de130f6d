//! ESC/VP21 reply-stream decoding and command encoding, beside a plain `memchr` split of the
//! same bytes. Also checks (outside the timed loops) that decoding allocates nothing.
//!
//! Run: `cargo bench -p epmc-benches --bench escvp_codec`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use escvp::value::{Mute, OnOff, Power, PowerCommand, Property, Source, SourceCode};
use escvp::vp21::{Command, Reply, ReplyDecoder};

/// Counts allocations so the bench can state "0 allocations per decoded reply".
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A realistic mix: acks, short values, a serial number, ERR, IMEVENT, a multi-line reply.
fn stream(repeats: usize) -> (Vec<u8>, usize) {
    let unit: &[&[u8]] = &[
        b":",
        b"PWR=01\r:",
        b"\r:",
        b"SOURCE=30\r:",
        b"SNO=X8JK0000001\r:",
        b"ERR\r:",
        b"IMEVENT=0001 03 00000002 00000000 T1 F1\r:",
        b"LAMP=1633 1633\r:",
        b"MUTE=OFF\r:",
        b":",
        b"R=126 126 126\rG=128 128 128\rB=127 127 127\r:",
        b"ERR=00\r:",
    ];
    let mut out = Vec::new();
    for _ in 0..repeats {
        for r in unit {
            out.extend_from_slice(r);
        }
    }
    (out, unit.len() * repeats)
}

/// Decodes every reply and uses it the way a session does (looks at the kind, the key and
/// the value, decodes the IMEVENT fields), folding what it saw into a checksum that goes to
/// `black_box` (handing each `&Reply` to `black_box` instead would force every reply through
/// memory, which a real consumer does not do).
fn decode_all(bytes: &[u8]) -> usize {
    let mut dec = ReplyDecoder::new();
    let mut rest = bytes;
    let mut n = 0;
    let mut seen = 0usize;
    while let Ok(Some((used, reply))) = dec.decode(rest) {
        seen = seen.wrapping_add(match reply {
            Reply::Ack => 1,
            Reply::Err => 2,
            Reply::Value { key, value } => key.len() ^ value.len(),
            Reply::Lines(lines) => lines.raw().len(),
            Reply::Event(e) => e.report().map_or(3, |r| usize::from(r.status.get())),
        });
        rest = &rest[used..];
        n += 1;
    }
    black_box(seen);
    n
}

/// The reference: a plain line split on the colon with `memchr`, handing each slice on.
fn memchr_split(bytes: &[u8]) -> usize {
    let mut start = 0;
    let mut n = 0;
    for end in memchr::memchr_iter(b':', bytes) {
        black_box(&bytes[start..end]);
        start = end + 1;
        n += 1;
    }
    n
}

fn bench(c: &mut Criterion) {
    let (bytes, replies) = stream(1000);
    assert_eq!(decode_all(&bytes), replies);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let decoded = decode_all(&bytes);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "escvp_codec: {decoded} replies in {} bytes decoded with {allocations} heap allocation(s)",
        bytes.len()
    );
    assert_eq!(allocations, 0, "decoding must not allocate");

    let mut g = c.benchmark_group("reply_stream_bytes");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("escvp_decode", |b| b.iter(|| decode_all(black_box(&bytes))));
    g.bench_function("memchr_split_baseline", |b| {
        b.iter(|| memchr_split(black_box(&bytes)))
    });
    g.finish();

    let mut g = c.benchmark_group("reply_stream_replies");
    g.throughput(Throughput::Elements(replies as u64));
    g.bench_function("escvp_decode", |b| b.iter(|| decode_all(black_box(&bytes))));
    g.finish();

    let commands = [
        Power::query(),
        PowerCommand::On.command(),
        Source::set(&SourceCode::HDMI2).unwrap(),
        Mute::set(&OnOff::On).unwrap(),
        Command::Null,
    ];
    let mut g = c.benchmark_group("command_encode");
    g.throughput(Throughput::Elements(commands.len() as u64));
    let mut buf = Vec::with_capacity(256);
    g.bench_function("escvp_encode", |b| {
        b.iter(|| {
            buf.clear();
            for cmd in &commands {
                black_box(cmd).encode(&mut buf);
            }
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
