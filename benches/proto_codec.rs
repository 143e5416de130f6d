//! Encoding and decoding agent messages: a status snapshot and a full collection with 30 days
//! of hourly history. The reference is `serde_json` parsing the same bytes into an untyped
//! `serde_json::Value` (no validation), measured in the same group.
//!
//! Run: `cargo bench -p epmc-benches --bench proto_codec`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use epmc_proto::sample::{collection, sample};
use epmc_proto::{Envelope, Kind, Message};

fn bench(c: &mut Criterion) {
    let inputs = [
        ("snapshot", sample(Kind::Snapshot)),
        (
            "collection_30d",
            Envelope {
                message: Message::Collection(Box::new(collection(30))),
                ..sample(Kind::Collection)
            },
        ),
    ];
    for (name, envelope) in inputs {
        let json = envelope.to_json().expect("encodes");
        println!("proto_codec: {name} is {} bytes of JSON", json.len());
        let mut g = c.benchmark_group(format!("proto_{name}"));
        g.throughput(Throughput::Bytes(json.len() as u64));
        g.bench_function("encode", |b| b.iter(|| black_box(&envelope).to_json()));
        g.bench_function("decode", |b| {
            b.iter(|| Envelope::from_json(black_box(&json)))
        });
        g.bench_function("serde_json_value_baseline", |b| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&json)))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
