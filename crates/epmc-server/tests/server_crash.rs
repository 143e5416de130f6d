//! The `epmc-server` binary killed with SIGKILL while an agent publishes: every message the
//! server acknowledged is in the database after the restart, exactly once (PUBACK only after
//! the commit). Stopped with SIGTERM instead: it exits cleanly and promptly, and every message
//! it committed was acknowledged before its connection closed (its last commits finish and
//! are answered). On SQLite in the data directory, and on PostgreSQL when
//! `EPMC_TEST_POSTGRES_URL` is set (with `CI=true` it must be: `scripts/test` starts one).
//! And on a full disk (SQLite on a small file system the test fills): nothing is acknowledged
//! that was not stored, nothing is kept as rejected, and everything is stored once space is
//! back, with the server running throughout; the same when PostgreSQL connections are lost
//! mid-stream.

mod pg;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Lines};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epmc_proto::bounded::Timestamp;
use epmc_proto::model::{DeviceEvent, DeviceEventKind, PowerState};
use epmc_proto::topic::{self, AgentId, Channel};
use epmc_proto::{Envelope, Kind, Message, sample};
use epmc_server::datadir;
use epmc_server::store::{Store, StoreOptions, TenantId};
use epmc_transport::client::{MqttClient, MqttOptions, PendingAck, TlsIdentity};
use epmc_transport::mqtt::QoS;
use time::OffsetDateTime;

const TOTAL: u64 = 600;
const KILL_AFTER: usize = 250;
const WINDOW: usize = 32;
const BASE: i64 = 1_800_000_000;

/// For a first start: the server takes a free port and says which (`ServerProcess::mqtt`);
/// restarts ask for that one again.
fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// How the server is stopped mid-stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    /// SIGKILL: a power cut for the process.
    Kill,
    /// SIGTERM: the operator's stop.
    Term,
}

/// A running `epmc-server serve`; its standard output stays open (it prints on stop).
struct ServerProcess {
    child: Child,
    /// The server's process id: the child's, unless a wrapper runs the server.
    pid: u32,
    /// Where it listens for agents, from its "listening" line.
    mqtt: SocketAddr,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// Whether a line of `log` contains every one of `words`.
fn logged(log: &Mutex<Vec<String>>, words: &[&str]) -> bool {
    log.lock()
        .unwrap()
        .iter()
        .any(|l| words.iter().all(|w| l.contains(w)))
}

/// The arguments of `epmc-server … serve` on loopback, for `data` (and `database`).
fn serve_args(data: &Path, database: Option<&str>, mqtt: SocketAddr) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--data".into(), data.into()];
    if let Some(url) = database {
        args.extend(["--database".into(), url.into()]);
    }
    let mqtt = mqtt.to_string();
    args.extend(["serve", "--mqtt", &mqtt, "--https", "127.0.0.1:0"].map(OsString::from));
    args
}

/// Starts `epmc-server serve` and waits for its "listening" line.
fn spawn_server(data: &Path, database: Option<&str>, mqtt: SocketAddr) -> ServerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_epmc-server"));
    command.args(serve_args(data, database, mqtt));
    start(command, Stdio::inherit())
}

/// Runs `command`, which must end in `epmc-server serve`, and waits for its "listening" line.
fn start(mut command: Command, stderr: Stdio) -> ServerProcess {
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("the epmc-server binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = stdout.next().expect("a first line").unwrap();
    assert!(line.starts_with("listening"), "server said {line:?}");
    let mqtt = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtts://")?.parse().ok())
        .unwrap_or_else(|| panic!("no agents' address in {line:?}"));
    let pid = child.id();
    ServerProcess {
        child,
        pid,
        mqtt,
        stdout,
    }
}

impl ServerProcess {
    /// The lines of its standard error (which must be piped) from now on, also echoed to this
    /// test's.
    fn capture_stderr(&mut self) -> Arc<Mutex<Vec<String>>> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = self.child.stderr.take().expect("standard error piped");
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                lines.lock().unwrap().push(line);
            }
        });
        log
    }

    /// Stops it the way `stop` says. With SIGTERM it must exit successfully within 30 s;
    /// returns how many messages it said it committed.
    fn stop(mut self, stop: Stop) -> Option<u64> {
        if stop == Stop::Kill {
            self.child.kill().unwrap();
            self.child.wait().unwrap();
            return None;
        }
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the server did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit after SIGTERM: {status}");
        let line = self
            .stdout
            .next()
            .expect("a line on stop")
            .expect("readable");
        let committed = line
            .strip_prefix("stopped: ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        Some(committed.unwrap_or_else(|| panic!("server said on stop: {line:?}")))
    }
}

fn event(n: u64) -> bytes::Bytes {
    let envelope = Envelope::new(Message::Event(DeviceEvent {
        device_id: "X8JK0000001".try_into().unwrap(),
        at: Timestamp::from_unix(BASE + n as i64).unwrap(),
        event: DeviceEventKind::StatusChange {
            power: Some(PowerState::On),
            warnings: Default::default(),
            alarms: Default::default(),
        },
    }));
    envelope.to_json().unwrap().into()
}

async fn connect(options: &MqttOptions, tls: &TlsIdentity) -> MqttClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match MqttClient::connect(options, tls).await {
            Ok((client, _, _orders)) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}

async fn open_store(data: &Path, database: Option<&str>) -> Store {
    match database {
        Some(url) => Store::open(url).await.unwrap(),
        None => Store::open_data_dir(data, StoreOptions::default())
            .await
            .unwrap(),
    }
}

/// A data directory with a tenant and one agent, as `agent issue` makes it (its identity from
/// the server's CA).
struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
    tenant: TenantId,
    agent: AgentId,
    tls: TlsIdentity,
}

async fn setup(database: Option<&str>) -> Setup {
    epmc_server::ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    datadir::init(&data, &[]).unwrap();
    let pki = datadir::load(&data).unwrap();
    let store = open_store(&data, database).await;
    let tenant = store.admin().add_tenant("acme").await.unwrap();
    let agent: AgentId = store.admin().create_agent(tenant, "agent").await.unwrap();
    let bundle = pki
        .ca
        .issue_agent_with_key(agent.uuid(), OffsetDateTime::now_utc())
        .unwrap();
    store.close().await;
    let tls = TlsIdentity::from_pem(
        bundle.ca_pem.as_bytes(),
        bundle.certificate.pem.as_bytes(),
        bundle.key_pem.as_bytes(),
    )
    .unwrap();
    Setup {
        dir,
        data,
        tenant,
        agent,
        tls,
    }
}

/// The device's events are messages `0..total`, each exactly once (`acked` says how often
/// each was acknowledged, for the failure message), and no message was rejected (neither a
/// crash nor the server's own trouble is a reason to).
async fn assert_each_stored_once(
    store: &Store,
    tenant: TenantId,
    total: u64,
    acked: &BTreeMap<u64, u32>,
) {
    assert_eq!(
        store.admin().rejected_count().await.unwrap(),
        0,
        "messages rejected"
    );
    let devices = store.admin().devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    let stored = store
        .tenant(tenant)
        .events(devices[0].id, 100_000)
        .await
        .unwrap();
    let mut count: BTreeMap<i64, u32> = BTreeMap::new();
    for e in &stored {
        *count.entry(e.at.unix() - BASE).or_default() += 1;
    }
    for n in 0..total {
        assert_eq!(
            count.get(&(n as i64)).copied(),
            Some(1),
            "message {n} (acknowledged {:?} times) must be stored once",
            acked.get(&n)
        );
    }
    assert_eq!(stored.len(), total as usize, "nothing else stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acknowledged_sqlite() {
    crash_run(None, Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_acknowledged_postgres() {
    if let Some(url) = pg::schema_url().await {
        crash_run(Some(&url), Stop::Kill).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_acknowledges_every_commit_and_exits_cleanly_sqlite() {
    crash_run(None, Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_acknowledges_every_commit_and_exits_cleanly_postgres() {
    if let Some(url) = pg::schema_url().await {
        crash_run(Some(&url), Stop::Term).await;
    }
}

async fn crash_run(database: Option<&str>, stop: Stop) {
    let Setup {
        dir: _dir,
        data,
        tenant,
        agent,
        tls,
    } = setup(database).await;
    let first = spawn_server(&data, database, any_port());
    let mqtt = first.mqtt;
    let mut server = Some(first);
    let mut options = MqttOptions::new(mqtt, "localhost", &agent.to_string());
    options.keep_alive = Duration::from_secs(5);

    let mut client = connect(&options, &tls).await;
    let snapshot = sample::sample(Kind::Snapshot).to_json().unwrap();
    client
        .publish(
            &topic::topic(&agent, Channel::Telemetry),
            snapshot.into(),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
    // PUBACKs from the server process running now (the snapshot's, so far).
    let mut acked_here = 1u64;
    // A stopped server's count of what it committed (SIGTERM only).
    let mut stopped_count = None;

    let events = topic::topic(&agent, Channel::Events);
    // One envelope (one id) per message, resent unchanged, as the agent's outbox does.
    let payloads: Vec<bytes::Bytes> = (0..TOTAL).map(event).collect();
    // n → how often the server acknowledged it.
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    let mut next = 0u64;
    let mut stopped = false;
    let mut restarts = 0;
    while acked.len() < TOTAL as usize {
        let mut in_flight: VecDeque<(u64, PendingAck)> = VecDeque::new();
        let mut failed = false;
        // Resend from the oldest message not acknowledged, as the agent's outbox does.
        next = (0..TOTAL).find(|n| !acked.contains_key(n)).unwrap_or(next);
        loop {
            while in_flight.len() < WINDOW && next < TOTAL && !failed {
                if acked.contains_key(&next) {
                    next += 1;
                    continue;
                }
                match client
                    .send_publish(
                        &events,
                        payloads[next as usize].clone(),
                        QoS::AtLeastOnce,
                        false,
                    )
                    .await
                {
                    Ok(p) => {
                        in_flight.push_back((next, p));
                        next += 1;
                    }
                    Err(_) => failed = true,
                }
            }
            let Some((n, pending)) = in_flight.pop_front() else {
                break;
            };
            match pending.acked().await {
                Ok(()) => {
                    *acked.entry(n).or_default() += 1;
                    acked_here += 1;
                }
                Err(_) => failed = true,
            }
            if !stopped && acked.len() >= KILL_AFTER {
                // With publishes in flight: a power cut for the process, or the operator's
                // stop (which waits until the process has exited).
                let process = server.take().unwrap();
                stopped_count = tokio::task::block_in_place(|| process.stop(stop));
                stopped = true;
            }
        }
        if let Some(committed) = stopped_count.take() {
            eprintln!("stopped mid-stream: {committed} committed, {acked_here} acknowledged");
            // Everything it committed was acknowledged before the connection closed: the
            // PUBACKs of the last commits went out.
            assert_eq!(
                committed, acked_here,
                "messages committed by the stopped server, against PUBACKs received from it"
            );
        }
        if acked.len() < TOTAL as usize {
            assert!(stopped, "publishing failed without the stop");
            restarts += 1;
            assert!(restarts <= 3, "too many restarts");
            server = Some(spawn_server(&data, database, mqtt));
            client = connect(&options, &tls).await;
            acked_here = 0;
        }
    }
    assert!(
        stopped && restarts >= 1,
        "the run was interrupted and resumed"
    );
    drop(client);
    let process = server.take().unwrap();
    if let Some(committed) = tokio::task::block_in_place(|| process.stop(stop)) {
        assert_eq!(
            committed, acked_here,
            "the last server's commits and PUBACKs"
        );
    }
    if stop == Stop::Term {
        // Nothing was committed without its PUBACK, so nothing was stored twice.
        assert!(
            acked.values().all(|n| *n == 1),
            "each message acknowledged once: {:?}",
            acked.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
        );
    }

    // Every acknowledged message is stored exactly once.
    let store = open_store(&data, database).await;
    assert_each_stored_once(&store, tenant, TOTAL, &acked).await;
    store.close().await;
}

/// An agent's connection as its outbox uses it: (re)connected when needed.
struct Publisher {
    options: MqttOptions,
    tls: TlsIdentity,
    client: Option<MqttClient>,
    topic: String,
    /// Windows that ended with a lost connection or a missing PUBACK.
    failures: u32,
}

impl Publisher {
    /// `agent`'s connection to the server at `mqtt`, for its events; not connected yet.
    fn new(mqtt: SocketAddr, agent: &AgentId, tls: TlsIdentity) -> Publisher {
        let mut options = MqttOptions::new(mqtt, "localhost", &agent.to_string());
        options.keep_alive = Duration::from_secs(5);
        Publisher {
            options,
            tls,
            client: None,
            topic: topic::topic(agent, Channel::Events),
            failures: 0,
        }
    }

    /// Publishes `payloads[n]` for each `n` below `upto` not in `acked`, oldest first,
    /// [`WINDOW`] at a time, reconnecting after a failure, until `done(acked, failures)`
    /// holds; panics after `limit` or when nothing is left to send and `done` still does not
    /// hold.
    async fn publish_until(
        &mut self,
        payloads: &[bytes::Bytes],
        upto: u64,
        acked: &mut BTreeMap<u64, u32>,
        mut done: impl FnMut(&BTreeMap<u64, u32>, u32) -> bool,
        limit: Duration,
        what: &str,
    ) {
        let deadline = Instant::now() + limit;
        while !done(acked, self.failures) {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            let client = match &mut self.client {
                Some(c) => c,
                None => match MqttClient::connect(&self.options, &self.tls).await {
                    Ok((c, _, _orders)) => self.client.insert(c),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let todo: Vec<u64> = (0..upto)
                .filter(|n| !acked.contains_key(n))
                .take(WINDOW)
                .collect();
            assert!(!todo.is_empty(), "{what}: every message is acknowledged");
            let mut pending = Vec::new();
            let mut failed = false;
            for n in todo {
                let payload = payloads[n as usize].clone();
                match client
                    .send_publish(&self.topic, payload, QoS::AtLeastOnce, false)
                    .await
                {
                    Ok(p) => pending.push((n, p)),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            for (n, p) in pending {
                match tokio::time::timeout(Duration::from_secs(15), p.acked()).await {
                    Ok(Ok(())) => *acked.entry(n).or_default() += 1,
                    _ => failed = true,
                }
            }
            if failed {
                self.client = None;
                self.failures += 1;
            }
        }
    }
}

/// SQLite on a full disk. The database lives on a small file system (a tmpfs in a mount
/// namespace of the server's own, made with `unshare`), which the test fills while an agent
/// publishes, so that commits fail with SQLITE_FULL. The server must acknowledge nothing it
/// could not store, keep none of it as rejected (the disk is at fault, not the data), stay
/// up, and store everything once the space is back: each message exactly once.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_acknowledges_nothing_unstored_and_resumes_when_space_returns() {
    const FIRST: u64 = 50;
    const ALL: u64 = 3_000;
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status();
    assert!(
        matches!(probe, Ok(s) if s.success()),
        "this test mounts a small file system of its own: it needs unshare(1) (util-linux) \
         and user namespaces: {probe:?}"
    );
    let Setup {
        dir,
        data,
        tenant,
        agent,
        tls,
    } = setup(None).await;
    let database = data.join(datadir::DATABASE);
    assert!(
        !Path::new(&format!("{}-wal", database.display())).exists(),
        "the closed database has no WAL left to copy"
    );

    // The server, in a mount namespace of its own, on a copy of the database on an 8 MiB
    // tmpfs mounted over `small`. A shell stays in the namespace to copy the database out
    // once the server has stopped (the tmpfs ends with the namespace; SQLite resolves the
    // `/proc/PID/root` link, so it cannot open the file there from outside).
    let small = dir.path().join("small");
    let out = dir.path().join("out");
    std::fs::create_dir(&small).unwrap();
    std::fs::create_dir(&out).unwrap();
    let url = format!("sqlite://{}", small.join("epmc.db").display());
    let mut command = Command::new("unshare");
    command
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"set -e
mount -t tmpfs -o size=8m epmc-full "$1"
cp "$2" "$1/epmc.db"
small=$1 out=$3
shift 3
"$@" &
echo $! > "$out/pid.new"
mv "$out/pid.new" "$out/pid"
set +e
wait $!
status=$?
cp "$small"/epmc.db* "$out/"
exit $status"#,
            "sh",
        ])
        .arg(&small)
        .arg(&database)
        .arg(&out)
        .arg(env!("CARGO_BIN_EXE_epmc-server"))
        .args(serve_args(&data, Some(&url), any_port()));
    let mut server = start(command, Stdio::piped());
    let mqtt = server.mqtt;
    server.pid = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(pid) = std::fs::read_to_string(out.join("pid")) {
                break pid.trim().parse().unwrap();
            }
            assert!(Instant::now() < deadline, "the wrapper wrote no pid");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let log = server.capture_stderr();
    // The server's view of `small`, from outside its namespace.
    let there = Path::new("/proc")
        .join(server.pid.to_string())
        .join("root")
        .join(small.strip_prefix("/").unwrap());
    let full_logged = || logged(&log, &["commit failed", "full"]);

    let mut publisher = Publisher::new(mqtt, &agent, tls);
    let payloads: Vec<bytes::Bytes> = (0..ALL).map(event).collect();
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    let bound = Duration::from_secs(60);

    // With space: the first messages are stored.
    publisher
        .publish_until(
            &payloads,
            FIRST,
            &mut acked,
            |a, _| a.len() == FIRST as usize,
            bound,
            "publishing with space",
        )
        .await;

    // The disk fills up (by another file, as a log or a backup would fill it).
    let mut filler = std::fs::File::create(there.join("filler")).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let error = loop {
        if let Err(e) = std::io::Write::write_all(&mut filler, &chunk) {
            break e;
        }
    };
    assert_eq!(error.raw_os_error(), Some(28), "ENOSPC: {error}");
    let before = publisher.failures;
    publisher
        .publish_until(
            &payloads,
            ALL,
            &mut acked,
            |_, failures| failures > before && full_logged(),
            bound,
            "a commit failing for want of space",
        )
        .await;
    let acked_while_full = acked.len() as u64 - FIRST;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server is still running on a full disk"
    );

    // Space is back: every message is stored, those refused included.
    drop(filler);
    std::fs::remove_file(there.join("filler")).unwrap();
    publisher
        .publish_until(
            &payloads,
            ALL,
            &mut acked,
            |a, _| a.len() == ALL as usize,
            bound,
            "publishing once space is back",
        )
        .await;
    eprintln!(
        "full disk: {acked_while_full} acknowledged while full, {} windows failed",
        publisher.failures
    );
    publisher.client = None;

    // The server stops cleanly; its database, copied out, holds every message once and none
    // as rejected.
    server.stop(Stop::Term);
    let store = Store::open(&format!("sqlite://{}", out.join("epmc.db").display()))
        .await
        .unwrap();
    assert_each_stored_once(&store, tenant, ALL, &acked).await;
    store.close().await;
}

/// PostgreSQL connections lost while an agent publishes: the server's backends are
/// terminated again and again (as a database restart or a fail-over ends them). Commits fail;
/// the server must acknowledge nothing it could not store, reject nothing, keep running, and
/// store everything once the connections stay up: each message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_database_connections_acknowledge_nothing_unstored_and_recover_postgres() {
    const FIRST: u64 = 50;
    const ALL: u64 = 3_000;
    let Some(url) = pg::schema_url().await else {
        return;
    };
    // The server's connections, told apart from every other test's by their name.
    let name = format!("epmc_lost_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{url}&application_name={name}");
    let Setup {
        dir: _dir,
        data,
        tenant,
        agent,
        tls,
    } = setup(Some(&url)).await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_epmc-server"));
    command.args(serve_args(&data, Some(&url), any_port()));
    let mut server = start(command, Stdio::piped());
    let mqtt = server.mqtt;
    let log = server.capture_stderr();

    let mut publisher = Publisher::new(mqtt, &agent, tls);
    let payloads: Vec<bytes::Bytes> = (0..ALL).map(event).collect();
    let mut acked: BTreeMap<u64, u32> = BTreeMap::new();
    let bound = Duration::from_secs(60);
    publisher
        .publish_until(
            &payloads,
            FIRST,
            &mut acked,
            |a, _| a.len() == FIRST as usize,
            bound,
            "publishing with the database up",
        )
        .await;

    // Every 20 ms, every connection of the server is terminated.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let terminator = {
        let base = std::env::var("EPMC_TEST_POSTGRES_URL").unwrap();
        let (stop, name) = (stop.clone(), name.clone());
        tokio::spawn(async move {
            use sqlx::Connection;
            let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
            let mut terminated = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = $1",
                )
                .bind(&name)
                .fetch_one(&mut admin)
                .await
                .unwrap();
                terminated += n;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            terminated
        })
    };
    let before = publisher.failures;
    publisher
        .publish_until(
            &payloads,
            ALL,
            &mut acked,
            |_, failures| failures > before && logged(&log, &["commit failed"]),
            bound,
            "a commit failing on a lost connection",
        )
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let terminated = terminator.await.unwrap();
    let acked_meanwhile = acked.len() as u64 - FIRST;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server is still running"
    );

    // The connections stay up again: everything is stored.
    publisher
        .publish_until(
            &payloads,
            ALL,
            &mut acked,
            |a, _| a.len() == ALL as usize,
            bound,
            "publishing once the connections stay up",
        )
        .await;
    eprintln!(
        "lost connections: {terminated} terminated, {acked_meanwhile} acknowledged meanwhile, \
         {} windows failed",
        publisher.failures
    );
    publisher.client = None;
    server.stop(Stop::Term);

    let store = open_store(&data, Some(&url)).await;
    assert_each_stored_once(&store, tenant, ALL, &acked).await;
    store.close().await;
}
