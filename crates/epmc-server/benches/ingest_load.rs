//! Load benchmark of the server's ingest path (issue 9), on loopback, with real certificates
//! from the server's own CA, each figure beside a reference measured in the same run:
//!
//! 1. **SQLite ingest**: `Server::start` in-process on its SQLite file (WAL,
//!    `synchronous=FULL`); N simulated agents (`epmc-transport`'s `MqttClient`, one TLS
//!    connection each) publish QoS 1 `DeviceSnapshot` envelopes, each with its window of
//!    publishes in flight. Committed messages/s (first publish to last PUBACK; a PUBACK only
//!    follows the commit holding the message) and publish→PUBACK latency p50/p99.
//!    Reference: the same messages from the same number of agents through a real Mosquitto
//!    (QoS 1, the shipped configuration with mTLS and ACL) to one subscriber that
//!    acknowledges each (publisher → broker → subscriber), until the subscriber has all.
//! 2. **PostgreSQL ingest** (when `EPMC_TEST_POSTGRES_URL` is set, e.g. from
//!    `scripts/pg-test`): the same run on a schema of its own; reference: the same number of
//!    rows (message id, agent, kind, time, status JSON) written by multi-row `INSERT`s and by
//!    `COPY`, one transaction per batch of the endpoint's commit size.
//! 3. **Idle connections**: the `epmc-server` binary as a child process; its RSS
//!    (`/proc/PID/status`) before and after N agents connected and idle. Reference: Mosquitto
//!    holding the same number of idle connections.
//! 4. **Handshakes**: full TLS handshakes with a client certificate (no resumption) plus
//!    CONNECT/CONNACK/DISCONNECT against the child server, from a few concurrent loops.
//!    Reference: a plain rustls server (same certificates, same client verifier with CRL) that
//!    only completes the handshake, and the same MQTT loop against Mosquitto.
//!
//! `cargo bench -p epmc-server --bench ingest_load` runs the full sizes; run as a test
//! (`cargo test -p epmc-server --bench ingest_load`, no `--bench` argument) it is a smoke run of
//! a few seconds. Sizes from the environment: `EPMC_BENCH_AGENTS`, `EPMC_BENCH_MESSAGES` (per
//! agent), `EPMC_BENCH_DEVICES` (per agent), `EPMC_BENCH_WINDOW`, `EPMC_BENCH_IDLE`,
//! `EPMC_BENCH_HANDSHAKES`, `EPMC_BENCH_HANDSHAKE_LOOPS`, `EPMC_BENCH_PHASE_SECONDS` (the
//! bound of each phase), `EPMC_BENCH_PHASES` (comma list of `sqlite,mosquitto,postgres,idle,
//! handshake`; default all), `EPMC_BENCH_SERVER_CPUS` (a `taskset -c` CPU list for the child
//! server, e.g. `0` while the bench itself runs under `taskset -c 1`, so that the client side
//! of the handshake phase does not share the server's core).
//!
//! The handshake phase also reports the CPU time (user + system, `/proc/PID/stat`) that the
//! server process and the bench process (the clients) used during the run, for our server and
//! for Mosquitto: the clients do as much cryptography per handshake as the server does.

#[path = "../../epmc-transport/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use epmc_proto::bounded::{BoundedString, Timestamp};
use epmc_proto::model::DeviceSnapshot;
use epmc_proto::topic::{self, AgentId};
use epmc_proto::{Envelope, Message, sample};
use epmc_server::ca::{self, CertificateAuthority};
use epmc_server::datadir;
use epmc_server::server::{ServeConfig, Server};
use epmc_transport::client::{MqttClient, MqttOptions, PendingAck, TlsIdentity};
use epmc_transport::mqtt::{Connect, ConnectReturn, Packet, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Sizes and bounds of one run.
#[derive(Clone, Debug)]
struct Params {
    agents: usize,
    messages: usize,
    devices: usize,
    window: usize,
    rate: usize,
    paced_seconds: usize,
    idle: usize,
    handshakes: usize,
    handshake_loops: usize,
    phase_limit: Duration,
    phases: Vec<String>,
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Params {
    fn from_env(full: bool) -> Params {
        let pick = |full_size: usize, smoke: usize| if full { full_size } else { smoke };
        let phases = std::env::var("EPMC_BENCH_PHASES")
            .unwrap_or_else(|_| "sqlite,mosquitto,postgres,idle,handshake".into())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        Params {
            agents: env_usize("EPMC_BENCH_AGENTS", pick(100, 4)).max(1),
            messages: env_usize("EPMC_BENCH_MESSAGES", pick(1000, 50)).max(1),
            devices: env_usize("EPMC_BENCH_DEVICES", 10).max(1),
            window: env_usize("EPMC_BENCH_WINDOW", 64).max(1),
            rate: env_usize("EPMC_BENCH_RATE", pick(20_000, 400)).max(1),
            paced_seconds: env_usize("EPMC_BENCH_PACED_SECONDS", pick(5, 1)).max(1),
            idle: env_usize("EPMC_BENCH_IDLE", pick(10_000, 50)),
            handshakes: env_usize("EPMC_BENCH_HANDSHAKES", pick(5000, 40)).max(1),
            handshake_loops: env_usize("EPMC_BENCH_HANDSHAKE_LOOPS", 8).max(1),
            phase_limit: Duration::from_secs(
                env_usize("EPMC_BENCH_PHASE_SECONDS", pick(300, 60)) as u64
            ),
            phases,
        }
    }

    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    fn total(&self) -> usize {
        self.agents * self.messages
    }

    /// Messages per agent in the paced run.
    fn paced_messages(&self) -> usize {
        (self.rate * self.paced_seconds / self.agents).max(1)
    }

    /// Each agent's interval between messages in the paced run.
    fn paced_interval(&self) -> Duration {
        Duration::from_secs_f64(self.agents as f64 / self.rate as f64)
    }
}

/// One line of the printed table.
struct Row {
    what: String,
    figure: String,
    reference: String,
}

/// Runs `f`, failing the run if it takes longer than the phase bound.
async fn bounded<T>(p: &Params, phase: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(p.phase_limit, f)
        .await
        .unwrap_or_else(|_| panic!("phase {phase} did not finish within {:?}", p.phase_limit))
}

/// The serial number of device `d` of agent `a`.
fn serial(a: usize, d: usize) -> String {
    format!("BENCH{a:05}D{d:04}")
}

/// The agent's snapshots, encoded: round-robin over its devices, one new id each, observed
/// one second apart.
fn payloads(p: &Params, a: usize, n: usize) -> Vec<Bytes> {
    let base = Timestamp::now().unix() - n as i64;
    (0..n)
        .map(|i| {
            let snapshot = DeviceSnapshot {
                device_id: BoundedString::new(serial(a, i % p.devices)).expect("serial fits"),
                observed_at: Timestamp::from_unix(base + i as i64).expect("valid time"),
                status: sample::status(),
            };
            Bytes::from(
                Envelope::new(Message::Snapshot(snapshot))
                    .to_json()
                    .expect("encodes"),
            )
        })
        .collect()
}

/// Publishes every payload at QoS 1 in order and returns each message's time to its PUBACK,
/// in µs. Unpaced (`pace` = `None`), the client's window is kept full and the time counts
/// from the hand-over to the connection. Paced, one message leaves every `pace` from
/// `start`, and the time counts from when it was due, so falling behind shows in the figure.
async fn publish_all(
    client: MqttClient,
    topic: String,
    payloads: Vec<Bytes>,
    pace: Option<(tokio::time::Instant, Duration)>,
) -> Vec<u32> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, PendingAck)>();
    let collector = tokio::spawn(async move {
        let mut latencies = Vec::new();
        while let Some((sent, ack)) = rx.recv().await {
            ack.acked().await.expect("PUBACK");
            latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
        latencies
    });
    let mut ticks = pace.map(|(start, every)| tokio::time::interval_at(start, every));
    for payload in payloads {
        let due = match ticks.as_mut() {
            Some(t) => Some(t.tick().await.into_std()),
            None => None,
        };
        let ack = client
            .send_publish(&topic, payload, QoS::AtLeastOnce, false)
            .await
            .expect("handed to the connection");
        let _ = tx.send((due.unwrap_or_else(Instant::now), ack));
    }
    drop(tx);
    collector.await.expect("collector")
}

/// Committed messages/s and latency percentiles of one publishing run.
struct Throughput {
    messages: usize,
    elapsed: Duration,
    p50_us: u32,
    p99_us: u32,
}

impl Throughput {
    fn new(messages: usize, elapsed: Duration, mut latencies: Vec<u32>) -> Throughput {
        latencies.sort_unstable();
        let at = |q: usize| {
            latencies
                .get((latencies.len() * q / 100).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        Throughput {
            messages,
            elapsed,
            p50_us: at(50),
            p99_us: at(99),
        }
    }

    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    fn describe(&self) -> String {
        format!(
            "{:.0} msg/s ({} in {:.2} s)",
            self.rate(),
            self.messages,
            self.elapsed.as_secs_f64()
        )
    }

    fn latency(&self) -> String {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            f64::from(self.p50_us) / 1e3,
            f64::from(self.p99_us) / 1e3
        )
    }
}

/// Publishes from every agent at once (paced: each agent one message every `pace`, the
/// agents' starts spread over one interval); returns the time from the start to the last
/// PUBACK, every latency, and the start.
async fn publish_run(
    clients: Vec<(MqttClient, String, Vec<Bytes>)>,
    pace: Option<Duration>,
) -> (Duration, Vec<u32>, Instant) {
    let start = Instant::now();
    let n = clients.len().max(1) as u32;
    let t0 = tokio::time::Instant::now() + Duration::from_millis(10);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (client, topic, payloads))| {
            let pace = pace.map(|every| (t0 + every * i as u32 / n, every));
            tokio::spawn(publish_all(client, topic, payloads, pace))
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("agent task"));
    }
    (start.elapsed(), latencies, start)
}

/// A data directory made by `init`, and its CA.
fn data_dir(root: &Path) -> (std::path::PathBuf, CertificateAuthority) {
    let data = root.join("data");
    datadir::init(&data, &[]).expect("init");
    let ca = datadir::load(&data).expect("load").ca;
    (data, ca)
}

/// A client identity for `agent` from the server's CA.
fn agent_identity(ca: &CertificateAuthority, agent: Uuid) -> (TlsIdentity, String, String) {
    let bundle = ca
        .issue_agent_with_key(agent, OffsetDateTime::now_utc())
        .expect("issue");
    let identity = TlsIdentity::from_pem(
        bundle.ca_pem.as_bytes(),
        bundle.certificate.pem.as_bytes(),
        bundle.key_pem.as_bytes(),
    )
    .expect("identity");
    (identity, bundle.certificate.pem, bundle.key_pem)
}

/// The two runs of one ingest target: saturated (throughput) and paced (latency).
struct Load {
    saturated: Throughput,
    paced: Throughput,
}

/// Each agent's client, topic, and the payloads of both runs.
type Agents = Vec<(MqttClient, String, Vec<Bytes>, Vec<Bytes>)>;

/// The saturated run, then the paced one, with the same clients; `wait` is awaited after each
/// run with the number of messages sent so far and returns when the last was delivered
/// (`None`: at the last PUBACK).
async fn both_runs<F, Fut>(p: &Params, agents: Agents, wait: F) -> Load
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Option<Instant>>,
{
    let (saturated, paced): (Vec<_>, Vec<_>) = agents
        .into_iter()
        .map(|(c, topic, s, q)| ((c.clone(), topic.clone(), s), (c, topic, q)))
        .unzip();
    let (elapsed, latencies, start) = publish_run(saturated, None).await;
    let elapsed = wait(p.total())
        .await
        .map_or(elapsed, |last| last.duration_since(start));
    let saturated = Throughput::new(p.total(), elapsed, latencies);
    let paced_total = p.agents * p.paced_messages();
    let (elapsed, latencies, start) = publish_run(paced, Some(p.paced_interval())).await;
    let elapsed = wait(p.total() + paced_total)
        .await
        .map_or(elapsed, |last| last.duration_since(start));
    Load {
        saturated,
        paced: Throughput::new(paced_total, elapsed, latencies),
    }
}

/// Phase 1 and 2: the embedded endpoint on SQLite (`database` = `None`) or PostgreSQL.
async fn server_ingest(p: &Params, database: Option<String>) -> Load {
    let root = tempfile::tempdir().expect("temp dir");
    let (data, ca) = data_dir(root.path());
    let mut config = ServeConfig::new(&data);
    config.mqtt = "127.0.0.1:0".parse().expect("addr");
    config.https = "127.0.0.1:0".parse().expect("addr");
    config.database = database;
    let server = Server::start(config).await.expect("server starts");
    let admin = server.store().admin();
    let tenant = admin.add_tenant("bench").await.expect("tenant");
    let mut agents = Vec::new();
    for a in 0..p.agents {
        let agent = admin
            .create_agent(tenant, &format!("bench agent {a}"))
            .await
            .expect("agent");
        let (identity, _, _) = agent_identity(&ca, agent.uuid());
        let mut opts = MqttOptions::new(
            server.mqtt_addr().expect("embedded endpoint"),
            "localhost",
            &agent.to_string(),
        );
        opts.in_flight = p.window;
        let (client, _, _rx) = MqttClient::connect(&opts, &identity)
            .await
            .expect("agent connects");
        agents.push((
            client,
            topic::telemetry(&agent),
            payloads(p, a, p.messages),
            payloads(p, a, p.paced_messages()),
        ));
    }
    let load = both_runs(p, agents, |_| async { None }).await;
    let stats = server.endpoint().expect("embedded endpoint").stats();
    let sent = (p.total() + p.agents * p.paced_messages()) as u64;
    assert_eq!(stats.rejected, 0, "no message may be rejected: {stats:?}");
    assert_eq!(stats.duplicates, 0, "no message is a duplicate: {stats:?}");
    assert!(
        stats.committed >= sent,
        "every PUBACKed message was committed: {stats:?}"
    );
    // What the database holds: every device with a status.
    let devices = admin.devices().await.expect("devices");
    assert_eq!(devices.len(), p.agents * p.devices.min(p.messages));
    assert!(devices.iter().all(|d| d.status.is_some()));
    println!(
        "  {} commits, {:.1} messages per commit on average",
        stats.batches,
        stats.committed as f64 / stats.batches.max(1) as f64
    );
    server.shutdown().await;
    load
}

/// The reference: the same messages from the same number of agents through Mosquitto to one
/// subscriber that acknowledges each; a run ends when the subscriber has every message.
async fn mosquitto_relay(p: &Params, broker: &support::Broker) -> Load {
    let mut sub_opts = broker.options(support::SERVER);
    sub_opts.clean_session = true;
    sub_opts.incoming_window = 100_000;
    let (subscriber, _, mut rx) =
        MqttClient::connect(&sub_opts, &broker.ca.identity(support::SERVER))
            .await
            .expect("subscriber connects");
    let granted = subscriber
        .subscribe(&[("epmc/v1/agents/+/telemetry", QoS::AtLeastOnce)])
        .await
        .expect("subscribed");
    assert_eq!(granted, vec![Some(QoS::AtLeastOnce)]);
    let mut agents = Vec::new();
    for a in 0..p.agents {
        let agent = AgentId::new(Uuid::new_v4());
        let mut opts = broker.options(&agent.to_string());
        opts.in_flight = p.window;
        opts.clean_session = true;
        let identity = broker.ca.identity(&agent.to_string());
        let (client, _, _rx) = MqttClient::connect(&opts, &identity)
            .await
            .expect("publisher connects");
        agents.push((
            client,
            topic::telemetry(&agent),
            payloads(p, a, p.messages),
            payloads(p, a, p.paced_messages()),
        ));
    }
    // The subscriber's count and the time of its latest message.
    let (count_tx, count_rx) = tokio::sync::watch::channel((0usize, Instant::now()));
    let counter = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(m) = rx.recv().await {
            m.ack();
            n += 1;
            count_tx.send_replace((n, Instant::now()));
        }
    });
    let load = both_runs(p, agents, |target| {
        let mut count = count_rx.clone();
        async move {
            let (n, last) = *count
                .wait_for(|(n, _)| *n >= target)
                .await
                .expect("the subscriber runs");
            assert_eq!(n, target, "the subscriber received each message once");
            Some(last)
        }
    })
    .await;
    drop(subscriber);
    counter.abort();
    load
}

/// The reference for PostgreSQL: the same number of rows written by plain multi-row INSERTs
/// and by COPY, `batch` rows per transaction. Returns rows/s of each.
async fn postgres_raw(p: &Params, url: &str, batch: usize) -> (f64, f64) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connects");
    for table in ["bench_insert", "bench_copy"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, kind TEXT NOT NULL, \
             received_at BIGINT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL)"
        )))
        .execute(&mut conn)
        .await
        .expect("table");
    }
    let status = serde_json::to_string(&sample::status()).expect("status JSON");
    let agent = Uuid::new_v4().to_string();
    let rows: Vec<(String, String)> = (0..p.total())
        .map(|i| {
            (
                Uuid::new_v4().to_string(),
                serial(i % p.agents, i % p.devices),
            )
        })
        .collect();

    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut sql = String::from(
            "INSERT INTO bench_insert (id, agent_id, kind, received_at, device, status) VALUES ",
        );
        for (i, _) in chunk.iter().enumerate() {
            let b = i * 6;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6
            ));
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, device) in chunk {
            q = q
                .bind(id)
                .bind(&agent)
                .bind("snapshot")
                .bind(0i64)
                .bind(device)
                .bind(&status);
        }
        let mut tx = conn.begin().await.expect("begin");
        q.execute(&mut *tx).await.expect("insert");
        tx.commit().await.expect("commit");
    }
    let insert = rows.len() as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut text = String::new();
        for (id, device) in chunk {
            // COPY text format: tab-separated, backslash escapes (the status JSON has none of
            // tab, newline or backslash).
            text.push_str(&format!("{id}\t{agent}\tsnapshot\t0\t{device}\t{status}\n"));
        }
        let mut tx = conn.begin().await.expect("begin");
        let mut copy = tx
            .copy_in_raw("COPY bench_copy FROM STDIN")
            .await
            .expect("copy");
        copy.send(text.into_bytes()).await.expect("copy data");
        copy.finish().await.expect("copy end");
        tx.commit().await.expect("commit");
    }
    let copy = rows.len() as f64 / start.elapsed().as_secs_f64();
    (insert, copy)
}

/// The storage path alone on PostgreSQL, without MQTT or TLS: the same snapshots, decoded
/// beforehand into batches of the endpoint's commit size (each holding about as many messages
/// of every agent, as a saturated endpoint's commits do), committed one after the other through
/// `IngestHandle::ingest_prepared` on a schema of its own. Returns the messages/s and the rows
/// written per message (`pg_stat_user_tables`, as for the endpoint run).
async fn postgres_store_alone(p: &Params, base: &str, batch: usize) -> (f64, Option<f64>) {
    use epmc_proto::topic::Channel;
    use epmc_server::store::{IngestItem, PreparedBatch, Store};
    let (url, schema) = postgres_schema(base).await;
    let store = Store::open(&url).await.expect("store opens");
    let admin = store.admin();
    let tenant = admin.add_tenant("bench").await.expect("tenant");
    let mut per_agent = Vec::new();
    for a in 0..p.agents {
        let agent = admin
            .create_agent(tenant, &format!("bench agent {a}"))
            .await
            .expect("agent");
        per_agent.push((agent, payloads(p, a, p.messages)));
    }
    // Round robin over the agents, each agent's messages in its order.
    let mut items = Vec::with_capacity(p.total());
    for i in 0..p.messages {
        for (agent, payloads) in &per_agent {
            items.push(IngestItem::new(
                *agent,
                Channel::Telemetry,
                payloads[i].clone(),
            ));
        }
    }
    let batches: Vec<PreparedBatch> = items
        .chunks(batch)
        .map(|c| PreparedBatch::new(c.to_vec()))
        .collect();
    let ingest = store.ingest();
    let start = Instant::now();
    for b in &batches {
        let outcomes = ingest.ingest_prepared(b).await.expect("commit");
        assert!(
            outcomes
                .iter()
                .all(|o| *o == epmc_server::store::IngestOutcome::Stored)
        );
    }
    let rate = items.len() as f64 / start.elapsed().as_secs_f64();
    store.close().await;
    drop(store);
    let per_message = postgres_rows_per_message(base, &schema, items.len()).await;
    drop_schema(base, &schema).await;
    (rate, per_message)
}

/// Rows the ingest wrote per message on PostgreSQL: inserts and updates of the message ids
/// (`ingested_messages`) and of the devices' latest status (`device_status`), as
/// `pg_stat_user_tables` counts them, divided by the messages committed. Called once the
/// server has stopped: a backend's counts are flushed when its connection ends, so they are
/// waited for (bounded) until the message rows are all counted and the sum holds still.
async fn postgres_rows_per_message(base: &str, schema: &str, messages: usize) -> Option<f64> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::PgConnection::connect(base).await.ok()?;
    async fn count(conn: &mut sqlx::PgConnection, schema: &str) -> Option<(i64, i64)> {
        let r = sqlx::query(
            "SELECT COALESCE(SUM(n_tup_ins) FILTER (WHERE relname = 'ingested_messages'), 0)::BIGINT, \
             COALESCE(SUM(n_tup_ins + n_tup_upd), 0)::BIGINT FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname IN ('ingested_messages', 'device_status')",
        )
        .bind(schema)
        .fetch_one(conn)
        .await
        .ok()?;
        Some((r.get::<i64, _>(0), r.get::<i64, _>(1)))
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while Instant::now() < deadline {
        let (ids, rows) = count(&mut conn, schema).await?;
        if ids >= messages as i64 && last == Some(rows) {
            return Some(rows as f64 / messages as f64);
        }
        last = Some(rows);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// A schema of its own on the test PostgreSQL server, as a URL.
async fn postgres_schema(base: &str) -> (String, String) {
    use sqlx::Connection;
    let schema = format!("bench_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .expect("EPMC_TEST_POSTGRES_URL connects");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    (
        format!("{base}{sep}options=-c%20search_path%3D{schema}"),
        schema,
    )
}

async fn drop_schema(base: &str, schema: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(base).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&mut conn)
            .await;
    }
}

/// Resident memory of a process, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/PID/stat`;
/// `pid` may be `self`.
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // The command name is in parentheses and may hold spaces; after it come field 3 (state)
    // onwards, so utime (field 14) and stime (field 15) are the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("stat format") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// A handshake run: rate, and the CPU the server and the clients used during it.
struct HandshakeRun {
    rate: f64,
    wall: Duration,
    server_cpu: Duration,
    client_cpu: Duration,
}

impl HandshakeRun {
    fn describe(&self, n: usize) -> String {
        let secs = self.wall.as_secs_f64();
        format!(
            "server CPU {:.2} s ({:.0} µs per handshake, {:.0} % of one core), clients CPU {:.2} s ({:.0} % of one core) over {:.2} s",
            self.server_cpu.as_secs_f64(),
            self.server_cpu.as_secs_f64() * 1e6 / n as f64,
            self.server_cpu.as_secs_f64() * 100.0 / secs,
            self.client_cpu.as_secs_f64(),
            self.client_cpu.as_secs_f64() * 100.0 / secs,
            secs
        )
    }
}

/// [`handshake_rate`] with the CPU time of the server process `server` and of this process.
async fn measured_handshakes(
    server: u32,
    addr: SocketAddr,
    clients: &[(Option<String>, Arc<rustls::ClientConfig>)],
    n: usize,
) -> HandshakeRun {
    let (s0, c0, t0) = (
        cpu_time(&server.to_string()),
        cpu_time("self"),
        Instant::now(),
    );
    let rate = handshake_rate(addr, clients, n).await;
    HandshakeRun {
        rate,
        wall: t0.elapsed(),
        server_cpu: cpu_time(&server.to_string()).saturating_sub(s0),
        client_cpu: cpu_time("self").saturating_sub(c0),
    }
}

/// The `epmc-server` binary serving `data` on loopback, killed on drop.
struct ChildServer {
    child: Child,
    mqtt: SocketAddr,
}

impl ChildServer {
    fn start(data: &Path) -> ChildServer {
        let bin = env!("CARGO_BIN_EXE_epmc-server");
        let mut command = match std::env::var("EPMC_BENCH_SERVER_CPUS") {
            Ok(cpus) => {
                // taskset executes the server in its own process: the pid stays the server's.
                let mut c = Command::new("taskset");
                c.args(["-c", &cpus, bin]);
                c
            }
            Err(_) => Command::new(bin),
        };
        let mut child = command
            .arg("--data")
            .arg(data)
            .args(["serve", "--mqtt", "127.0.0.1:0", "--https", "127.0.0.1:0"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmc-server starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reads the listening line");
        // "listening: agents on mqtts://127.0.0.1:PORT , enrollment on https://…"
        let mqtt = line
            .split("mqtts://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from epmc-server: {line:?}"));
        ChildServer { child, mqtt }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid of the Mosquitto the harness started for `broker` (found by its configuration
/// path on the command line).
fn mosquitto_pid(broker: &support::Broker) -> u32 {
    let config = broker.dir.path().join("mosquitto.conf");
    let config = config.to_string_lossy();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(config.as_ref()))
                .unwrap_or(false)
        })
        .expect("the broker's process")
}

/// Opens `identities.len()` idle MQTT connections (at most 64 handshakes at once); returns
/// them so they stay open.
async fn open_idle(addr: SocketAddr, identities: &[(String, TlsIdentity)]) -> Vec<MqttClient> {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let tasks: Vec<_> = identities
        .iter()
        .map(|(id, identity)| {
            let mut opts = MqttOptions::new(addr, "localhost", id);
            opts.keep_alive = Duration::from_secs(600);
            opts.clean_session = true;
            opts.connect_timeout = Duration::from_secs(60);
            let identity = identity.clone();
            let sem = sem.clone();
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore");
                MqttClient::connect(&opts, &identity)
                    .await
                    .map(|(c, _, _)| c)
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(tasks.len());
    for t in tasks {
        clients.push(t.await.expect("task").expect("idle agent connects"));
    }
    clients
}

/// Server memory for `n` idle connections: (RSS before, RSS after).
async fn idle_memory(
    pid: u32,
    addr: SocketAddr,
    identities: &[(String, TlsIdentity)],
) -> (u64, u64) {
    // One connection first, so one-time allocations (TLS, runtime) are in the baseline.
    let warm = open_idle(addr, &identities[..1]).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(pid);
    let clients = open_idle(addr, &identities[1..]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        clients.iter().all(|c| c.is_connected()),
        "all idle agents still connected"
    );
    let after = rss(pid);
    drop(clients);
    (before, after)
}

/// A rustls client configuration with a client certificate and no session resumption, so
/// every connection is a full handshake.
fn full_handshake_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.expect("cert PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
    let mut config = rustls::ClientConfig::builder_with_provider(ca::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// One full handshake; with `client_id`, also CONNECT, CONNACK (accepted) and DISCONNECT.
async fn one_handshake(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    client_id: Option<&str>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("TCP");
    tcp.set_nodelay(true).expect("nodelay");
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    match client_id {
        Some(id) => {
            let mut out = Vec::new();
            Packet::Connect(Connect {
                client_id: id.to_owned(),
                clean_session: true,
                keep_alive: 60,
                will: None,
                username: None,
                password: None,
            })
            .encode(&mut out, 1024)
            .expect("CONNECT");
            tls.write_all(&out).await.expect("write CONNECT");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 256];
            let connack = loop {
                match Packet::decode(&buf, 1024) {
                    Ok((p, _)) => break p,
                    Err(epmc_transport::mqtt::PacketError::Incomplete { .. }) => {}
                    Err(e) => panic!("bad CONNACK: {e}"),
                }
                let n = tls.read(&mut chunk).await.expect("read CONNACK");
                assert!(n > 0, "closed before CONNACK");
                buf.extend_from_slice(&chunk[..n]);
            };
            assert!(
                matches!(
                    connack,
                    Packet::ConnAck {
                        code: ConnectReturn::Accepted,
                        ..
                    }
                ),
                "CONNECT accepted: {connack:?}"
            );
            let mut out = Vec::new();
            Packet::Disconnect
                .encode(&mut out, 1024)
                .expect("DISCONNECT");
            tls.write_all(&out).await.expect("write DISCONNECT");
        }
        None => {
            // The TLS 1.3 handshake completes on the server once it has read the client's
            // Finished (with its certificate): a byte written after it proves that.
            tls.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
        }
    }
    let _ = tls.shutdown().await;
}

/// `n` handshakes from `loops` concurrent loops, each with its own identity; handshakes/s.
async fn handshake_rate(
    addr: SocketAddr,
    clients: &[(Option<String>, Arc<rustls::ClientConfig>)],
    n: usize,
) -> f64 {
    let loops = clients.len();
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, (id, config))| {
            let count = n / loops + usize::from(i < n % loops);
            let (id, config) = (id.clone(), config.clone());
            tokio::spawn(async move {
                for _ in 0..count {
                    one_handshake(addr, config.clone(), id.as_deref()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("handshake loop");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The reference for handshakes: a plain rustls server with the listener's own configuration
/// that completes each handshake, reads one byte and closes.
async fn plain_rustls_server(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut b = [0u8; 1];
                    let _ = tls.read(&mut b).await;
                    let _ = tls.write_all(b"y").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let p = Params::from_env(full);
    ca::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut rows: Vec<Row> = Vec::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "ingest_load: {} agents × {} QoS 1 snapshots ({} devices each, window {}), {} idle \
         connections, {} handshakes from {} loops; load average before: {}",
        p.agents,
        p.messages,
        p.devices,
        p.window,
        p.idle,
        p.handshakes,
        p.handshake_loops,
        load.trim()
    );

    let broker =
        (p.runs("mosquitto") || p.runs("idle") || p.runs("handshake")).then(support::Broker::start);

    let sqlite = p.runs("sqlite").then(|| {
        println!("sqlite ingest …");
        rt.block_on(bounded(&p, "sqlite", server_ingest(&p, None)))
    });
    let relay = broker
        .as_ref()
        .filter(|_| p.runs("mosquitto"))
        .map(|broker| {
            println!("mosquitto relay …");
            rt.block_on(bounded(&p, "mosquitto", mosquitto_relay(&p, broker)))
        });
    if sqlite.is_some() || relay.is_some() {
        let show = |l: &Option<Load>, f: &dyn Fn(&Load) -> String| {
            l.as_ref().map(f).unwrap_or_else(|| "not run".into())
        };
        let share = match (&sqlite, &relay) {
            (Some(s), Some(r)) => format!(
                "; SQLite ingest = {:.0} % of it",
                100.0 * s.saturated.rate() / r.saturated.rate()
            ),
            _ => String::new(),
        };
        rows.push(Row {
            what: format!(
                "SQLite ingest, saturated ({} agents, window {}): committed, PUBACK after commit \
                 (reference: Mosquitto QoS 1 relay, publishers → broker → 1 subscriber)",
                p.agents, p.window
            ),
            figure: show(&sqlite, &|l| l.saturated.describe()),
            reference: format!("{}{share}", show(&relay, &|l| l.saturated.describe())),
        });
        rows.push(Row {
            what: "  publish → PUBACK, saturated".into(),
            figure: show(&sqlite, &|l| l.saturated.latency()),
            reference: show(&relay, &|l| l.saturated.latency()),
        });
        rows.push(Row {
            what: format!(
                "  publish → PUBACK, paced at {} msg/s for {} s (from when each was due)",
                p.rate, p.paced_seconds
            ),
            figure: show(&sqlite, &|l| {
                format!("{} ({})", l.paced.latency(), l.paced.describe())
            }),
            reference: show(&relay, &|l| {
                format!("{} ({})", l.paced.latency(), l.paced.describe())
            }),
        });
    }
    if p.runs("postgres") {
        match std::env::var("EPMC_TEST_POSTGRES_URL") {
            Err(_) => {
                println!("postgres: skipped (EPMC_TEST_POSTGRES_URL unset; see scripts/pg-test)")
            }
            Ok(base) => {
                println!("postgres ingest …");
                let (url, schema) = rt.block_on(postgres_schema(&base));
                let t = rt.block_on(bounded(
                    &p,
                    "postgres",
                    server_ingest(&p, Some(url.clone())),
                ));
                let committed = p.total() + p.agents * p.paced_messages();
                let per_message = rt.block_on(postgres_rows_per_message(&base, &schema, committed));
                let batch = epmc_server::ingest::IngestConfig::default().max_batch;
                let (insert, copy) =
                    rt.block_on(bounded(&p, "postgres", postgres_raw(&p, &url, batch)));
                let (alone, alone_rows) = rt.block_on(bounded(
                    &p,
                    "postgres",
                    postgres_store_alone(&p, &base, batch),
                ));
                rt.block_on(drop_schema(&base, &schema));
                rows.push(Row {
                    what: format!(
                        "PostgreSQL ingest, saturated ({} agents, window {}): committed, PUBACK after commit",
                        p.agents, p.window
                    ),
                    figure: t.saturated.describe(),
                    reference: format!(
                        "the same rows: multi-row INSERT {insert:.0} rows/s, COPY {copy:.0} rows/s \
                         ({batch} rows per transaction)"
                    ),
                });
                rows.push(Row {
                    what: "  rows written, saturated (message ids and device status, counted by pg_stat_user_tables)".into(),
                    figure: match per_message {
                        Some(r) => format!(
                            "{:.0} rows/s ({r:.3} rows per message over both runs)",
                            r * t.saturated.rate()
                        ),
                        None => "not counted (pg_stat_user_tables did not settle)".into(),
                    },
                    reference: format!(
                        "the multi-row INSERT above writes one row per message: {insert:.0} rows/s"
                    ),
                });
                rows.push(Row {
                    what: format!(
                        "  the storage path alone (no MQTT, no TLS): batches of {batch} decoded beforehand, committed one after the other"
                    ),
                    figure: match alone_rows {
                        Some(r) => format!(
                            "{alone:.0} msg/s, {:.0} rows/s ({r:.3} rows per message)",
                            r * alone
                        ),
                        None => format!("{alone:.0} msg/s (rows not counted)"),
                    },
                    reference: format!(
                        "multi-row INSERT of one row per message: {insert:.0} rows/s"
                    ),
                });
                rows.push(Row {
                    what: "  publish → PUBACK, saturated".into(),
                    figure: t.saturated.latency(),
                    reference: String::new(),
                });
                rows.push(Row {
                    what: format!("  publish → PUBACK, paced at {} msg/s", p.rate),
                    figure: format!("{} ({})", t.paced.latency(), t.paced.describe()),
                    reference: String::new(),
                });
            }
        }
    }
    if p.runs("idle") || p.runs("handshake") {
        let root = tempfile::tempdir().expect("temp dir");
        let (data, server_ca) = data_dir(root.path());
        let server = ChildServer::start(&data);
        if p.runs("idle") && p.idle > 0 {
            let broker = broker.as_ref().expect("broker");
            println!("idle connections: issuing {} certificates …", p.idle + 1);
            let ours: Vec<(String, TlsIdentity)> = (0..=p.idle)
                .map(|_| {
                    let id = Uuid::new_v4();
                    (id.to_string(), agent_identity(&server_ca, id).0)
                })
                .collect();
            let theirs: Vec<(String, TlsIdentity)> = (0..=p.idle)
                .map(|_| {
                    let id = Uuid::new_v4().to_string();
                    let identity = broker.ca.identity(&id);
                    (id, identity)
                })
                .collect();
            println!("idle connections …");
            let (before, after) = rt.block_on(bounded(
                &p,
                "idle",
                idle_memory(server.pid(), server.mqtt, &ours),
            ));
            let (m_before, m_after) = rt.block_on(bounded(
                &p,
                "idle",
                idle_memory(mosquitto_pid(broker), broker.addr, &theirs),
            ));
            let per = |b: u64, a: u64| a.saturating_sub(b) as f64 / p.idle as f64 / 1024.0;
            rows.push(Row {
                what: format!("{} idle TLS agent connections: server RSS", p.idle),
                figure: format!(
                    "{:.1} MiB (+{:.1} MiB from {:.1}, {:.1} KiB per connection)",
                    mib(after),
                    mib(after.saturating_sub(before)),
                    mib(before),
                    per(before, after)
                ),
                reference: format!(
                    "Mosquitto {:.1} MiB (+{:.1} MiB, {:.1} KiB per connection)",
                    mib(m_after),
                    mib(m_after.saturating_sub(m_before)),
                    per(m_before, m_after)
                ),
            });
        }
        if p.runs("handshake") {
            println!("handshakes …");
            let server_pki = datadir::load(&data).expect("load");
            let mut ours = Vec::new();
            let mut plain = Vec::new();
            for _ in 0..p.handshake_loops {
                let id = Uuid::new_v4();
                let bundle = server_pki
                    .ca
                    .issue_agent_with_key(id, OffsetDateTime::now_utc())
                    .expect("issue");
                let config =
                    full_handshake_config(&bundle.ca_pem, &bundle.certificate.pem, &bundle.key_pem);
                ours.push((Some(id.to_string()), config.clone()));
                plain.push((None, config));
            }
            let ours_run = rt.block_on(bounded(
                &p,
                "handshake",
                measured_handshakes(server.pid(), server.mqtt, &ours, p.handshakes),
            ));
            // The plain server gets the listener's configuration: same chain, key, verifier
            // and (empty) CRL.
            let chain = vec![
                CertificateDer::from_pem_slice(server_pki.server.cert_pem.as_bytes())
                    .expect("server.crt"),
                server_pki.ca.cert_der().clone(),
            ];
            let key = PrivateKeyDer::from_pem_slice(server_pki.server.key_pem.as_bytes())
                .expect("server.key");
            let crl = server_pki
                .ca
                .crl(&[], OffsetDateTime::now_utc())
                .expect("CRL");
            let tls = ca::mqtt_server_config(server_pki.ca.cert_der(), crl, chain, key)
                .expect("TLS config");
            let plain_rate = rt.block_on(bounded(&p, "handshake", async {
                let addr = plain_rustls_server(tls).await;
                handshake_rate(addr, &plain, p.handshakes).await
            }));
            let mosquitto_rate = broker.as_ref().map(|broker| {
                let ca_pem = broker.ca.pem.clone();
                let clients: Vec<_> = (0..p.handshake_loops)
                    .map(|_| {
                        let id = Uuid::new_v4().to_string();
                        let (cert, key) = broker.ca.client(&id);
                        (Some(id), full_handshake_config(&ca_pem, &cert, &key))
                    })
                    .collect();
                rt.block_on(bounded(
                    &p,
                    "handshake",
                    measured_handshakes(mosquitto_pid(broker), broker.addr, &clients, p.handshakes),
                ))
            });
            rows.push(Row {
                what: format!(
                    "full client-certificate handshakes + CONNECT/CONNACK ({} loops)",
                    p.handshake_loops
                ),
                figure: format!(
                    "{:.0} /s ({})",
                    ours_run.rate,
                    ours_run.describe(p.handshakes)
                ),
                reference: format!(
                    "plain rustls handshake loop, server and clients in one process, {plain_rate:.0} /s{}",
                    mosquitto_rate
                        .map(|m| format!(
                            "; Mosquitto (TLS + CONNECT) {:.0} /s ({})",
                            m.rate,
                            m.describe(p.handshakes)
                        ))
                        .unwrap_or_default()
                ),
            });
        }
        drop(server);
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average after: {}", load.trim());
    println!("| measure | ours | same-run reference |");
    println!("|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {} |", r.what, r.figure, r.reference);
    }
}
