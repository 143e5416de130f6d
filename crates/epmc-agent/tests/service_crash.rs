//! The agent binary killed with SIGKILL between receiving an order and executing it: after
//! the restart the order runs, once. The projector is down when the order arrives, so the
//! agent records it (and the broker sees it acknowledged) but cannot run it yet; the agent is
//! killed, the projector comes up, the agent restarts and runs the order from its journal. A
//! further kill and restart after the order finished does not run it again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use epmc_proto::bounded::Timestamp;
use epmc_proto::order::OrderAction;
use epmc_server::datadir;
use epmc_server::server::{ServeConfig, Server};
use epmc_server::store::{OrderState, OrderTarget};
use escvp::client::{Client, ClientConfig};
use escvp::emulator::{Fleet, ProjectorConfig};
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

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn setup_agent(dir: &Path, server: &Server, bundle_dir: &Path, projector: SocketAddr) -> PathBuf {
    let agent_dir = bundle_dir.to_owned();
    std::fs::write(
        agent_dir.join("agent.toml"),
        format!(
            "[server]\nurl = \"mqtts://localhost:{}\"\nca_cert = \"ca.crt\"\nclient_cert = \"agent.crt\"\nclient_key = \"agent.key\"\n\
             [schedule]\nstatus_interval_seconds = 10\n\
             [[target]]\naddress = \"{projector}\"\ndisplay_name = \"Aula\"\n",
            server.mqtt_addr().expect("embedded endpoint").port()
        ),
    )
    .unwrap();
    let _ = dir;
    agent_dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_recorded_before_a_sigkill_runs_once_after_the_restart() {
    epmc_server::ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    datadir::init(&data, &[]).unwrap();
    let mut config = ServeConfig::new(&data);
    config.mqtt = "127.0.0.1:0".parse().unwrap();
    config.https = "127.0.0.1:0".parse().unwrap();
    config.poll = Duration::from_millis(100);
    let server = Server::start(config).await.unwrap();
    let admin = server.store().admin();
    let tenant = admin.add_tenant("acme").await.unwrap();
    let agent = admin.create_agent(tenant, "crash").await.unwrap();
    let bundle = datadir::load(&data)
        .unwrap()
        .ca
        .issue_agent_with_key(agent.uuid(), time::OffsetDateTime::now_utc())
        .unwrap();
    let agent_dir = dir.path().join("agent");
    datadir::write_agent_bundle(&agent_dir, &bundle).unwrap();

    // The projector's address, with nothing listening yet.
    let projector = free_port();
    let agent_dir = setup_agent(dir.path(), &server, &agent_dir, projector);
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
    let expires = Timestamp::from_unix(Timestamp::now().unix() + 600).unwrap();
    let order = server
        .store()
        .orders()
        .create(
            OrderTarget::Device(device.id),
            &OrderAction::PowerOn,
            "test",
            expires,
        )
        .await
        .unwrap();
    server.notify_orders();
    // Recorded and acknowledged by the agent, not run (the projector is down).
    eventually("order accepted", async || {
        let r = server.store().orders().get(order).await.unwrap();
        (r.state == OrderState::Accepted).then_some(())
    })
    .await;
    first.kill();

    // The projector comes up; the agent restarts and runs the order from its journal.
    let fleet = Fleet::spawn([(
        projector,
        ProjectorConfig {
            warm_up: Duration::from_millis(300),
            cool_down: Duration::from_millis(300),
            ..ProjectorConfig::default()
        },
    )])
    .await
    .unwrap();
    let p = &fleet.projectors()[0];
    assert_eq!(p.power_code(), PowerCode::STANDBY_NETWORK_ON);
    let second = Agent::start(&agent_dir);
    let done = eventually("order done after the restart", async || {
        let r = server.store().orders().get(order).await.unwrap();
        matches!(r.state, OrderState::Done | OrderState::Failed).then_some(r)
    })
    .await;
    assert_eq!(done.state, OrderState::Done, "{:?}", done.result);
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
