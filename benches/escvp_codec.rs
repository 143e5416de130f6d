//! ESC/VP21 codec throughput: decoding a realistic mixed reply stream with
//! `escvp::vp21::ReplyDecoder`, against a plain `memchr` split of the same bytes on `:` in the
//! same group, and encoding commands.
//!
//! Run: `cargo bench -p epmc-benches --bench escvp_codec`. Figures go to `BENCHMARKS.md`.
//!
//! The binary counts heap allocations with `stats_alloc` (a wrapper around the system
//! allocator, no `unsafe` here) and refuses to run if decoding the stream allocates.

use std::alloc::System;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use escvp::value::{Power, PowerCommand, Property, Source, SourceCode};
use escvp::vp21::{Command, Reply, ReplyDecoder};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What a fleet agent sees on a busy ESC/VP.net session: mostly acks and single values,
/// some refusals and status events, now and then a multi-line reply. Weights per 16 replies.
const MIX: &[&[u8]] = &[
    b":",
    b":",
    b"\r:",
    b"PWR=01\r:",
    b"PWR=04\r:",
    b"SOURCE=30\r:",
    b"SNO=X8JK0000001\r:",
    b"LAMP=1633 1633\r:",
    b"MUTE=OFF\r:",
    b"VOL=120\r:",
    b"ERR\r:",
    b"IMEVENT=0001 03 00000002 00000000 T1 F1\r:",
    b"PWSTATUS=01 00000000 00000000 T1 F1\r:",
    b"SOURCELIST=30 HDMI1 A0 HDMI2 53 LAN\r:",
    b"ERR=00\r:",
    b"R=126 126 126\rG=126 126 126\rB=126 126 126\r:",
];

/// The mix repeated to about 64 KiB, and the number of replies in it.
fn stream() -> (Vec<u8>, usize) {
    let mut buf = Vec::with_capacity(70_000);
    let mut n = 0;
    while buf.len() < 64 * 1024 {
        for r in MIX {
            buf.extend_from_slice(r);
            n += 1;
        }
    }
    (buf, n)
}

/// Decodes every reply in `buf`; returns how many, folding each into a checksum so that
/// nothing is optimised away. (IMEVENT fields are parsed on demand by
/// `StatusEvent::report`, measured separately in `escvp_imevent_parse`.)
fn decode_all(buf: &[u8]) -> (usize, usize) {
    let mut dec = ReplyDecoder::new();
    let mut rest = buf;
    let mut count = 0;
    let mut sum = 0usize;
    while let Ok(Some((n, reply))) = dec.decode(rest) {
        sum = sum.wrapping_add(match reply {
            Reply::Ack => 1,
            Reply::Err => 2,
            Reply::Value { key, value } => key.len() + value.len(),
            Reply::Lines(l) => l.raw().len(),
            Reply::Event(e) => e.raw().len(),
        });
        count += 1;
        rest = &rest[n..];
    }
    (count, sum)
}

/// The reference: split the same bytes at every `:` with `memchr`, touching each piece.
fn memchr_split(buf: &[u8]) -> (usize, usize) {
    let mut start = 0;
    let mut count = 0;
    let mut sum = 0usize;
    for at in memchr::memchr_iter(b':', buf) {
        let piece = black_box(&buf[start..at]);
        sum = sum.wrapping_add(piece.len());
        count += 1;
        start = at + 1;
    }
    (count, sum)
}

fn bench_decode(c: &mut Criterion) {
    let (buf, replies) = stream();
    let (decoded, _) = decode_all(&buf);
    assert_eq!(decoded, replies, "every reply of the stream decodes");

    let region = Region::new(GLOBAL);
    black_box(decode_all(black_box(&buf)));
    let stats = region.change();
    assert_eq!(
        stats.allocations + stats.reallocations,
        0,
        "decoding a reply stream must not allocate"
    );
    println!(
        "escvp_reply_stream: {} bytes, {} replies ({:.1} bytes/reply), {} heap allocations while decoding",
        buf.len(),
        replies,
        buf.len() as f64 / replies as f64,
        stats.allocations
    );

    let mut g = c.benchmark_group("escvp_reply_stream");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("escvp_reply_decoder", |b| {
        b.iter(|| decode_all(black_box(&buf)))
    });
    g.bench_function("memchr_split_reference", |b| {
        b.iter(|| memchr_split(black_box(&buf)))
    });
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let commands: Vec<Command> = vec![
        Power::query(),
        PowerCommand::On.command(),
        Source::set(&SourceCode::HDMI2).expect("valid"),
        Command::query("SNO").expect("valid"),
        Command::query("LAMP").expect("valid"),
        Command::Null,
        Command::set("VOL", "120").expect("valid"),
        Command::query("PWSTATUS").expect("valid"),
    ];
    let mut out = bytes::BytesMut::with_capacity(4096);
    let mut g = c.benchmark_group("escvp_command_encode");
    g.throughput(Throughput::Elements(commands.len() as u64));
    g.bench_function("encode_8_commands", |b| {
        b.iter(|| {
            out.clear();
            for cmd in &commands {
                black_box(cmd).encode(&mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();
}

fn bench_imevent(c: &mut Criterion) {
    let mut g = c.benchmark_group("escvp_imevent_parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("status_report_parse_imevent", |b| {
        b.iter(|| {
            escvp::event::StatusReport::parse_imevent(black_box("0001 03 00000002 00000000 T1 F1"))
                .map(|r| r.status.get())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_decode, bench_encode, bench_imevent);
criterion_main!(benches);
