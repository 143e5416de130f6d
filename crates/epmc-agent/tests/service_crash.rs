//! The agent binary killed with SIGKILL between receiving an order and executing it: after
//! the restart the order runs, once. The projector is down when the order arrives, so the
//! agent records it (and the broker sees it acknowledged) but cannot run it yet; the agent is
//! killed, the projector comes up, the agent restarts and runs the order from its journal. A
//! further kill and restart after the order finished does not run it again.
//!
//! And the agent binary on a full disk (its state directory on a small tmpfs the test fills):
//! it keeps running, says what it could not queue, and reports again once space is back; an
//! order that arrived meanwhile runs then, without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use epmc_proto::bounded::Timestamp;
use epmc_proto::model::DeviceEventKind;
use epmc_proto::order::OrderAction;
use epmc_server::datadir;
use epmc_server::server::{ServeConfig, Server};
use epmc_server::store::{OrderState, OrderTarget, TenantId};
use escvp::client::{Client, ClientConfig};
use escvp::emulator::{ClosedPort, Fleet, ProjectorConfig};
use escvp::event::Warnings;
use escvp::value::{PowerCode, PowerCommand};

const BOUND: Duration = Duration::from_secs(40);

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Agent(Child);

impl Agent {
    fn start(dir: &Path) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_epmc-agent"))
            .args(["run", "--dir"])
            .arg(dir)
            .env("RUST_LOG", "epmc_agent=debug,epmc_transport=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("epmc-agent starts");
        Agent(child)
    }

    fn kill(mut self) {
        // SIGKILL: no clean shutdown.
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `agent.toml` in `bundle_dir`: the server's endpoint, one projector, kept in
/// `session` mode (`poll` or `hold`).
fn setup_agent(
    dir: &Path,
    server: &Server,
    bundle_dir: &Path,
    projector: SocketAddr,
    session: &str,
) -> PathBuf {
    let agent_dir = bundle_dir.to_owned();
    std::fs::write(
        agent_dir.join("agent.toml"),
        format!(
            "[server]\nurl = \"mqtts://localhost:{}\"\nca_cert = \"ca.crt\"\nclient_cert = \"agent.crt\"\nclient_key = \"agent.key\"\n\
             [schedule]\nstatus_interval_seconds = 10\n\
             [[target]]\naddress = \"{projector}\"\ndisplay_name = \"Aula\"\nsession = \"{session}\"\n",
            server.mqtt_addr().expect("embedded endpoint").port()
        ),
    )
    .unwrap();
    let _ = dir;
    agent_dir
}

/// The server (embedded endpoint, SQLite) in `dir/server`, with a tenant and one agent whose
/// certificate, key and the CA are in `dir/agent`: the server, the tenant, that directory.
async fn server_and_agent(dir: &Path) -> (Server, TenantId, PathBuf) {
    epmc_server::ca::install_crypto_provider();
    let data = dir.join("server");
    datadir::init(&data, &[]).unwrap();
    let mut config = ServeConfig::new(&data);
    config.mqtt = "127.0.0.1:0".parse().unwrap();
    config.https = "127.0.0.1:0".parse().unwrap();
    config.poll = Duration::from_millis(100);
    let server = Server::start(config).await.unwrap();
    let admin = server.store().admin();
    let tenant = admin.add_tenant("acme").await.unwrap();
    let agent = admin.create_agent(tenant, "agent").await.unwrap();
    let bundle = datadir::load(&data)
        .unwrap()
        .ca
        .issue_agent_with_key(agent.uuid(), time::OffsetDateTime::now_utc())
        .unwrap();
    let agent_dir = dir.join("agent");
    datadir::write_agent_bundle(&agent_dir, &bundle).unwrap();
    (server, tenant, agent_dir)
}

/// Queues a power-on order for `device`, valid for ten minutes, and tells the dispatcher.
async fn power_on(server: &Server, device: i64) -> uuid::Uuid {
    let expires = Timestamp::from_unix(Timestamp::now().unix() + 600).unwrap();
    let order = server
        .store()
        .orders()
        .create(
            OrderTarget::Device(device),
            &OrderAction::PowerOn,
            "test",
            expires,
        )
        .await
        .unwrap();
    server.notify_orders();
    order
}

/// Waits until `order` is finished (`what` names the wait) and checks that it is done.
async fn assert_done(server: &Server, order: uuid::Uuid, what: &str) {
    let done = eventually(what, async || {
        let r = server.store().orders().get(order).await.unwrap();
        matches!(r.state, OrderState::Done | OrderState::Failed).then_some(r)
    })
    .await;
    assert_eq!(done.state, OrderState::Done, "{:?}", done.result);
}

/// An emulated projector that warms up and cools down in 300 ms.
fn quick_projector() -> ProjectorConfig {
    ProjectorConfig {
        warm_up: Duration::from_millis(300),
        cool_down: Duration::from_millis(300),
        ..ProjectorConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_recorded_before_a_sigkill_runs_once_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _tenant, agent_dir) = server_and_agent(dir.path()).await;
    let admin = server.store().admin();

    // The projector's address, with nothing listening yet (and the port kept from others
    // until the projector comes up).
    let reserved = ClosedPort::on([127, 0, 0, 1].into()).unwrap();
    let projector = reserved.addr();
    let agent_dir = setup_agent(dir.path(), &server, &agent_dir, projector, "poll");
    let first = Agent::start(&agent_dir);

    // The agent reports the projector unreachable under its address id.
    let device = eventually("unreachable device reported", async || {
        admin
            .devices()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.key == format!("ip:{}", projector.ip()))
    })
    .await;
    let order = power_on(&server, device.id).await;
    // Recorded and acknowledged by the agent, not run (the projector is down).
    eventually("order accepted", async || {
        let r = server.store().orders().get(order).await.unwrap();
        (r.state == OrderState::Accepted).then_some(())
    })
    .await;
    first.kill();

    // The projector comes up; the agent restarts and runs the order from its journal.
    drop(reserved);
    let fleet = Fleet::spawn([(projector, quick_projector())])
        .await
        .unwrap();
    let p = &fleet.projectors()[0];
    assert_eq!(p.power_code(), PowerCode::STANDBY_NETWORK_ON);
    let second = Agent::start(&agent_dir);
    assert_done(&server, order, "order done after the restart").await;
    assert_eq!(p.power_code(), PowerCode::ON);

    // Once finished, the order is not run again: switch the projector off behind the
    // agent's back, kill and restart the agent, and the projector stays off.
    eventually("journal empty", async || {
        let s = epmc_agent::service::status::read(&agent_dir.join("state")).ok()?;
        (s.orders_in_progress == 0).then_some(())
    })
    .await;
    second.kill();
    let client = Client::connect(projector, ClientConfig::default())
        .await
        .unwrap();
    client.power(PowerCommand::Off).await.unwrap();
    client.close();
    eventually("projector in standby", async || {
        (p.power_code() == PowerCode::STANDBY_NETWORK_ON).then_some(())
    })
    .await;
    let third = Agent::start(&agent_dir);
    // Long enough for the restart, the first contact and any journal replay.
    eventually("agent running again", async || {
        let s = epmc_agent::service::status::read(&agent_dir.join("state")).ok()?;
        (s.server_connected && s.targets.iter().all(|t| t.last_contact.is_some())).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(
        p.power_code(),
        PowerCode::ON,
        "the finished order ran again"
    );
    let r = server.store().orders().get(order).await.unwrap();
    assert_eq!(r.state, OrderState::Done);
    third.kill();
    server.shutdown().await;
}

/// The agent's state directory on a full disk. It is a small tmpfs in a mount namespace of
/// the agent's own (made with `unshare`), which the test fills while the agent runs; the
/// projector is then switched on, so the agent has news it cannot queue. The agent must keep
/// running and say what it could not queue; once the space is back its outbox recovers and
/// the server learns the projector's new state, without a restart.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_full_disk_keeps_running_and_reports_again_once_space_is_back() {
    use std::io::{BufRead, BufReader};
    use std::sync::{Arc, Mutex};

    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status();
    assert!(
        matches!(probe, Ok(s) if s.success()),
        "this test mounts a small file system of its own: it needs unshare(1) (util-linux) \
         and user namespaces: {probe:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (server, tenant, agent_dir) = server_and_agent(dir.path()).await;
    let admin = server.store().admin();
    let fleet = Fleet::spawn([(SocketAddr::from(([127, 0, 0, 1], 0)), quick_projector())])
        .await
        .unwrap();
    let p = &fleet.projectors()[0];
    let projector = p.tcp_addr();
    // A held session: the projector's changes arrive at once, as notifications.
    let agent_dir = setup_agent(dir.path(), &server, &agent_dir, projector, "hold");
    let state = agent_dir.join("state");
    std::fs::create_dir_all(&state).unwrap();

    // The agent, its state directory a 2 MiB tmpfs.
    let mut child = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"mount -t tmpfs -o size=2m epmc-full "$1" && shift && exec "$@""#,
            "sh",
        ])
        .arg(&state)
        .arg(env!("CARGO_BIN_EXE_epmc-agent"))
        .args(["run", "--dir"])
        .arg(&agent_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("epmc-agent starts");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                lines.lock().unwrap().push(line);
            }
        });
    }
    let agent_process = Agent(child);
    // The agent's view of its state directory, from outside its namespace.
    let there = Path::new("/proc")
        .join(agent_process.0.id().to_string())
        .join("root")
        .join(state.strip_prefix("/").unwrap());
    // The number of warnings in each status-change event the server stored, oldest first.
    let warnings_events = async || -> Vec<usize> {
        let devices = admin.devices().await.unwrap();
        let Some(d) = devices.iter().find(|d| d.serial.is_some()) else {
            return Vec::new();
        };
        let events = server
            .store()
            .tenant(tenant)
            .events(d.id, 10_000)
            .await
            .unwrap();
        events
            .iter()
            .rev()
            .filter_map(|e| match &e.event {
                DeviceEventKind::StatusChange { warnings, .. } => Some(warnings.len()),
                _ => None,
            })
            .collect()
    };

    // With space: the projector is reported, then a change reaches the server.
    eventually("the projector reported", async || {
        let devices = admin.devices().await.unwrap();
        devices
            .iter()
            .any(|d| d.serial.is_some() && d.status.is_some())
            .then_some(())
    })
    .await;
    p.set_warnings(Warnings::AIR_FILTER);
    eventually("a change reported", async || {
        warnings_events().await.contains(&1).then_some(())
    })
    .await;
    eventually("the outbox emptied", async || {
        let s = epmc_agent::service::status::read(&there).ok()?;
        (s.server_connected && s.outbox_messages == 0).then_some(())
    })
    .await;

    // The disk fills up; the projector keeps changing (the outbox file's last page may hold a
    // few more records) until the agent cannot queue a change.
    let mut filler = std::fs::File::create(there.join("filler")).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let error = loop {
        if let Err(e) = std::io::Write::write_all(&mut filler, &chunk) {
            break e;
        }
    };
    assert_eq!(error.raw_os_error(), Some(28), "ENOSPC: {error}");
    // The ids of the status-change events the agent had to hold in memory.
    let held_events = || -> Vec<String> {
        let log = log.lock().unwrap();
        log.iter()
            .filter(|l| l.contains("message held in memory") && l.contains("kind=Event"))
            .filter_map(|l| l.split(" id=").nth(1)?.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    };
    let mut toggle = false;
    eventually(
        "the agent holding an event it could not queue",
        async || {
            toggle = !toggle;
            p.set_warnings(if toggle {
                Warnings::NONE
            } else {
                Warnings::AIR_FILTER
            });
            let full = log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("message held in memory") && l.contains("No space left"));
            (full && !held_events().is_empty()).then_some(())
        },
    )
    .await;
    let mut child = agent_process;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the agent is still running on a full disk"
    );
    // An order arrives meanwhile: the agent cannot record it, or cannot queue its result.
    let device = admin
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.serial.is_some())
        .unwrap();
    let order = power_on(&server, device.id).await;
    eventually("the order stuck on the full disk", async || {
        let log = log.lock().unwrap();
        log.iter()
            .any(|l| l.contains("order not recorded") || l.contains("order result not queued"))
            .then_some(())
    })
    .await;

    // Space is back: the next change reaches the server, and the outbox empties.
    drop(filler);
    std::fs::remove_file(there.join("filler")).unwrap();
    p.set_warnings(Warnings::AIR_FILTER.union(Warnings::HIGH_TEMPERATURE));
    eventually("a change after the space came back", async || {
        warnings_events().await.contains(&2).then_some(())
    })
    .await;
    // The order runs (or its result goes out) without a restart.
    assert_done(&server, order, "the order done once space is back").await;
    assert_eq!(p.power_code(), PowerCode::ON);
    eventually("the outbox emptied again, nothing held", async || {
        let s = epmc_agent::service::status::read(&there).ok()?;
        (s.server_connected && s.outbox_messages == 0 && s.held_messages == 0).then_some(())
    })
    .await;
    // Every event the agent held while the disk was full reached the server.
    let held = held_events();
    let stored: Vec<String> = server
        .store()
        .tenant(tenant)
        .events(device.id, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.message_id.to_string())
        .collect();
    for id in &held {
        assert!(
            stored.contains(id),
            "event {id}, held while the disk was full, is not stored ({} held)",
            held.len()
        );
    }
    child.kill();
    server.shutdown().await;
}
