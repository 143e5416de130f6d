//! QoS 1 publish throughput through a real Mosquitto over mTLS, measured in one run:
//! - our `MqttClient`, pipelined in order within its in-flight window;
//! - the agent's durable path: a `Forwarder` draining a filled `Outbox` through an
//!   `MqttSession` (each message leaves the outbox only after its PUBACK);
//! - the reference, `mosquitto_pub -l` publishing the same number of messages of the same
//!   size with the same certificate authority, and `mosquitto_pub` with one message (its
//!   process start and handshake, to subtract).
//!
//! Prints a table. `cargo bench -p epmc-benches --bench mqtt_publish` runs 50 000 messages per
//! row (`EPMC_BENCH_MESSAGES=N` for another count); run as a test (`cargo test --benches`) it
//! does a 200-message smoke run.

#[path = "../crates/epmc-transport/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use epmc_transport::client::MqttClient;
use epmc_transport::forward::Forwarder;
use epmc_transport::mqtt::QoS;
use epmc_transport::outbox::{Limits, Outbox};
use epmc_transport::session::MqttSession;
use epmc_transport::{MessageId, OutboundMessage, Priority};

const AGENT: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const PAYLOAD: usize = 200;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("EPMC_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 50_000 } else { 200 });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let broker = support::Broker::start();
    let topic = format!("epmc/v1/agents/{AGENT}/telemetry");

    // Ours: one connection, publishes handed over in order, PUBACKs collected after.
    let ours = rt.block_on(async {
        let mut opts = broker.options(AGENT);
        opts.in_flight = 64;
        let id = broker.ca.identity(AGENT);
        let (client, _, _rx) = MqttClient::connect(&opts, &id).await.expect("connects");
        let payload = Bytes::from(vec![b'x'; PAYLOAD]);
        let start = Instant::now();
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            pending.push(
                client
                    .send_publish(&topic, payload.clone(), QoS::AtLeastOnce, false)
                    .await
                    .expect("handed over"),
            );
        }
        for p in pending {
            p.acked().await.expect("PUBACK");
        }
        start.elapsed()
    });

    // The agent's path: outbox → forwarder → session.
    let outbox_dir = tempfile::tempdir().expect("temp dir");
    let forwarded = rt.block_on(async {
        let mut outbox = Outbox::open(outbox_dir.path(), Limits::default()).expect("outbox");
        for i in 0..n {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            outbox
                .push(OutboundMessage {
                    id: MessageId::from_bytes(id),
                    topic: topic.clone(),
                    payload: Bytes::from(vec![b'x'; PAYLOAD]),
                    priority: Priority::Routine,
                })
                .expect("push");
        }
        let outbox = Arc::new(Mutex::new(outbox));
        let mut opts = broker.options(AGENT);
        opts.client_id = format!("{AGENT}-fwd");
        opts.in_flight = 64;
        let session =
            Arc::new(MqttSession::start(opts, broker.ca.identity(AGENT), &[]).expect("session"));
        assert!(session.wait_connected(Duration::from_secs(10)).await);
        let forwarder = Forwarder::new(outbox.clone(), session).with_window(64);
        let start = Instant::now();
        let sent = forwarder.drain().await.expect("drained");
        assert_eq!(sent, n as u64);
        start.elapsed()
    });

    // Reference: mosquitto_pub reading one message per line, QoS 1, same TLS identity.
    let (cert, key) = broker.ca.client(AGENT);
    let d = broker.dir.path();
    std::fs::write(d.join("bench.crt"), cert).expect("write");
    std::fs::write(d.join("bench.key"), key).expect("write");
    let line = "x".repeat(PAYLOAD);
    let mosquitto_pub = |count: usize| {
        let start = Instant::now();
        let mut child = Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &broker.addr.port().to_string(),
                "-q",
                "1",
                "-l",
            ])
            .args(["-t", &topic, "-i", &format!("{AGENT}-pub")])
            .arg("--cafile")
            .arg(d.join("ca.crt"))
            .arg("--cert")
            .arg(d.join("bench.crt"))
            .arg("--key")
            .arg(d.join("bench.key"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub is installed (scripts/setup)");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            for _ in 0..count {
                writeln!(stdin, "{line}").expect("write to mosquitto_pub");
            }
        }
        let status = child.wait().expect("mosquitto_pub ends");
        assert!(status.success(), "mosquitto_pub failed: {status}");
        start.elapsed()
    };
    let reference = mosquitto_pub(n);
    let startup = mosquitto_pub(1);

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("mqtt_publish: {n} QoS 1 messages of {PAYLOAD} bytes over mTLS to Mosquitto");
    println!("| publisher | time | messages/s |");
    println!("|---|---|---|");
    println!(
        "| epmc-transport MqttClient, in order, window 64 | {:.1} ms | {:.0} |",
        ours.as_secs_f64() * 1e3,
        rate(ours)
    );
    println!(
        "| epmc-transport Outbox → Forwarder (window 64) → MqttSession (window 64) | {:.1} ms | {:.0} |",
        forwarded.as_secs_f64() * 1e3,
        rate(forwarded)
    );
    println!(
        "| mosquitto_pub -l -q 1 (reference, incl. process start and handshake) | {:.1} ms | {:.0} |",
        reference.as_secs_f64() * 1e3,
        rate(reference)
    );
    let net = reference.saturating_sub(startup);
    println!(
        "| mosquitto_pub marginal: the run above minus a 1-message run ({:.1} ms) | {:.1} ms | {:.0} |",
        startup.as_secs_f64() * 1e3,
        net.as_secs_f64() * 1e3,
        rate(net)
    );
}
