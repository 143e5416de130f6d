//! QoS 1 publish throughput through a real Mosquitto over mTLS: our `MqttClient` (pipelined
//! within its in-flight window) beside `mosquitto_pub -l` publishing the same number of
//! messages of the same size with the same certificate, measured in the same run. Prints a
//! table. `cargo bench -p epmc-benches --bench mqtt_publish` runs 5000 messages per side; run
//! as a test (`cargo test --benches`) it does a 200-message smoke run.

#[path = "../crates/epmc-transport/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use epmc_transport::client::MqttClient;
use epmc_transport::mqtt::QoS;

const AGENT: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const PAYLOAD: usize = 200;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 5000 } else { 200 };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let broker = support::Broker::start();
    let topic = format!("epmc/v1/agents/{AGENT}/telemetry");

    // Ours.
    let ours = rt.block_on(async {
        let mut opts = broker.options(AGENT);
        opts.in_flight = 64;
        let id = broker.ca.identity(AGENT);
        let (client, _, _rx) = MqttClient::connect(&opts, &id).await.expect("connects");
        let payload = Bytes::from(vec![b'x'; PAYLOAD]);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let c = client.clone();
            let (t, p) = (topic.clone(), payload.clone());
            tasks.spawn(async move { c.publish(&t, p, QoS::AtLeastOnce, false).await });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("task").expect("PUBACK");
        }
        start.elapsed()
    });

    // Reference: mosquitto_pub reading one message per line, QoS 1, same TLS identity.
    let (cert, key) = broker.ca.client(AGENT);
    let d = broker.dir.path();
    std::fs::write(d.join("bench.crt"), cert).expect("write");
    std::fs::write(d.join("bench.key"), key).expect("write");
    let line = "x".repeat(PAYLOAD);
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
        for _ in 0..n {
            writeln!(stdin, "{line}").expect("write to mosquitto_pub");
        }
    }
    let status = child.wait().expect("mosquitto_pub ends");
    let reference = start.elapsed();
    assert!(status.success(), "mosquitto_pub failed: {status}");

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!("mqtt_publish: {n} QoS 1 messages of {PAYLOAD} bytes over mTLS to Mosquitto");
    println!("| publisher | time | messages/s |");
    println!("|---|---|---|");
    println!(
        "| epmc-transport MqttClient (window 64) | {:.1} ms | {:.0} |",
        ours.as_secs_f64() * 1e3,
        rate(ours)
    );
    println!(
        "| mosquitto_pub -l -q 1 (reference, incl. process start and handshake) | {:.1} ms | {:.0} |",
        reference.as_secs_f64() * 1e3,
        rate(reference)
    );
}
