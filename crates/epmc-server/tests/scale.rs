//! Scale mode on loopback, as `deploy/scale/README.md` describes it: a real Mosquitto run with
//! `deploy/scale/mosquitto.conf` and `acl` (paths and port substituted), one PostgreSQL
//! (`EPMC_TEST_POSTGRES_URL`, a schema of its own; with `CI=true` it must be set), and two
//! `epmc-server serve --broker` replicas as processes of the built binary, consuming with a
//! shared subscription. Simulated agents (the transport's MQTT client, certificates from the
//! server's CA) publish QoS 1 messages.
//!
//! - Every message the broker acknowledged is stored exactly once, although one replica is
//!   SIGKILLed mid-run (and restarted, as its supervisor would).
//! - An order reaches its agent through the broker and its result is applied; an order for an
//!   offline agent waits in its session at the broker and arrives when it reconnects.
//! - A revocation is written to the broker's CRL file; after a SIGHUP, and after a restart,
//!   the broker refuses the revoked agent (whether a SIGHUP ends its open connection is
//!   measured and printed).
//! - What waits in the broker for stopped replicas survives a graceful broker restart; after a
//!   broker crash (SIGKILL) before its autosave, what it had acknowledged since is measured and
//!   printed (deploy/scale/README.md reports it).

mod pg;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use epmc_proto::bounded::Timestamp;
use epmc_proto::model::{DeviceEvent, DeviceEventKind, PowerState};
use epmc_proto::order::{OrderAction, OrderOutcome, OrderResult};
use epmc_proto::topic::{self, AgentId};
use epmc_proto::{Envelope, Kind, Message, sample};
use epmc_server::ca::AgentBundle;
use epmc_server::datadir;
use epmc_server::store::{OrderState, OrderTarget, Store, TenantId};
use epmc_transport::client::{MqttClient, MqttOptions, PendingAck, TlsIdentity};
use epmc_transport::mqtt::{QoS, TopicName, Will};
use time::OffsetDateTime;

const CONFIG: &str = include_str!("../../../deploy/scale/mosquitto.conf");
const ACL: &str = include_str!("../../../deploy/scale/acl");

const AGENTS: usize = 4;
const PER_AGENT: u64 = 250;
const WINDOW: usize = 16;
const BASE: i64 = 1_800_000_000;
/// Any single wait in this test.
const BOUND: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped configuration with its files in `dir`, listening on `127.0.0.1:port`, as
/// the current user, logging to stderr. Each substitution must find its line.
fn render_config(dir: &Path, port: u16) -> String {
    let d = dir.display().to_string();
    let mut found = [false; 3];
    let mut out = String::new();
    for line in CONFIG.lines() {
        let line = if line == "listener 8883" {
            found[0] = true;
            format!("listener {port} 127.0.0.1")
        } else if line.contains("/etc/mosquitto/epmc/") {
            found[1] = true;
            line.replace("/etc/mosquitto/epmc/", &format!("{d}/"))
        } else if line == "persistence_location /var/lib/mosquitto/" {
            found[2] = true;
            format!("persistence_location {d}/")
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push('\n');
    }
    assert_eq!(
        found, [true; 3],
        "deploy/scale/mosquitto.conf changed shape"
    );
    assert!(!out.contains("/etc/") && !out.contains("/var/"), "{out}");
    out.push_str("# test only\nuser root\nlog_dest stderr\n");
    out
}

struct Broker {
    child: Option<Child>,
    addr: SocketAddr,
    config: PathBuf,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        Broker::start_with(dir, |c| c)
    }

    /// With the rendered configuration changed by `edit`. The port is found by closing a
    /// listener (Mosquitto cannot pick one and say which), so another process may take it
    /// first: then Mosquitto exits, and a new port is tried.
    fn start_with(dir: &Path, edit: impl Fn(String) -> String) -> Broker {
        std::fs::write(dir.join("acl"), ACL).unwrap();
        let config = dir.join("mosquitto.conf");
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(&config, edit(render_config(dir, port))).unwrap();
            let mut b = Broker {
                child: None,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                config: config.clone(),
            };
            if b.try_launch() {
                return b;
            }
        }
        panic!("mosquitto found no free port in 5 tries");
    }

    /// Starts Mosquitto again on its port and state.
    fn launch(&mut self) {
        assert!(
            self.try_launch(),
            "mosquitto exited: its port {} was taken",
            self.addr
        );
    }

    /// Starts Mosquitto and waits until it listens; false if it exited instead (its port was
    /// taken). Something answering on the port while Mosquitto is gone is not taken for it.
    fn try_launch(&mut self) -> bool {
        let mosquitto = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is installed (scripts/setup)");
        self.child = Some(
            Command::new(mosquitto)
                .arg("-c")
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(if std::env::var_os("EPMC_BROKER_LOG").is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .spawn()
                .expect("mosquitto starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let child = self.child.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            if TcpStream::connect(self.addr).is_ok() {
                // Listening, unless the connection reached someone else and Mosquitto is
                // about to exit for want of the port: look once more.
                std::thread::sleep(Duration::from_millis(50));
                if child.try_wait().unwrap().is_none() {
                    return true;
                }
                self.child = None;
                return false;
            }
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGTERM (Mosquitto saves its state), then start again on the same port and state.
    fn restart(&mut self) {
        self.signal("TERM");
        let mut c = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "mosquitto did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.launch();
    }

    /// SIGKILL (a crash: nothing saved since the last autosave), then start again.
    fn crash_and_restart(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `epmc-server serve --broker` process.
struct Replica {
    child: Child,
    name: String,
    stdout: std::sync::mpsc::Receiver<String>,
    /// One `()` each time it (re)subscribes at the broker.
    ready: std::sync::mpsc::Receiver<()>,
    /// How many commits failed (its "nothing acknowledged" warnings so far).
    failed_commits: Arc<AtomicU64>,
}

impl Replica {
    /// Starts it and waits until it has subscribed at the broker.
    fn start(data: &Path, db: &str, broker: SocketAddr, name: &str, crl: &Path) -> Replica {
        let mut child = Command::new(env!("CARGO_BIN_EXE_epmc-server"))
            .arg("--data")
            .arg(data)
            .arg("--database")
            .arg(db)
            .args([
                "serve",
                "--https",
                "127.0.0.1:0",
                "--broker",
                &format!("mqtts://127.0.0.1:{}", broker.port()),
                "--broker-client-id",
                name,
                "--broker-crl",
            ])
            .arg(crl)
            .env("RUST_LOG", "warn,epmc_server::broker=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the epmc-server binary starts");
        let (out_tx, out_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let tag = name.to_owned();
        let failed_commits = Arc::new(AtomicU64::new(0));
        let failed = failed_commits.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("consuming from the broker") {
                    let _ = ready_tx.send(());
                }
                if line.contains("nothing acknowledged") {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                eprintln!("[{tag}] {line}");
            }
        });
        let first = out_rx.recv_timeout(BOUND).expect("a first line");
        assert!(first.starts_with("consuming"), "{name} said {first:?}");
        ready_rx
            .recv_timeout(BOUND)
            .unwrap_or_else(|_| panic!("{name} did not subscribe at the broker"));
        Replica {
            child,
            name: name.to_owned(),
            stdout: out_rx,
            ready: ready_rx,
            failed_commits,
        }
    }

    /// Forgets the subscriptions seen so far (before a broker restart).
    fn forget_subscriptions(&self) {
        while self.ready.try_recv().is_ok() {}
    }

    /// Waits until the replica has subscribed at the broker again (after a broker restart).
    fn wait_resubscribed(&self) {
        self.ready
            .recv_timeout(BOUND)
            .unwrap_or_else(|_| panic!("{} did not subscribe at the broker again", self.name));
    }

    fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns how many messages it committed (its last line).
    fn stop(mut self) -> u64 {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let line = self
            .stdout
            .recv_timeout(BOUND)
            .unwrap_or_else(|_| panic!("{} printed nothing on stop", self.name));
        assert!(self.child.wait().unwrap().success(), "{} exit", self.name);
        line.strip_prefix("stopped: ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}: {line:?}", self.name))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Agent {
    id: AgentId,
    serial: String,
    bundle: AgentBundle,
}

impl Agent {
    fn tls(&self) -> TlsIdentity {
        TlsIdentity::from_pem(
            self.bundle.ca_pem.as_bytes(),
            self.bundle.certificate.pem.as_bytes(),
            self.bundle.key_pem.as_bytes(),
        )
        .unwrap()
    }

    fn options(&self, broker: SocketAddr) -> MqttOptions {
        let mut o = MqttOptions::new(broker, "localhost", &self.id.to_string());
        o.keep_alive = Duration::from_secs(5);
        o.clean_session = false;
        o.will = Some(Will {
            topic: TopicName::new(topic::state(&self.id)).unwrap(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
        });
        o
    }

    /// Connects (retrying within the bound), subscribes to its orders, says `online`.
    async fn connect(
        &self,
        broker: SocketAddr,
    ) -> (
        MqttClient,
        tokio::sync::mpsc::Receiver<epmc_transport::ReceivedOrder>,
    ) {
        let deadline = Instant::now() + BOUND;
        loop {
            match MqttClient::connect(&self.options(broker), &self.tls()).await {
                Ok((c, _, rx)) => {
                    c.subscribe(&[(&topic::orders(&self.id), QoS::AtLeastOnce)])
                        .await
                        .unwrap();
                    c.publish(
                        &topic::state(&self.id),
                        Bytes::from_static(b"online"),
                        QoS::AtLeastOnce,
                        true,
                    )
                    .await
                    .unwrap();
                    return (c, rx);
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "agent cannot connect: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn event(&self, n: u64) -> Bytes {
        Envelope::new(Message::Event(DeviceEvent {
            device_id: self.serial.as_str().try_into().unwrap(),
            at: Timestamp::from_unix(BASE + n as i64).unwrap(),
            event: DeviceEventKind::StatusChange {
                power: Some(PowerState::On),
                warnings: Default::default(),
                alarms: Default::default(),
            },
        }))
        .to_json()
        .unwrap()
        .into()
    }

    fn snapshot(&self) -> Bytes {
        let mut envelope = sample::sample(Kind::Snapshot);
        envelope.id = uuid::Uuid::new_v4();
        match &mut envelope.message {
            Message::Snapshot(s) => s.device_id = self.serial.as_str().try_into().unwrap(),
            other => panic!("sample snapshot is {other:?}"),
        }
        envelope.to_json().unwrap().into()
    }

    /// Publishes events `range` with a window of QoS 1 publishes in flight; returns what the
    /// broker acknowledged (each counted in `acked`).
    async fn publish_events(
        &self,
        client: &MqttClient,
        range: std::ops::Range<u64>,
        acked: &AtomicU64,
    ) -> Vec<u64> {
        let events = topic::events(&self.id);
        let mut in_flight: std::collections::VecDeque<(u64, PendingAck)> = Default::default();
        let mut done = Vec::new();
        let mut next = range.start;
        loop {
            while in_flight.len() < WINDOW && next < range.end {
                let p = client
                    .send_publish(&events, self.event(next), QoS::AtLeastOnce, false)
                    .await
                    .unwrap();
                in_flight.push_back((next, p));
                next += 1;
            }
            let Some((n, p)) = in_flight.pop_front() else {
                break;
            };
            tokio::time::timeout(BOUND, p.acked())
                .await
                .expect("PUBACK within the bound")
                .expect("the broker acknowledges");
            acked.fetch_add(1, Ordering::Relaxed);
            done.push(n);
        }
        done
    }
}

async fn make_agents(store: &Store, data: &Path, tenant: TenantId, n: usize) -> Vec<Agent> {
    let pki = datadir::load(data).unwrap();
    let mut agents = Vec::new();
    for i in 0..n {
        let id = store
            .admin()
            .create_agent(tenant, &format!("agent {i}"))
            .await
            .unwrap();
        let bundle = pki
            .ca
            .issue_agent_with_key(id.uuid(), OffsetDateTime::now_utc())
            .unwrap();
        let not_after =
            Timestamp::from_unix(bundle.certificate.not_after.unix_timestamp()).unwrap();
        store
            .admin()
            .record_certificate(id, &bundle.certificate.serial.to_hex(), not_after)
            .await
            .unwrap();
        agents.push(Agent {
            id,
            serial: format!("SCALE{i:06}"),
            bundle,
        });
    }
    agents
}

/// Events stored per device serial, by their number (`at - BASE`) → how many times.
async fn stored(store: &Store, tenant: TenantId) -> HashMap<String, BTreeMap<i64, u32>> {
    let mut out: HashMap<String, BTreeMap<i64, u32>> = HashMap::new();
    for d in store.admin().devices().await.unwrap() {
        let events = store.tenant(tenant).events(d.id, 1_000_000).await.unwrap();
        let counts = out.entry(d.key.clone()).or_default();
        for e in events {
            *counts.entry(e.at.unix() - BASE).or_default() += 1;
        }
    }
    out
}

fn total(s: &HashMap<String, BTreeMap<i64, u32>>) -> u64 {
    s.values()
        .flat_map(|m| m.values())
        .map(|c| u64::from(*c))
        .sum()
}

/// Waits (bounded) until `expected` events are stored, or the bound passes.
async fn wait_stored(
    store: &Store,
    tenant: TenantId,
    expected: u64,
) -> HashMap<String, BTreeMap<i64, u32>> {
    let deadline = Instant::now() + BOUND;
    loop {
        let s = stored(store, tenant).await;
        if total(&s) >= expected || Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_mosquitto_store_everything_once() {
    let Some(db) = pg::schema_url().await else {
        return;
    };
    epmc_server::ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    datadir::init(&data, &[]).unwrap();
    // The broker's files, as deploy/scale/README.md has them installed: the data directory's
    // CA and server certificate, and the CRL the server writes (`epmc-server crl` first).
    let etc = dir.path().join("mosquitto");
    std::fs::create_dir(&etc).unwrap();
    for (from, to) in [
        ("ca.crt", "ca.crt"),
        ("server.crt", "server.crt"),
        ("server.key", "server.key"),
    ] {
        std::fs::copy(data.join(from), etc.join(to)).unwrap();
    }
    let crl = etc.join("crl.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_epmc-server"))
        .arg("--data")
        .arg(&data)
        .arg("--database")
        .arg(&db)
        .arg("crl")
        .arg("--out")
        .arg(&crl)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read(&crl)
            .unwrap()
            .starts_with(b"-----BEGIN X509 CRL-----")
    );

    let store = Store::open(&db).await.unwrap();
    let tenant = store.admin().add_tenant("acme").await.unwrap();
    let agents = Arc::new(make_agents(&store, &data, tenant, AGENTS).await);

    let mut broker = Broker::start(&etc);
    let r1 = Replica::start(&data, &db, broker.addr, "epmc-server-1", &crl);
    let r2 = Replica::start(&data, &db, broker.addr, "epmc-server-2", &crl);

    // Phase 1: the agents publish; replica 1 is SIGKILLed after a third is acknowledged.
    let acked = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for i in 0..AGENTS {
        let agents = agents.clone();
        let acked = acked.clone();
        let addr = broker.addr;
        publishers.push(tokio::spawn(async move {
            let a = &agents[i];
            let (client, rx) = a.connect(addr).await;
            client
                .publish(
                    &topic::telemetry(&a.id),
                    a.snapshot(),
                    QoS::AtLeastOnce,
                    false,
                )
                .await
                .unwrap();
            let done = a.publish_events(&client, 0..PER_AGENT, &acked).await;
            (client, rx, done)
        }));
    }
    let all = AGENTS as u64 * PER_AGENT;
    // Mid-run: once a tenth is stored (the replicas are committing), with publishes still
    // coming.
    let deadline = Instant::now() + BOUND;
    let at_kill = loop {
        let n = total(&stored(&store, tenant).await);
        if n >= all / 10 {
            break n;
        }
        assert!(Instant::now() < deadline, "storing stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let acked_at_kill = acked.load(Ordering::Relaxed);
    r1.sigkill();
    let mut clients = Vec::new();
    for p in publishers {
        let (client, rx, done) = p.await.unwrap();
        assert_eq!(done.len() as u64, PER_AGENT, "every publish acknowledged");
        clients.push((client, rx));
    }
    // With replica 1 down: replica 2 carries on; what the broker had routed to replica 1's
    // session waits there.
    let deadline = Instant::now() + BOUND;
    let mut while_down = at_kill;
    while while_down <= at_kill {
        assert!(
            Instant::now() < deadline,
            "replica 2 kept storing after replica 1 died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        while_down = total(&stored(&store, tenant).await);
    }
    // Let replica 2 drain what it can, then see what waits for replica 1.
    let mut settled = while_down;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = total(&stored(&store, tenant).await);
        if now == settled || Instant::now() >= deadline {
            break;
        }
        settled = now;
    }
    eprintln!(
        "scale: {all} events acknowledged by the broker; replica 1 killed at {acked_at_kill} acknowledged and {at_kill} stored; with replica 1 down, replica 2 stored until {settled} ({} wait for replica 1's session)",
        all - settled
    );
    // Replica 1 comes back (its supervisor restarts it) and resumes its session.
    let r1 = Replica::start(&data, &db, broker.addr, "epmc-server-1", &crl);
    let s = wait_stored(&store, tenant, all).await;
    for a in agents.iter() {
        let counts = s.get(&a.serial).expect("the agent's device");
        for n in 0..PER_AGENT as i64 {
            assert_eq!(
                counts.get(&n).copied(),
                Some(1),
                "event {n} of {} stored exactly once",
                a.serial
            );
        }
    }
    assert_eq!(total(&s), all, "nothing else stored");

    // After replica 1's restart, the shared subscription still reaches both replicas:
    // more messages, all stored.
    let extra = PER_AGENT..PER_AGENT + 40;
    let done = agents[1]
        .publish_events(&clients[1].0, extra.clone(), &AtomicU64::new(0))
        .await;
    assert_eq!(done.len(), 40);
    let got = wait_stored_for(&store, tenant, &agents[1].serial, extra.clone()).await;
    let missing: Vec<u64> = extra
        .clone()
        .filter(|n| !got.contains_key(&(*n as i64)))
        .collect();
    assert!(
        missing.is_empty(),
        "after the restart, not stored: {missing:?}"
    );

    // Presence came from the state topic.
    let online = store
        .admin()
        .agents(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.last_seen.is_some())
        .count();
    assert_eq!(online, AGENTS, "each agent's `online` was applied");

    // Phase 2: an order through the broker; the agent's result is applied.
    let order = store
        .orders()
        .create(
            OrderTarget::Agent(agents[0].id),
            &OrderAction::CollectNow,
            "operator",
            Timestamp::from_unix(Timestamp::now().unix() + 600).unwrap(),
        )
        .await
        .unwrap();
    let (client0, rx0) = &mut clients[0];
    let received = tokio::time::timeout(BOUND, rx0.recv())
        .await
        .expect("the order arrives within the bound")
        .expect("the connection is up");
    let envelope = Envelope::from_json(&received.message.payload).unwrap();
    let Message::Order(o) = envelope.message else {
        panic!("not an order: {envelope:?}");
    };
    assert_eq!(o.order_id, order);
    received.ack();
    let result = Envelope::new(Message::OrderResult(OrderResult {
        order_id: order,
        at: Timestamp::now(),
        outcome: OrderOutcome::Done,
        device_reply: None,
    }));
    client0
        .publish(
            &topic::results(&agents[0].id),
            result.to_json().unwrap().into(),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + BOUND;
    loop {
        let state = store.orders().get(order).await.unwrap().state;
        if state == OrderState::Done {
            break;
        }
        if Instant::now() >= deadline {
            diagnose(&db).await;
            panic!("order still {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nobody else got it twice: one delivery to the agent.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), rx0.recv())
            .await
            .is_err(),
        "the order was published once"
    );

    // An order for an agent that is offline (it has connected before): the broker queues it
    // in the agent's persistent session and delivers it when the agent comes back.
    let offline = &agents[2];
    let (c2, rx2) = clients.remove(2);
    drop(rx2);
    drop(c2);
    let order = store
        .orders()
        .create(
            OrderTarget::Agent(offline.id),
            &OrderAction::CollectNow,
            "operator",
            Timestamp::from_unix(Timestamp::now().unix() + 600).unwrap(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + BOUND;
    while store.orders().get(order).await.unwrap().state != OrderState::Delivered {
        assert!(
            Instant::now() < deadline,
            "the order was not handed to the broker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (c2, mut rx2) = offline.connect(broker.addr).await;
    let received = tokio::time::timeout(BOUND, rx2.recv())
        .await
        .expect("the queued order arrives after the reconnection")
        .expect("the connection is up");
    let Message::Order(o) = Envelope::from_json(&received.message.payload)
        .unwrap()
        .message
    else {
        panic!("not an order");
    };
    assert_eq!(o.order_id, order);
    received.ack();
    clients.insert(2, (c2, rx2));

    // Phase 3: revocation. The replicas rewrite the CRL file; the broker applies it when
    // restarted.
    let revoked = &agents[AGENTS - 1];
    store
        .admin()
        .revoke_agent(revoked.id, "test")
        .await
        .unwrap();
    let deadline = Instant::now() + BOUND;
    while !crl_revokes(&crl, revoked) {
        assert!(
            Instant::now() < deadline,
            "the CRL file does not list the revoked certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The revoked agent's connection is still open: a SIGHUP makes Mosquitto read the new
    // CRL for the next handshakes; whether it ends the open connection is measured.
    let (revoked_client, _) = clients.pop().expect("the revoked agent's connection");
    assert!(revoked_client.is_connected());
    drop(clients);
    broker.signal("HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "scale: after SIGHUP the revoked agent's open connection is still up: {}",
        revoked_client.is_connected()
    );
    let after_hup = MqttClient::connect(&revoked.options(broker.addr), &revoked.tls()).await;
    assert!(
        after_hup.is_err(),
        "after a SIGHUP the broker refuses the revoked agent's new connection"
    );
    drop(revoked_client);
    r1.forget_subscriptions();
    r2.forget_subscriptions();
    broker.restart();
    let after_restart = MqttClient::connect(&revoked.options(broker.addr), &revoked.tls()).await;
    assert!(
        after_restart.is_err(),
        "a restarted broker refuses the revoked agent"
    );
    let healthy = &agents[1];
    let (c1, _rx1) = healthy.connect(broker.addr).await;
    // Mosquitto (2.0.11) does not restore an offline session's *shared* subscription from its
    // persistence file: until a replica subscribes again, what agents publish to the group
    // reaches no session and is dropped, although the broker acknowledged it (see
    // deploy/scale/README.md, "Limits"). So the replicas subscribe again before they stop.
    r1.wait_resubscribed();
    r2.wait_resubscribed();

    // Phase 4: the replicas stop, so what agents send waits in the broker. A graceful broker
    // restart (SIGTERM) keeps it; a crash (SIGKILL) before the autosave loses what came after
    // the last save (measured).
    let committed_1 = r1.stop();
    let committed_2 = r2.stop();
    eprintln!("scale: replica 1 (restarted) committed {committed_1}, replica 2 {committed_2}");
    assert!(committed_2 > 0, "replica 2 consumed");
    let kept_range = PER_AGENT + 100..PER_AGENT + 150;
    let done = healthy
        .publish_events(&c1, kept_range.clone(), &AtomicU64::new(0))
        .await;
    assert_eq!(done.len(), 50);
    drop(c1);
    broker.restart();
    // The replicas come back, subscribe again (restoring the shared subscription), and take
    // what the broker kept for their sessions across its graceful restart.
    let r1 = Replica::start(&data, &db, broker.addr, "epmc-server-1", &crl);
    let r2 = Replica::start(&data, &db, broker.addr, "epmc-server-2", &crl);
    let s = wait_stored_for(&store, tenant, &healthy.serial, kept_range.clone()).await;
    let kept_missing: Vec<u64> = kept_range
        .clone()
        .filter(|n| !s.contains_key(&(*n as i64)))
        .collect();
    assert!(
        kept_missing.is_empty(),
        "queued in the broker across a graceful restart, then stored: missing {kept_missing:?}"
    );
    r1.stop();
    r2.stop();
    // The replicas are away again; what the agent sends now waits in their sessions, in
    // the broker's memory only until its next autosave. A crash before it (SIGKILL) loses it.
    let (c1, _rx1) = healthy.connect(broker.addr).await;
    let crash_range = PER_AGENT + 200..PER_AGENT + 250;
    let done = healthy
        .publish_events(&c1, crash_range.clone(), &AtomicU64::new(0))
        .await;
    assert_eq!(done.len(), 50);
    drop(c1);
    broker.crash_and_restart();
    let r1 = Replica::start(&data, &db, broker.addr, "epmc-server-1", &crl);
    let r2 = Replica::start(&data, &db, broker.addr, "epmc-server-2", &crl);
    let s = wait_stored_for(&store, tenant, &healthy.serial, crash_range.clone()).await;
    let survived = crash_range
        .clone()
        .filter(|n| s.contains_key(&(*n as i64)))
        .count();
    eprintln!(
        "scale: 50 of 50 queued across a graceful broker restart stored; broker SIGKILLed within its autosave interval: {survived} of 50 acknowledged messages reached the database"
    );
    r1.stop();
    r2.stop();
    store.close().await;
}

/// What the database sessions are doing (printed when a wait fails).
async fn diagnose(db: &str) {
    use sqlx::{Connection, Row};
    let mut c = sqlx::PgConnection::connect(db).await.unwrap();
    let rows = sqlx::query(
        "SELECT pid, state, wait_event_type, wait_event, left(query, 120) FROM pg_stat_activity \
         WHERE datname = current_database()",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    for r in rows {
        eprintln!(
            "pg: {:?} {:?} {:?} {:?} {:?}",
            r.try_get::<i32, _>(0).ok(),
            r.try_get::<String, _>(1).ok(),
            r.try_get::<String, _>(2).ok(),
            r.try_get::<String, _>(3).ok(),
            r.try_get::<String, _>(4).ok()
        );
    }
}

/// Whether the CRL file (PEM) lists the agent's certificate.
fn crl_revokes(path: &Path, agent: &Agent) -> bool {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;
    let pem = std::fs::read(path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("a PEM CRL");
    assert_eq!(pem.label, "X509 CRL");
    let (_, crl) = CertificateRevocationList::from_der(&pem.contents).expect("a DER CRL");
    let strip = |b: &[u8]| -> Vec<u8> { b.iter().copied().skip_while(|x| *x == 0).collect() };
    let serial = strip(agent.bundle.certificate.serial.as_bytes());
    crl.iter_revoked_certificates()
        .any(|r| strip(r.raw_serial()) == serial)
}

/// Waits up to 10 s for events `range` of one device; returns what is stored of them.
async fn wait_stored_for(
    store: &Store,
    tenant: TenantId,
    serial: &str,
    range: std::ops::Range<u64>,
) -> BTreeMap<i64, u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stored(store, tenant).await;
        let got = s.get(serial).cloned().unwrap_or_default();
        let all = range.clone().all(|n| got.contains_key(&(n as i64)));
        if all || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A commit that fails acknowledges nothing: the replica reconnects, the broker sends the
/// messages again, and once the database works they are stored, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_is_not_acknowledged_and_comes_again() {
    use sqlx::Connection;
    let Some(db) = pg::schema_url().await else {
        return;
    };
    let (dir, store, tenant, agents) = small_setup(&db).await;
    let (data, etc, crl) = paths(&dir);
    let agent = &agents[0];
    let broker = Broker::start(&etc);
    let replica = Replica::start(&data, &db, broker.addr, "epmc-server-1", &crl);
    let (client, _rx) = agent.connect(broker.addr).await;
    client
        .publish(
            &topic::telemetry(&agent.id),
            agent.snapshot(),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + BOUND;
    while store.admin().devices().await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the snapshot was not stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The certificate the replica issued itself for the broker is recorded, so `crl` and
    // revocation cover it.
    let issued = store.admin().service_certificates().await.unwrap();
    assert!(!issued.is_empty(), "the replica's certificate is recorded");
    assert!(
        issued
            .iter()
            .all(|c| c.name == "epmc-server-1" && c.revoked_at.is_none())
    );

    // Every commit fails as a whole: the agents table is gone (an error of the database,
    // not of a message, as a lost connection or a full disk would be).
    let mut admin = sqlx::PgConnection::connect(&db).await.unwrap();
    sqlx::raw_sql("ALTER TABLE agents RENAME TO agents_held")
        .execute(&mut admin)
        .await
        .unwrap();
    let done = agent
        .publish_events(&client, 0..20, &AtomicU64::new(0))
        .await;
    assert_eq!(done.len(), 20, "the broker acknowledges");
    let deadline = Instant::now() + BOUND;
    while replica.failed_commits.load(Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "the replica did not retry the failed commit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ingested_messages")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(held, 1, "only the snapshot is stored while commits fail");

    // The database works again: the broker's redeliveries are stored, each once.
    sqlx::raw_sql("ALTER TABLE agents_held RENAME TO agents")
        .execute(&mut admin)
        .await
        .unwrap();
    let got = wait_stored_for(&store, tenant, &agent.serial, 0..20).await;
    for n in 0..20 {
        assert_eq!(got.get(&n).copied(), Some(1), "event {n} stored once");
    }
    assert_eq!(got.len(), 20);
    eprintln!(
        "scale: {} failed commit(s) before the database came back",
        replica.failed_commits.load(Ordering::Relaxed)
    );
    drop(client);
    replica.stop();
    store.close().await;
}

/// A data directory, the broker's files, a store with one tenant and one agent.
async fn small_setup(db: &str) -> (tempfile::TempDir, Store, TenantId, Vec<Agent>) {
    epmc_server::ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let (data, etc, crl) = paths(&dir);
    datadir::init(&data, &[]).unwrap();
    std::fs::create_dir(&etc).unwrap();
    for f in ["ca.crt", "server.crt", "server.key"] {
        std::fs::copy(data.join(f), etc.join(f)).unwrap();
    }
    let pki = datadir::load(&data).unwrap();
    epmc_server::broker::write_crl(&pki.ca, &[], &crl).unwrap();
    let store = Store::open(db).await.unwrap();
    let tenant = store.admin().add_tenant("acme").await.unwrap();
    let agents = make_agents(&store, &data, tenant, 1).await;
    (dir, store, tenant, agents)
}

/// The data directory, the broker's folder and its CRL file in `dir`.
fn paths(dir: &tempfile::TempDir) -> (PathBuf, PathBuf, PathBuf) {
    let etc = dir.path().join("mosquitto");
    let crl = etc.join("crl.pem");
    (dir.path().join("data"), etc, crl)
}

/// A measurement for deploy/scale/README.md: with `autosave_on_changes true` and
/// `autosave_interval 1` (a save after every change), how much of what the broker acknowledged
/// survives its crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_crash_with_autosave_on_changes() {
    let Some(db) = pg::schema_url().await else {
        return;
    };
    let (dir, store, tenant, agents) = small_setup(&db).await;
    let (data, etc, crl) = paths(&dir);
    let agent = &agents[0];
    let mut broker = Broker::start_with(&etc, |c| {
        assert!(c.contains("autosave_interval 60\n"));
        c.replace(
            "autosave_interval 60\n",
            "autosave_interval 1\nautosave_on_changes true\n",
        )
    });
    // The replica's session and subscriptions exist; then it stops, so messages wait.
    Replica::start(&data, &db, broker.addr, "epmc-server-1", &crl).stop();
    let (client, _rx) = agent.connect(broker.addr).await;
    let started = Instant::now();
    let done = agent
        .publish_events(&client, 0..50, &AtomicU64::new(0))
        .await;
    let took = started.elapsed();
    assert_eq!(done.len(), 50);
    drop(client);
    broker.crash_and_restart();
    let replica = Replica::start(&data, &db, broker.addr, "epmc-server-1", &crl);
    let got = wait_stored_for(&store, tenant, &agent.serial, 0..50).await;
    eprintln!(
        "scale: autosave_on_changes: broker SIGKILLed after acknowledging 50 (in {took:?}): {} of 50 reached the database",
        got.len()
    );
    replica.stop();
    store.close().await;
}
