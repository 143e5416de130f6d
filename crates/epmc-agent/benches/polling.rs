//! Polling-round benchmark of the agent service (issue 10's goals): how long one status round
//! over N emulated projectors takes, and how much memory the agent uses, beside the time a
//! perfectly parallel client would need (the emulated reply latency times the replies the
//! fleet gave, divided by the concurrency).
//!
//! The agent runs in this process (so its memory is this process's peak RSS); the emulated
//! projectors run in child processes (this binary again, role `fleet`, at most 4,000
//! projectors each: every projector has a TCP and a UDP socket), and the server in one more
//! (role `server`: the real epmc-server on SQLite, which issues the agent's certificate).
//! Projectors sit on 127.1.x.y:3629, one address each; every reply is delayed by the latency;
//! with `silent`, every tenth projector answers the handshake and then never again.
//!
//! `cargo bench -p epmc-agent --bench polling` runs 1,000 and 10,000 projectors, with and
//! without 10 % silent ones (EPMC_POLL_SIZES=1000,10000, EPMC_POLL_LATENCY_MS=20,
//! EPMC_POLL_CONCURRENCY=64). Without `--bench` (as `cargo test --benches` runs it) it runs
//! 40 projectors once, as a check that it works.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use epmc_agent::config::AgentConfig;
use epmc_agent::service::{Service, ServiceOptions};

const PER_CHILD: usize = 4000;
const ROLE: &str = "EPMC_POLL_ROLE";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn addr_of(i: usize) -> SocketAddr {
    let base = u32::from(Ipv4Addr::new(127, 1, 0, 1));
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(base + i as u32)), 3629)
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("fleet") => return fleet_role(),
        Ok("server") => return server_role(),
        _ => {}
    }
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = if full {
        std::env::var("EPMC_POLL_SIZES")
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    } else {
        vec![40]
    };
    let latency = Duration::from_millis(env_or("EPMC_POLL_LATENCY_MS", 20));
    let concurrency: usize = env_or("EPMC_POLL_CONCURRENCY", 64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "agent polling round: reply latency {} ms, concurrency {concurrency}, status read per projector",
        latency.as_millis()
    );
    println!(
        "{:>8} {:>8} {:>10} {:>14} {:>12} {:>10} {:>12}",
        "targets", "silent", "round s", "perfect s", "replies", "failed", "peak MiB"
    );
    for &n in &sizes {
        for silent in [false, true] {
            if !full && silent {
                continue;
            }
            let r = runtime.block_on(round(n, silent, latency, concurrency));
            println!(
                "{:>8} {:>8} {:>10.2} {:>14.2} {:>12} {:>10} {:>12.1}",
                n,
                if silent { n / 10 } else { 0 },
                r.round.as_secs_f64(),
                r.perfect.as_secs_f64(),
                r.replies,
                r.failed,
                r.peak_mib
            );
            if !full {
                assert_eq!(r.failed, 0, "every projector answers in the check run");
            }
        }
    }
}

struct RoundResult {
    round: Duration,
    perfect: Duration,
    replies: u64,
    failed: usize,
    peak_mib: f64,
}

struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(role: &str, envs: &[(&str, String)]) -> Peer {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.env(ROLE, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("child starts");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("child answers");
        assert!(!l.is_empty(), "child exited early");
        l.trim_end().to_owned()
    }

    fn ask(&mut self, q: &str) -> String {
        writeln!(self.stdin, "{q}").expect("child reads");
        self.line()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn round(n: usize, silent: bool, latency: Duration, concurrency: usize) -> RoundResult {
    let work = tempfile::tempdir().expect("tempdir");
    let mut server = Peer::spawn(
        "server",
        &[("EPMC_POLL_DIR", work.path().display().to_string())],
    );
    let port: u16 = server.line().parse().expect("server port");
    let mut fleets: Vec<Peer> = (0..n.div_ceil(PER_CHILD))
        .map(|c| {
            let first = c * PER_CHILD;
            let count = PER_CHILD.min(n - first);
            Peer::spawn(
                "fleet",
                &[
                    ("EPMC_POLL_FIRST", first.to_string()),
                    ("EPMC_POLL_COUNT", count.to_string()),
                    ("EPMC_POLL_LATENCY_MS", latency.as_millis().to_string()),
                    ("EPMC_POLL_SILENT", u8::from(silent).to_string()),
                ],
            )
        })
        .collect();
    for f in &mut fleets {
        assert_eq!(f.line(), "ready");
    }
    let trace = std::env::var_os("EPMC_POLL_TRACE_MEM").is_some();
    let mem = |what: &str| {
        if trace {
            eprintln!(
                "  memory {what}: rss {:.1} MiB, peak {:.1} MiB",
                rss_kib("VmRSS:") as f64 / 1024.0,
                peak_rss_kib() as f64 / 1024.0
            );
        }
    };
    mem("before the configuration");
    let config = agent_config(work.path(), port, n, concurrency);
    mem("configuration loaded");
    let mut options = ServiceOptions::new(work.path().join("agent").join("state"));
    options.spread_start = Duration::ZERO;
    options.full_on_first_contact = false;
    let before: u64 = fleets
        .iter_mut()
        .map(|f| f.ask("commands").parse::<u64>().expect("count"))
        .sum();
    let started = Instant::now();
    let service = Service::start(config, options).await.expect("agent starts");
    mem("service started");
    let deadline = Duration::from_secs(300);
    let failed = loop {
        let st = service.status();
        let pending = st
            .targets
            .iter()
            .filter(|t| t.reads == 0 && t.failed_attempts == 0)
            .count();
        if pending == 0 {
            break st.targets.iter().filter(|t| t.reads == 0).count();
        }
        assert!(
            started.elapsed() < deadline,
            "round not over in {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let round = started.elapsed();
    mem("round over");
    let replies: u64 = fleets
        .iter_mut()
        .map(|f| f.ask("commands").parse::<u64>().expect("count"))
        .sum::<u64>()
        - before;
    let peak_mib = peak_rss_kib() as f64 / 1024.0;
    service.stop().await;
    drop(fleets);
    drop(server);
    RoundResult {
        round,
        perfect: latency.mul_f64(replies as f64 / concurrency as f64),
        replies,
        failed,
        peak_mib,
    }
}

fn agent_config(dir: &Path, port: u16, n: usize, concurrency: usize) -> AgentConfig {
    let agent = dir.join("agent");
    let mut text = format!(
        "concurrency = {}\n[server]\nurl = \"mqtts://localhost:{port}\"\nca_cert = \"ca.crt\"\nclient_cert = \"agent.crt\"\nclient_key = \"agent.key\"\n",
        concurrency.min(256)
    );
    for i in 0..n {
        text += &format!("[[target]]\naddress = \"{}\"\n", addr_of(i));
    }
    let path = agent.join("agent.toml");
    std::fs::write(&path, text).expect("config written");
    let mut config = AgentConfig::load(&path).expect("config loads");
    // One round only: the next status read is an hour away.
    config.schedule.status_interval = Duration::from_secs(3600);
    config
}

/// Peak resident memory of this process (VmHWM), KiB.
fn peak_rss_kib() -> u64 {
    rss_kib("VmHWM:")
}

/// A memory figure of this process from /proc/self/status, KiB.
fn rss_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Child: the emulated projectors; answers `commands` with the total commands seen.
fn fleet_role() {
    use escvp::emulator::{Faults, Fleet, ProjectorConfig};
    let first: usize = env_or("EPMC_POLL_FIRST", 0);
    let count: usize = env_or("EPMC_POLL_COUNT", 1);
    let latency = Duration::from_millis(env_or("EPMC_POLL_LATENCY_MS", 20));
    let silent: u8 = env_or("EPMC_POLL_SILENT", 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let plan = (0..count).map(|i| {
            let n = first + i;
            let config = ProjectorConfig {
                name: format!("PJ-{n}").chars().take(16).collect(),
                serial: format!("BENCH{n:07}"),
                faults: Faults {
                    reply_delay: latency,
                    silent: silent == 1 && n % 10 == 9,
                    ..Faults::default()
                },
                ..ProjectorConfig::default()
            };
            (addr_of(n), config)
        });
        let fleet = Fleet::spawn(plan).await.expect("fleet starts");
        println!("ready");
        let handles = fleet.projectors().to_vec();
        // Answers on a plain thread; the projectors run until stdin closes.
        let _ = tokio::task::spawn_blocking(move || {
            for l in std::io::stdin().lines() {
                let Ok(l) = l else { break };
                if l == "commands" {
                    let total: u64 = handles.iter().map(|p| p.commands_seen()).sum();
                    println!("{total}");
                }
            }
        })
        .await;
        drop(fleet);
    });
}

/// Child: the real server (SQLite) with a tenant and the agent's certificate written to
/// `EPMC_POLL_DIR/agent`; prints its MQTT port, then runs until stdin closes.
fn server_role() {
    let dir = std::path::PathBuf::from(std::env::var("EPMC_POLL_DIR").expect("dir"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        use epmc_server::datadir;
        use epmc_server::server::{ServeConfig, Server};
        epmc_server::ca::install_crypto_provider();
        let data = dir.join("server");
        datadir::init(&data, &[]).expect("init");
        let mut config = ServeConfig::new(&data);
        config.mqtt = "127.0.0.1:0".parse().expect("addr");
        config.https = "127.0.0.1:0".parse().expect("addr");
        let server = Server::start(config).await.expect("server starts");
        let admin = server.store().admin();
        let tenant = admin.add_tenant("bench").await.expect("tenant");
        let agent = admin.create_agent(tenant, "bench").await.expect("agent");
        let bundle = datadir::load(&data)
            .expect("data dir")
            .ca
            .issue_agent_with_key(agent.uuid(), time::OffsetDateTime::now_utc())
            .expect("certificate");
        datadir::write_agent_bundle(&dir.join("agent"), &bundle).expect("bundle");
        println!("{}", server.mqtt_addr().expect("embedded endpoint").port());
        let mut sink = Vec::new();
        let _ = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            std::io::stdin().read_to_end(&mut sink)
        })
        .await;
        server.shutdown().await;
    });
}
