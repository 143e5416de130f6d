//! A publisher (agent) process killed with SIGKILL mid-stream and started again: every
//! message its outbox accepted reaches a real Mosquitto, exactly once after de-duplication
//! by id, in order.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use epmc_transport::client::{MqttOptions, TlsIdentity};
use epmc_transport::forward::Forwarder;
use epmc_transport::outbox::{Limits, Outbox};
use epmc_transport::session::MqttSession;
use epmc_transport::{MessageId, OutboundMessage, Priority};

const A: &str = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
const SECOND_START: u32 = 100_000;
const SECOND_COUNT: u32 = 50;

fn topic() -> String {
    format!("epmc/v1/agents/{A}/telemetry")
}

fn msg(n: u32) -> OutboundMessage {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    OutboundMessage {
        id: MessageId::from_bytes(id),
        topic: topic(),
        payload: Bytes::copy_from_slice(&n.to_be_bytes()),
        priority: Priority::Routine,
    }
}

/// The agent stand-in, run as a child process by the test below: pushes messages into its
/// outbox (printing each one once `push` returned) while a [`Forwarder`] drains the outbox
/// through an [`MqttSession`], removing messages only after their PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_child() {
    let Ok(dir) = std::env::var("EPMC_PUB_CHILD_DIR") else {
        return; // only meaningful when started by the parent test
    };
    let dir = std::path::PathBuf::from(dir);
    let addr: SocketAddr = std::env::var("EPMC_PUB_CHILD_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let start: u32 = std::env::var("EPMC_PUB_CHILD_START")
        .unwrap()
        .parse()
        .unwrap();
    let count: u32 = std::env::var("EPMC_PUB_CHILD_COUNT")
        .unwrap()
        .parse()
        .unwrap();
    let tls = TlsIdentity::from_files(
        dir.join("ca.crt"),
        dir.join("agent.crt"),
        dir.join("agent.key"),
    )
    .unwrap();
    let session =
        Arc::new(MqttSession::start(MqttOptions::new(addr, "localhost", A), tls, &[]).unwrap());
    let outbox = Arc::new(Mutex::new(
        Outbox::open(dir.join("outbox"), Limits::default()).unwrap(),
    ));
    let forwarder = Arc::new(Forwarder::new(outbox.clone(), session).with_window(8));
    let wake = forwarder.waker();
    let running = forwarder.spawn(Duration::from_millis(50));
    for n in start..start.saturating_add(count) {
        outbox.lock().unwrap().push(msg(n)).unwrap();
        println!("accepted {n}");
        std::io::stdout().flush().unwrap();
        wake.notify_one();
        tokio::task::yield_now().await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !outbox.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
    println!("drained {}", outbox.lock().unwrap().is_empty());
}

fn spawn_child(
    dir: &std::path::Path,
    addr: SocketAddr,
    start: u32,
    count: u32,
) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "publisher_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EPMC_PUB_CHILD_DIR", dir)
        .env("EPMC_PUB_CHILD_ADDR", addr.to_string())
        .env("EPMC_PUB_CHILD_START", start.to_string())
        .env("EPMC_PUB_CHILD_COUNT", count.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn sigkilled_publisher_loses_nothing_it_accepted() {
    let broker = support::Broker::start();
    let dir = broker.dir.path().to_path_buf();
    let (cert, key) = broker.ca.client(A);
    std::fs::write(dir.join("agent.crt"), cert).unwrap();
    std::fs::write(dir.join("agent.key"), key).unwrap();
    let last = (SECOND_START + SECOND_COUNT - 1).to_be_bytes();
    let watcher = tokio::spawn({
        let (addr, id) = (broker.addr, broker.ca.identity(support::SERVER));
        async move { support::collect_until(addr, id, &topic(), &last).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // let the watcher subscribe

    // First run: killed with SIGKILL after 150 accepted messages.
    let accepted = tokio::task::spawn_blocking({
        let dir = dir.clone();
        let addr = broker.addr;
        move || {
            let mut child = spawn_child(&dir, addr, 0, 1_000_000);
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let mut accepted = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while accepted.len() < 150 && Instant::now() < deadline {
                let Some(Ok(line)) = lines.next() else { break };
                // libtest may print "test publisher_child ... " before the first line.
                if let Some((_, n)) = line.split_once("accepted ") {
                    accepted.push(n.trim().parse::<u32>().unwrap());
                }
            }
            child.kill().unwrap(); // SIGKILL mid-stream
            child.wait().unwrap();
            // Whatever it printed before dying was accepted too: read the rest of the pipe.
            for line in lines.map_while(Result::ok) {
                if let Some((_, n)) = line.split_once("accepted ") {
                    accepted.push(n.trim().parse::<u32>().unwrap());
                }
            }
            accepted
        }
    })
    .await
    .unwrap();
    assert!(accepted.len() >= 150, "first publisher ran");

    // Second run: replays what the first left in its outbox, then sends 50 more.
    let drained = tokio::task::spawn_blocking({
        let dir = dir.clone();
        let addr = broker.addr;
        move || {
            let child = spawn_child(&dir, addr, SECOND_START, SECOND_COUNT);
            let out = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout).contains("drained true")
        }
    })
    .await
    .unwrap();
    assert!(drained, "second publisher emptied its outbox");

    let got: Vec<u32> = tokio::time::timeout(Duration::from_secs(90), watcher)
        .await
        .expect("watcher ends")
        .unwrap()
        .iter()
        .map(|p| u32::from_be_bytes(p[..4].try_into().unwrap()))
        .collect();
    let mut expected = accepted.clone();
    expected.extend(SECOND_START..SECOND_START + SECOND_COUNT);
    // The first process may have stored one more message (push returned, killed before it
    // printed): it is delivered too, right after the last accepted one.
    let extra = accepted.last().map(|n| n + 1);
    let got_without_extra: Vec<u32> = got.iter().copied().filter(|n| Some(*n) != extra).collect();
    assert_eq!(
        got_without_extra, expected,
        "every accepted message, once, in order"
    );
}
