//! The agent service end to end, in-process, against the real server (SQLite, MQTT over TLS
//! with certificates from the server's CA) and a fleet of emulated projectors on loopback:
//! telemetry lands in the database, orders run on the projectors, IMEVENT notifications
//! become events, a server outage loses nothing, monitor-only refuses orders, and a state
//! directory of another agent is refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use epmc_agent::config::AgentConfig;
use epmc_agent::service::{Service, ServiceOptions, status};
use epmc_proto::bounded::Timestamp;
use epmc_proto::model::DeviceEventKind;
use epmc_proto::order::OrderAction;
use epmc_server::datadir;
use epmc_server::server::{ServeConfig, Server};
use epmc_server::store::{DeviceSummary, OrderState, OrderTarget, TenantId};
use escvp::emulator::{Fleet, ProjectorConfig};
use escvp::event::Warnings;
use escvp::value::PowerCode;

const BOUND: Duration = Duration::from_secs(30);

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

struct Env {
    dir: tempfile::TempDir,
    server: Option<Server>,
    mqtt: SocketAddr,
    tenant: TenantId,
}

fn data(dir: &Path) -> PathBuf {
    dir.join("server")
}

async fn serve(dir: &Path, mqtt: SocketAddr) -> Server {
    let mut config = ServeConfig::new(data(dir));
    config.mqtt = mqtt;
    config.https = "127.0.0.1:0".parse().unwrap();
    config.poll = Duration::from_millis(100);
    Server::start(config).await.unwrap()
}

impl Env {
    async fn start() -> Env {
        epmc_server::ca::install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        datadir::init(&data(dir.path()), &[]).unwrap();
        let server = serve(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
        let tenant = server.store().admin().add_tenant("acme").await.unwrap();
        Env {
            mqtt: server.mqtt_addr().expect("embedded endpoint"),
            server: Some(server),
            dir,
            tenant,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// Issues an agent certificate (as `epmc-server agent issue` does) into `name/`.
    async fn issue(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        let pki = datadir::load(&data(self.dir.path())).unwrap();
        let admin = self.server().store().admin();
        let agent = admin.create_agent(self.tenant, name).await.unwrap();
        let bundle = pki
            .ca
            .issue_agent_with_key(agent.uuid(), time::OffsetDateTime::now_utc())
            .unwrap();
        datadir::write_agent_bundle(&out, &bundle).unwrap();
        let not_after =
            Timestamp::from_unix(bundle.certificate.not_after.unix_timestamp()).unwrap();
        admin
            .record_certificate(agent, &bundle.certificate.serial.to_hex(), not_after)
            .await
            .unwrap();
        out
    }

    fn config(
        &self,
        agent_dir: &Path,
        mode: &str,
        targets: &[(SocketAddr, &str, &str)],
    ) -> AgentConfig {
        let mut text = String::new();
        for (addr, name, session) in targets {
            text += &format!(
                "[[target]]\naddress = \"{addr}\"\ndisplay_name = \"{name}\"\nsession = \"{session}\"\n"
            );
        }
        self.config_with(agent_dir, mode, &text)
    }

    /// A configuration with `targets`, the `[[target]]` tables as TOML text.
    fn config_with(&self, agent_dir: &Path, mode: &str, targets: &str) -> AgentConfig {
        let text = format!(
            "mode = \"{mode}\"\n[server]\nurl = \"mqtts://localhost:{}\"\nca_cert = \"ca.crt\"\nclient_cert = \"agent.crt\"\nclient_key = \"agent.key\"\n{targets}",
            self.mqtt.port()
        );
        let path = agent_dir.join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let mut config = AgentConfig::load(&path).unwrap();
        // Faster than the file allows (10 s at least), for the test.
        config.schedule.status_interval = Duration::from_millis(700);
        config
    }

    async fn devices(&self) -> Vec<DeviceSummary> {
        self.server().store().admin().devices().await.unwrap()
    }

    async fn device(&self, serial: &str) -> DeviceSummary {
        let serial = serial.to_owned();
        eventually(&format!("device {serial} stored"), async || {
            self.devices()
                .await
                .into_iter()
                .find(|d| d.serial.as_deref() == Some(serial.as_str()) && d.status.is_some())
        })
        .await
    }

    async fn order(&self, device: &DeviceSummary, action: OrderAction) -> uuid::Uuid {
        let expires = Timestamp::from_unix(Timestamp::now().unix() + 600).unwrap();
        let id = self
            .server()
            .store()
            .orders()
            .create(OrderTarget::Device(device.id), &action, "test", expires)
            .await
            .unwrap();
        self.server().notify_orders();
        id
    }

    async fn finished(&self, order: uuid::Uuid) -> (OrderState, Option<serde_json::Value>) {
        eventually("order finished", async || {
            let r = self.server().store().orders().get(order).await.unwrap();
            matches!(
                r.state,
                OrderState::Done | OrderState::Failed | OrderState::TimedOut
            )
            .then_some((r.state, r.result))
        })
        .await
    }
}

fn options(dir: &Path) -> ServiceOptions {
    let mut o = ServiceOptions::new(dir.join("state"));
    o.keep_alive = Duration::from_secs(5);
    o.order_retry = Duration::from_millis(300);
    o.status_every = Duration::from_millis(200);
    o.spread_start = Duration::from_millis(100);
    o.collect.command_timeout_scale = 0.5;
    o
}

fn template() -> ProjectorConfig {
    ProjectorConfig {
        warm_up: Duration::from_millis(300),
        cool_down: Duration::from_millis(300),
        ..ProjectorConfig::default()
    }
}

async fn fleet(n: usize) -> Fleet {
    Fleet::spawn_consecutive("127.0.0.1:0".parse().unwrap(), n, template())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_is_reported_and_orders_run_on_the_projectors() {
    let env = Env::start().await;
    let fleet = fleet(3).await;
    let p = fleet.projectors();
    let agent_dir = env.issue("room-agent").await;
    let config = env.config(
        &agent_dir,
        "bidirectional",
        &[
            (p[0].tcp_addr(), "Room 1", "poll"),
            (p[1].tcp_addr(), "Room 2", "poll"),
            (p[2].tcp_addr(), "Hall", "hold"),
        ],
    );
    let service = Service::start(config, options(&agent_dir)).await.unwrap();

    // Every projector lands in the database under its serial number, with its status.
    let d0 = env.device(p[0].serial()).await;
    env.device(p[1].serial()).await;
    env.device(p[2].serial()).await;
    assert_eq!(env.devices().await.len(), 3, "no ip: duplicates");
    let agents = env.server().store().admin().agents(None).await.unwrap();
    assert_eq!(
        agents[0].version.as_deref(),
        Some(env!("CARGO_PKG_VERSION")),
        "hello stored"
    );

    // Power on: the order waits through warm-up and reports the projector's reply.
    let order = env.order(&d0, OrderAction::PowerOn).await;
    let (state, result) = env.finished(order).await;
    assert_eq!(state, OrderState::Done, "{result:?}");
    assert_eq!(p[0].power_code(), PowerCode::ON);
    let reply = result.unwrap()["device_reply"].as_str().unwrap().to_owned();
    assert!(reply.contains("PWR=01"), "{reply}");
    // The new status is reported at once.
    eventually("status shows power on", async || {
        let d = env.device(p[0].serial()).await;
        (d.status.unwrap().1.power == Some(epmc_proto::model::PowerState::On)).then_some(())
    })
    .await;

    // Mute, then a source the projector does not have: done, then refused with its reply.
    let order = env.order(&d0, OrderAction::AvMute { on: true }).await;
    assert_eq!(env.finished(order).await.0, OrderState::Done);
    let order = env
        .order(
            &d0,
            OrderAction::SourceChange {
                source: epmc_proto::bounded::HexCode::new(0xEE),
            },
        )
        .await;
    let (state, result) = env.finished(order).await;
    assert_eq!(state, OrderState::Failed);
    let result = result.unwrap();
    assert_eq!(result["reason"], "device_refused", "{result}");
    assert_eq!(result["device_reply"], "ERR", "{result}");

    // Copy settings: Room 1's volume and colour mode onto Room 2 (both on: sets need the
    // light on), one result per target with each setting's answer.
    let d1 = env.device(p[1].serial()).await;
    let order = env.order(&d1, OrderAction::PowerOn).await;
    assert_eq!(env.finished(order).await.0, OrderState::Done);
    for (name, value) in [("volume", "120"), ("color_mode", "06")] {
        let order = env
            .order(
                &d0,
                OrderAction::ChangeSetting {
                    name: serde_json::from_value(serde_json::json!(name)).unwrap(),
                    value: epmc_proto::bounded::BoundedString::new(value).unwrap(),
                },
            )
            .await;
        let (state, result) = env.finished(order).await;
        assert_eq!(state, OrderState::Done, "{name}: {result:?}");
    }
    let order = env
        .order(
            &d1,
            OrderAction::CopySettings {
                source_device: epmc_proto::bounded::BoundedString::new(p[0].serial()).unwrap(),
                profile: epmc_proto::bounded::BoundedString::new("lecture").unwrap(),
            },
        )
        .await;
    let (state, result) = env.finished(order).await;
    let result = result.unwrap();
    assert_eq!(state, OrderState::Done, "{result}");
    let reply = result["device_reply"].as_str().unwrap();
    for part in ["VOL 120: ok", "CMODE 06: ok"] {
        assert!(reply.contains(part), "{part:?} missing from {reply:?}");
    }
    // A source the agent does not manage: refused before anything runs.
    let order = env
        .order(
            &d1,
            OrderAction::CopySettings {
                source_device: epmc_proto::bounded::BoundedString::new("NOSUCHDEVICE").unwrap(),
                profile: epmc_proto::bounded::BoundedString::new("lecture").unwrap(),
            },
        )
        .await;
    let (state, result) = env.finished(order).await;
    assert_eq!(state, OrderState::Failed);
    assert_eq!(result.unwrap()["reason"], "not_permitted");

    // Orders for a held session run on it too.
    let d2 = env.device(p[2].serial()).await;
    let order = env.order(&d2, OrderAction::PowerOn).await;
    assert_eq!(env.finished(order).await.0, OrderState::Done);
    assert_eq!(p[2].power_code(), PowerCode::ON);

    // The agent screen.
    let state_dir = agent_dir.join("state");
    let screen = eventually("status file shows all three", async || {
        let s = status::read(&state_dir).ok()?;
        (s.server_connected
            && s.targets.len() == 3
            && s.targets.iter().all(|t| t.last_contact.is_some()))
        .then_some(s)
    })
    .await;
    let mut out = Vec::new();
    epmc_agent::cli::write_status(&mut out, &screen, Timestamp::now().unix()).unwrap();
    let out = String::from_utf8(out).unwrap();
    for needle in ["Room 1", "Room 2", "Hall", p[0].serial(), "on", "connected"] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    // Everything the agent sent was taken, its `online` on the state channel included (the
    // session's birth message, acknowledged before the session reports connected).
    let server = env.server();
    let stats = server.endpoint().unwrap().stats();
    assert!(stats.committed > 0);
    assert_eq!(stats.rejected, 0, "{stats:?}");
    let rejected = server.store().admin().rejected_messages(10).await.unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_on_a_held_session_arrive_as_events_and_an_outage_loses_none() {
    let mut env = Env::start().await;
    let fleet = fleet(1).await;
    let p = &fleet.projectors()[0];
    let agent_dir = env.issue("notify-agent").await;
    let config = env.config(
        &agent_dir,
        "bidirectional",
        &[(p.tcp_addr(), "Lab", "hold")],
    );
    let service = Service::start(config, options(&agent_dir)).await.unwrap();
    let device = env.device(p.serial()).await;

    let warnings_events = async |env: &Env| -> Vec<u32> {
        let events = env
            .server()
            .store()
            .tenant(env.tenant)
            .events(device.id, 1000)
            .await
            .unwrap();
        // Newest first from the store: oldest first here.
        events
            .iter()
            .rev()
            .filter_map(|e| match &e.event {
                DeviceEventKind::StatusChange { warnings, .. } => Some(warnings.len() as u32),
                _ => None,
            })
            .collect()
    };

    // A status change while connected reaches the server as an event.
    p.set_warnings(Warnings::AIR_FILTER);
    eventually("event stored", async || {
        (warnings_events(&env).await.contains(&1)).then_some(())
    })
    .await;
    let before = warnings_events(&env).await.len();

    // The server goes away; the projector keeps changing.
    env.server.take().unwrap().shutdown().await;
    eventually("agent sees the outage", async || {
        (!service.connected()).then_some(())
    })
    .await;
    let changes = [
        Warnings::NONE,
        Warnings::AIR_FILTER,
        Warnings::NONE,
        Warnings::AIR_FILTER.union(Warnings::HIGH_TEMPERATURE),
        Warnings::NONE,
    ];
    for w in changes {
        p.set_warnings(w);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eventually("changes queued in the outbox", async || {
        (service.outbox_messages() >= changes.len()).then_some(())
    })
    .await;

    // The server is back on the same port: every change arrives, each once, in order.
    env.server = Some(serve(env.dir.path(), env.mqtt).await);
    let expected: Vec<u32> = changes.iter().map(|w| w.bits().count_ones()).collect();
    let got = eventually("backlog delivered", async || {
        let all = warnings_events(&env).await;
        (all.len() >= before + changes.len()).then_some(all)
    })
    .await;
    assert_eq!(&got[before..], &expected[..], "all events: {got:?}");
    eventually("outbox drained", async || {
        (service.outbox_messages() == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        warnings_events(&env).await.len(),
        before + changes.len(),
        "no duplicates"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_only_agent_refuses_every_order() {
    let env = Env::start().await;
    let fleet = fleet(1).await;
    let p = &fleet.projectors()[0];
    let agent_dir = env.issue("monitor-agent").await;
    let config = env.config(
        &agent_dir,
        "monitor-only",
        &[(p.tcp_addr(), "Lobby", "poll")],
    );
    let service = Service::start(config, options(&agent_dir)).await.unwrap();
    let device = env.device(p.serial()).await;
    let order = env.order(&device, OrderAction::PowerOn).await;
    let (state, result) = env.finished(order).await;
    assert_eq!(state, OrderState::Failed);
    let result = result.unwrap();
    assert_eq!(result["reason"], "not_permitted", "{result}");
    assert!(
        result["detail"].as_str().unwrap().contains("monitor-only"),
        "{result}"
    );
    assert_ne!(
        p.power_code(),
        PowerCode::ON,
        "the projector was not touched"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_of_another_agent_is_refused() {
    let env = Env::start().await;
    let first = env.issue("first").await;
    let second = env.issue("second").await;
    let config = env.config(&first, "bidirectional", &[]);
    let service = Service::start(config, options(&first)).await.unwrap();
    service.stop().await;
    // The second agent's certificate with the first agent's state directory.
    let config = env.config(&second, "bidirectional", &[]);
    let err = Service::start(config, options(&first)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("belongs to agent"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswering_projector_is_retried_with_back_off_not_in_a_loop() {
    let env = Env::start().await;
    // Accepts and closes at once: every attempt fails ("dropped").
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attempts.clone();
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    let agent_dir = env.issue("backoff-agent").await;
    let config = env.config(&agent_dir, "bidirectional", &[(addr, "Broken", "poll")]);
    let service = Service::start(config, options(&agent_dir)).await.unwrap();
    // Reported unreachable under its address id, and the server lists it so.
    let device = eventually("unreachable event", async || {
        env.devices()
            .await
            .into_iter()
            .find(|d| d.key == format!("ip:{}", addr.ip()))
    })
    .await;
    let why = device.unreachable.expect("listed as unreachable").reason;
    assert!(why.contains("dropped") || why.contains("closed"), "{why}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Status interval 0.7 s, doubling per failure: 0.7 + 1.4 + 2.8 s, so about four
    // attempts in four seconds (without back-off it would be hundreds).
    let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=6).contains(&n), "{n} attempts in about 4 s");
    let screen = status::read(&agent_dir.join("state")).unwrap();
    assert!(
        matches!(screen.targets[0].reach, status::Reach::Failed(_)),
        "{:?}",
        screen.targets[0]
    );
    service.stop().await;
    accept.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_serving_only_http_is_reported_through_the_fallback() {
    use escvp::emulator::{HttpConfig, TcpService};
    let env = Env::start().await;
    let fleet = Fleet::spawn([(
        "127.0.0.1:0".parse().unwrap(),
        template()
            .with_http(HttpConfig::default())
            .with_tcp(TcpService::Closed),
    )])
    .await
    .unwrap();
    let p = &fleet.projectors()[0];
    let agent_dir = env.issue("http-agent").await;
    let mut config = env.config(
        &agent_dir,
        "bidirectional",
        &[(p.tcp_addr(), "Web only", "poll")],
    );
    for t in &mut config.targets {
        t.http_port = p.http_addr().unwrap().port();
    }
    let service = Service::start(config, options(&agent_dir)).await.unwrap();
    // Stored under its serial, with a status read over HTTP.
    let device = env.device(p.serial()).await;
    // Orders need ESC/VP.net: refused with the reason, not left hanging.
    let order = env.order(&device, OrderAction::PowerOn).await;
    let (state, result) = env.finished(order).await;
    assert_eq!(state, OrderState::Failed);
    let detail = result.unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("only over HTTP"), "{detail}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_agent_update_orders_reach_the_updater() {
    let env = Env::start().await;
    let agent_dir = env.issue("update-agent").await;
    let agents = env.server().store().admin().agents(None).await.unwrap();
    let agent = agents.iter().find(|a| a.name == "update-agent").unwrap().id;
    let send = async |env: &Env| {
        let expires = Timestamp::from_unix(Timestamp::now().unix() + 600).unwrap();
        let id = env
            .server()
            .store()
            .orders()
            .create(
                OrderTarget::Agent(agent),
                &OrderAction::CheckAgentUpdate,
                "test",
                expires,
            )
            .await
            .unwrap();
        env.server().notify_orders();
        env.finished(id).await
    };

    // Without [update]: refused, saying why.
    let config = env.config(&agent_dir, "bidirectional", &[]);
    let service = Service::start(config, options(&agent_dir)).await.unwrap();
    let (state, result) = send(&env).await;
    assert_eq!(state, OrderState::Failed);
    assert!(
        result.unwrap()["detail"]
            .as_str()
            .unwrap()
            .contains("[update]")
    );
    service.stop().await;

    // With [update] pointing at this server: the updater asks it, nothing is published.
    let (key, _) = epmc_server::release::ReleaseKey::generate().unwrap();
    let path = agent_dir.join("agent.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text += &format!(
        "[update]\nurl = \"https://localhost:{}\"\npublic_key = \"{}\"\n",
        env.server().https_addr().port(),
        key.public_key()
    );
    std::fs::write(&path, text).unwrap();
    let mut config = AgentConfig::load(&path).unwrap();
    config.schedule.status_interval = Duration::from_millis(700);
    let service = Service::start(config, options(&agent_dir)).await.unwrap();
    let (state, result) = send(&env).await;
    let result = result.unwrap();
    assert_eq!(state, OrderState::Done, "{result}");
    assert!(
        result["device_reply"]
            .as_str()
            .unwrap()
            .contains("no agent release"),
        "{result}"
    );
    service.stop().await;
}

/// What one projector of the faulty fleet does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Healthy,
    /// Answers every command 150 ms late.
    Slow,
    /// Has a password, and the agent is configured with it.
    PasswordGiven,
    /// Has a password the agent does not know.
    PasswordMissing,
    /// Has a password; the agent is configured with another.
    PasswordWrong,
    /// Refuses every session with 0x53.
    Busy,
    /// Reads commands and never answers.
    Silent,
    /// Writes junk before each reply.
    Garbage,
    /// Answers two commands, then closes every connection.
    Drops,
}

impl Role {
    fn of(i: usize) -> Role {
        match i % 25 {
            3 => Role::Busy,
            7 => Role::PasswordGiven,
            8 => Role::PasswordMissing,
            9 => Role::PasswordWrong,
            12 => Role::Silent,
            16 => Role::Garbage,
            20 => Role::Drops,
            22 => Role::Slow,
            _ => Role::Healthy,
        }
    }

    fn is_faulty(self) -> bool {
        !matches!(self, Role::Healthy | Role::Slow | Role::PasswordGiven)
    }
}

/// Hundreds of emulated projectors, each on an address of its own (127.0.3.1 onwards), some
/// of them faulty, through the whole path to the server's database: every healthy one (slow
/// and password-protected ones included) is stored under its serial with what it reported;
/// each faulty one appears on the agent screen as what it is and never in the database with
/// a status; and the healthy ones keep being read while the faulty ones fail (nothing hangs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_projectors_some_faulty_are_each_reported_as_what_they_are() {
    const N: usize = 200;
    let env = Env::start().await;
    let first: SocketAddr = "127.0.3.1:0".parse().unwrap();
    let password = escvp::net::Password::new("pw").unwrap();
    let plan: Vec<_> = escvp::emulator::fleet_plan(first, N, true, &template())
        .into_iter()
        .enumerate()
        .map(|(i, (addr, mut c))| {
            c.serial = format!("FLT{i:07}");
            c.start_on = true;
            c.lamp_hours = vec![100 + i as u32];
            match Role::of(i) {
                Role::Healthy => {}
                Role::Slow => c.faults.reply_delay = Duration::from_millis(150),
                Role::PasswordGiven | Role::PasswordMissing | Role::PasswordWrong => {
                    c.password = Some(password.clone());
                }
                Role::Busy => c.faults.busy = true,
                Role::Silent => c.faults.silent = true,
                Role::Garbage => c.faults.garbage = b"\x00\xffjunk".to_vec(),
                Role::Drops => c.faults.drop_after = Some(2),
            }
            (addr, c)
        })
        .collect();
    let fleet = Fleet::spawn(plan).await.unwrap();
    let p = fleet.projectors();
    let agent_dir = env.issue("fleet-agent").await;
    let mut targets = String::new();
    for (i, projector) in p.iter().enumerate() {
        targets += &format!(
            "[[target]]\naddress = \"{}\"\ndisplay_name = \"Room {i}\"\n",
            projector.tcp_addr()
        );
        match Role::of(i) {
            Role::PasswordGiven => targets += "password = \"pw\"\n",
            Role::PasswordWrong => targets += "password = \"nope\"\n",
            _ => {}
        }
    }
    let mut config = env.config_with(&agent_dir, "bidirectional", &targets);
    config.concurrency = 32;
    let mut o = options(&agent_dir);
    o.spread_start = Duration::from_millis(500);
    let service = Service::start(config, o).await.unwrap();

    // Every healthy projector, in the database under its serial, with its own readings.
    let healthy: Vec<usize> = (0..N).filter(|i| !Role::of(*i).is_faulty()).collect();
    let stored = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let devices = env.devices().await;
            let with_status = devices
                .iter()
                .filter(|d| d.serial.is_some() && d.status.is_some())
                .count();
            if with_status >= healthy.len() {
                break devices;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {with_status} of {} healthy projectors stored within 120 s",
                healthy.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    for &i in &healthy {
        let serial = p[i].serial();
        let d = stored
            .iter()
            .find(|d| d.serial.as_deref() == Some(serial))
            .unwrap_or_else(|| panic!("#{i} ({:?}) {serial} not stored", Role::of(i)));
        let status = &d.status.as_ref().unwrap().1;
        assert_eq!(
            status.power,
            Some(epmc_proto::model::PowerState::On),
            "#{i}"
        );
        assert_eq!(
            d.name.as_deref(),
            Some(format!("Room {i}").as_str()),
            "#{i}"
        );
    }
    // No faulty projector is in the database as if it had been read.
    for d in stored.iter().filter(|d| d.status.is_some()) {
        if let Some(serial) = &d.serial {
            let i = p.iter().position(|x| x.serial() == serial).unwrap();
            assert!(
                !Role::of(i).is_faulty(),
                "#{i} ({:?}) stored as read: {d:?}",
                Role::of(i)
            );
        }
    }

    // The agent screen: each faulty one as what it is; the healthy ones read again and
    // again while the faulty ones fail (rounds go on).
    let state_dir = agent_dir.join("state");
    let screen = eventually("agent screen shows every target settled", async || {
        let s = status::read(&state_dir).ok()?;
        let settled = s.targets.len() == N
            && s.targets.iter().all(|t| {
                let i = p.iter().position(|x| x.tcp_addr() == t.addr).unwrap();
                if Role::of(i).is_faulty() {
                    t.failed_attempts >= 1
                } else {
                    t.reads >= 3
                }
            });
        settled.then_some(s)
    })
    .await;
    for t in &screen.targets {
        let i = p.iter().position(|x| x.tcp_addr() == t.addr).unwrap();
        let role = Role::of(i);
        let detail = match &t.reach {
            status::Reach::Failed(d) => d.as_str(),
            _ => "",
        };
        let expected = match role {
            Role::Healthy | Role::Slow | Role::PasswordGiven => {
                assert_eq!(t.reach, status::Reach::Ok, "#{i} ({role:?})");
                assert_eq!(t.device_id.as_deref(), Some(p[i].serial()), "#{i}");
                continue;
            }
            Role::Busy => {
                assert_eq!(t.reach, status::Reach::Busy, "#{i}");
                continue;
            }
            Role::PasswordMissing => "password required",
            Role::PasswordWrong => "wrong password",
            Role::Silent => "timed out",
            Role::Garbage => "not ESC/VP.net",
            Role::Drops => "closed the connection",
        };
        assert!(
            detail.contains(expected),
            "#{i} ({role:?}): {:?}, expected {expected:?}",
            t.reach
        );
        assert!(
            t.last_contact.is_none() || role == Role::Drops,
            "#{i}: {t:?}"
        );
    }
    service.stop().await;
    fleet.shutdown().await;
}

/// Silent projectors (they answer the ESC/VP.net handshake, then nothing) do not hold up the
/// healthy ones: with one concurrency slot and the silent ones first in line, every healthy
/// projector is read while the silent ones are still waiting for their answers; the silent
/// ones are then reported as timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_projectors_give_their_slot_up_and_the_healthy_ones_are_read_meanwhile() {
    use escvp::emulator::Faults;
    let env = Env::start().await;
    let silent = Fleet::spawn_consecutive(
        "127.0.0.1:0".parse().unwrap(),
        3,
        ProjectorConfig {
            faults: Faults {
                silent: true,
                ..Faults::default()
            },
            ..template()
        },
    )
    .await
    .unwrap();
    let healthy = fleet(6).await;
    let agent_dir = env.issue("silent-agent").await;
    let targets: Vec<(SocketAddr, &str, &str)> = silent
        .projectors()
        .iter()
        .map(|p| (p.tcp_addr(), "Silent", "poll"))
        .chain(
            healthy
                .projectors()
                .iter()
                .map(|p| (p.tcp_addr(), "Healthy", "poll")),
        )
        .collect();
    let mut config = env.config(&agent_dir, "bidirectional", &targets);
    config.concurrency = 1;
    // One read each in this test.
    config.schedule.status_interval = Duration::from_secs(600);
    let mut o = options(&agent_dir);
    o.spread_start = Duration::ZERO;
    o.full_on_first_contact = false;
    // A silent projector's command times out after 12 s; the grace's upper bound is longer,
    // so without a learnt grace each silent one would hold the only slot for those 12 s.
    o.collect.command_timeout_scale = 4.0;
    o.slow_grace = Duration::from_secs(60);
    let service = Service::start(config, o).await.unwrap();
    let is_silent = |a: SocketAddr| silent.projectors().iter().any(|p| p.tcp_addr() == a);

    let screen = eventually("every healthy projector read", async || {
        let st = service.status();
        st.targets
            .iter()
            .filter(|t| !is_silent(t.addr))
            .all(|t| t.reads == 1)
            .then_some(st)
    })
    .await;
    for t in screen.targets.iter().filter(|t| is_silent(t.addr)) {
        assert_eq!(
            (t.reads, t.failed_attempts),
            (0, 0),
            "a silent projector still waiting while the healthy ones were read: {t:?}"
        );
    }

    // And the silent ones are reported: timed out, not read.
    eventually("every silent projector reported", async || {
        let st = service.status();
        st.targets
            .iter()
            .filter(|t| is_silent(t.addr))
            .all(|t| match &t.reach {
                status::Reach::Failed(why) => {
                    assert!(
                        why.contains("timed out") || why.contains("timeout"),
                        "{why}"
                    );
                    t.reads == 0
                }
                _ => false,
            })
            .then_some(())
    })
    .await;
    service.stop().await;
}
