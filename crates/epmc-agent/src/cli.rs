//! The `epmc-agent` command line. `main.rs` parses [`Cli`] and calls [`run`]; tests call
//! [`run`] in-process with their own output buffers.
//!
//! Exit codes: 0 success, 1 a target failed or the configuration is invalid, 2 bad command
//! line (from clap).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use epmc_proto::{Envelope, Message, wire_name};
use escvp::net::Password;

use crate::collect::{CollectOptions, Collected, Interface, collect_all_observed};
use crate::config::ProxyUrl;
use crate::config::{AgentConfig, Endpoint, MAX_TOTAL_ADDRESSES, Mode, SessionMode, TargetSpec};
use crate::discover::{HelloOptions, HttpProbe, ProbeOutcome, discover_combined_observed};
use crate::enroll::{EnrollOptions, EnrollProxy, ServerAddress, Token, enroll};
use crate::progress::{self, Progress};
use epmc_transport::client::ProxyCredentials;

/// EPMC-rs agent: discovers Epson projectors on the LAN and collects their data.
#[derive(Debug, Parser)]
#[command(name = "epmc-agent", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read projectors once and print what they report.
    Collect(CollectArgs),
    /// Sweep addresses for projectors answering ESC/VP.net.
    Discover(DiscoverArgs),
    /// Validate a configuration file without starting.
    Check(CheckArgs),
    /// Run the agent service: watch every target, report to the server, execute orders.
    Run(RunArgs),
    /// Show the agent screen: every target with its power, source, errors and last contact.
    Status(StatusArgs),
    /// Enroll with a server: make a key, get a certificate, write the configuration.
    Enroll(EnrollArgs),
    /// Install the newest signed release from the server (or, with --check, only look).
    Update(UpdateArgs),
    /// Check that this binary works (run by `update` on a new binary before keeping it).
    #[command(hide = true)]
    SelfTest(SelfTestArgs),
}

/// The agent's directory: `agent.toml`, its certificates, and `state/`.
#[derive(Debug, Args, Clone)]
pub struct DirArgs {
    /// The agent's directory (configuration, certificates and the `state/` directory).
    #[arg(
        long,
        value_name = "DIR",
        env = "EPMC_AGENT_DIR",
        default_value = "/var/lib/epmc-agent"
    )]
    pub dir: PathBuf,
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory.
    #[command(flatten)]
    pub dir: DirArgs,
    /// The configuration file (default: DIR/agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More targets, added to those in the file (repeatable; CIDR ranges too).
    #[arg(long = "target", value_name = "ADDR[:PORT]|CIDR[:PORT]", value_parser = parse_spec)]
    pub targets: Vec<TargetSpec>,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Directory.
    #[command(flatten)]
    pub dir: DirArgs,
    /// Print the status file as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Timeouts shared by `collect` and `discover`.
#[derive(Debug, Args, Clone)]
pub struct TimeoutArgs {
    /// Milliseconds a TCP connection may take to open.
    #[arg(long, value_name = "MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub connect_timeout_ms: u64,
    /// Milliseconds the ESC/VP.net handshake reply may take.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub handshake_timeout_ms: u64,
    /// Milliseconds one query may take (the ESC/VP21 rule is 3000).
    #[arg(long, value_name = "MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub command_timeout_ms: u64,
    /// Seconds a whole projector may take, whatever happens.
    #[arg(long, value_name = "S", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub deadline_s: u64,
}

impl TimeoutArgs {
    fn options(&self) -> CollectOptions {
        CollectOptions {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            command_timeout_scale: self.command_timeout_ms as f64 / 3000.0,
            deadline: Duration::from_secs(self.deadline_s),
        }
    }
}

/// `collect`.
#[derive(Debug, Args)]
pub struct CollectArgs {
    /// Collect once and exit (continuous collection runs from a configuration file).
    #[arg(long, required = true)]
    pub once: bool,
    /// A projector to read (repeatable); port 3629 by default.
    #[arg(long = "target", value_name = "ADDR[:PORT]", required = true, value_parser = parse_single)]
    pub targets: Vec<SocketAddr>,
    /// ESC/VP.net password (at most 16 characters), used for every target (and as the
    /// HTTP Digest password of the fallback).
    #[arg(long, value_name = "PW", value_parser = parse_password)]
    pub password: Option<Password>,
    /// Port of the HTTP json_query fallback, tried where the ESC/VP.net port is closed.
    #[arg(long, value_name = "PORT", default_value_t = crate::config::DEFAULT_HTTP_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub http_port: u16,
    /// Never fall back to HTTP.
    #[arg(long, conflicts_with = "http_port")]
    pub no_http: bool,
    /// Print the epmc-proto JSON envelopes (one per line) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Projectors read at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub concurrency: u64,
    /// Timeouts.
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

/// `discover`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["ranges", "config"])))]
pub struct DiscoverArgs {
    /// Addresses to sweep: CIDR ranges or single addresses, each with an optional :PORT
    /// (repeatable, or several after one flag).
    #[arg(long = "range", value_name = "CIDR|ADDR[:PORT]", num_args = 1.., value_parser = parse_spec)]
    pub ranges: Vec<TargetSpec>,
    /// Sweep the targets of this configuration file instead, with their passwords.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["ranges", "password"])]
    pub config: Option<PathBuf>,
    /// ESC/VP.net password (at most 16 characters), used for every address of --range.
    #[arg(long, value_name = "PW", value_parser = parse_password)]
    pub password: Option<Password>,
    /// Addresses probed at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    /// List every address, not only those that answered ESC/VP.net.
    #[arg(long)]
    pub all: bool,
    /// Do not send the UDP HELLO (unicast, to the same addresses and ports).
    #[arg(long)]
    pub no_hello: bool,
    /// Milliseconds to wait for UDP HELLO replies.
    #[arg(long, value_name = "MS", default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub hello_timeout_ms: u64,
    /// Port of the HTTP json_query interface probed where the ESC/VP.net port is closed
    /// (for --range; a configuration file names its own).
    #[arg(long, value_name = "PORT", default_value_t = crate::config::DEFAULT_HTTP_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub http_port: u16,
    /// Do not probe HTTP.
    #[arg(long, conflicts_with = "http_port")]
    pub no_http: bool,
    /// Timeouts.
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

/// `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// `enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The server's enrollment endpoint, https://HOST[:PORT].
    #[arg(long, value_name = "URL", value_parser = parse_server)]
    pub server: ServerAddress,
    /// The one-time enrollment token (epmc1.<id>.<secret>.<ca-sha256>) from
    /// `epmc-server token create`. From the environment, it stays out of the process list.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "EPMC_ENROLL_TOKEN",
        hide_env_values = true
    )]
    pub token: String,
    /// Where to write ca.crt, agent.crt, agent.key and agent.toml (created owner-only if
    /// missing): the directory `run` reads.
    #[command(flatten)]
    pub dir: DirArgs,
    /// A name for this agent on the server (default: its id).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Go through this HTTP proxy (CONNECT), http://HOST:PORT; also written to agent.toml.
    #[arg(long, value_name = "URL", value_parser = parse_proxy)]
    pub proxy: Option<ProxyUrl>,
    /// User name for the proxy (Basic authentication).
    #[arg(long, value_name = "USER", requires_all = ["proxy", "proxy_password"])]
    pub proxy_user: Option<String>,
    /// Password for the proxy.
    #[arg(
        long,
        value_name = "PW",
        requires = "proxy_user",
        env = "EPMC_PROXY_PASSWORD",
        hide_env_values = true
    )]
    pub proxy_password: Option<String>,
    /// Replace an existing enrollment in DIR.
    #[arg(long)]
    pub force: bool,
    /// The release public key, ed25519:<64 hex> (`epmc-server release keygen` prints it):
    /// enables signed self-update from this server in agent.toml ([update]).
    #[arg(long, value_name = "KEY", value_parser = parse_release_key)]
    pub release_key: Option<epmc_proto::release::ReleasePublicKey>,
    /// Seconds each request to the server may take.
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout_s: u64,
}

fn parse_server(s: &str) -> Result<ServerAddress, String> {
    s.parse()
}

fn parse_release_key(s: &str) -> Result<epmc_proto::release::ReleasePublicKey, String> {
    s.parse()
        .map_err(|e: epmc_proto::release::ReleaseError| e.to_string())
}

fn parse_proxy(s: &str) -> Result<ProxyUrl, String> {
    let (host, port) = crate::config::parse_url(s.trim(), "http", None)?;
    Ok(ProxyUrl {
        host,
        port,
        credentials: None,
    })
}

/// `update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Only look: say whether a newer release verifies; download nothing.
    #[arg(long)]
    pub check: bool,
    /// Directory (agent.toml with its `[update]` section, the pinned CA).
    #[command(flatten)]
    pub dir: DirArgs,
    /// The configuration file [default: DIR/agent.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The binary to replace [default: this executable].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Seconds the new binary's self-test may take.
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub self_test_timeout: u64,
}

/// `self-test`.
#[derive(Debug, Args)]
pub struct SelfTestArgs {
    /// A configuration file that must load.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

fn parse_spec(s: &str) -> Result<TargetSpec, String> {
    s.parse::<TargetSpec>().map_err(|e| e.to_string())
}

fn parse_single(s: &str) -> Result<SocketAddr, String> {
    match parse_spec(s)? {
        TargetSpec::Single(a) => Ok(a),
        TargetSpec::Range(_) => {
            Err("a range; collect takes single addresses (use discover to sweep a range)".into())
        }
    }
}

fn parse_password(s: &str) -> Result<Password, String> {
    Password::new(s).map_err(|e| e.to_string())
}

/// Runs a parsed command line; returns the exit code. No progress is shown.
pub async fn run(cli: Cli, out: &mut impl Write, err: &mut impl Write) -> u8 {
    run_with_progress(cli, out, err, false).await
}

/// Runs a parsed command line; returns the exit code. With `progress` (the binary sets it
/// when stderr is a terminal), `discover` and `collect` show their progress on `err`, one
/// line rewritten in place and cleared at the end ([`crate::progress`]); without it they
/// write nothing beyond their results and errors.
pub async fn run_with_progress(
    cli: Cli,
    out: &mut impl Write,
    err: &mut impl Write,
    progress: bool,
) -> u8 {
    let result = match cli.command {
        Command::Collect(a) => run_collect(a, out, err, progress).await,
        Command::Discover(a) => run_discover(a, out, err, progress).await,
        Command::Check(a) => run_check(a, out, err),
        Command::Enroll(a) => run_enroll(a, out, err).await,
        Command::Run(a) => run_service(a, err).await,
        Command::Status(a) => run_status(a, out, err),
        Command::Update(a) => run_update(a, out, err).await,
        Command::SelfTest(a) => run_self_test(a, out, err),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "epmc-agent: cannot write output: {e}");
            1
        }
    }
}

async fn run_collect(
    args: CollectArgs,
    out: &mut impl Write,
    err: &mut impl Write,
    progress: bool,
) -> std::io::Result<u8> {
    let mut seen = BTreeSet::new();
    let endpoints: Vec<Endpoint> = args
        .targets
        .iter()
        .filter(|a| seen.insert(**a))
        .map(|a| {
            Endpoint::new(*a)
                .with_password(args.password.clone())
                .with_http_port((!args.no_http).then_some(args.http_port))
        })
        .collect();
    let total = endpoints.len();
    let mut line = progress.then(|| Progress::new(&mut *err));
    if let Some(p) = line.as_mut() {
        p.update(Instant::now(), || progress::read(0, total, 0));
    }
    let mut failed_so_far = 0;
    let results = collect_all_observed(
        &endpoints,
        &args.timeouts.options(),
        args.concurrency as usize,
        |done, result| {
            failed_so_far += usize::from(result.is_err());
            if let Some(p) = line.as_mut() {
                p.update(Instant::now(), || {
                    progress::read(done, total, failed_so_far)
                });
            }
        },
    )
    .await;
    if let Some(p) = line {
        p.finish();
    }
    let mut failed = 0;
    for (endpoint, result) in endpoints.iter().zip(results) {
        match result {
            Ok(c) if args.json => {
                if c.via != Interface::EscVpNet {
                    writeln!(err, "{}: read over {} at {}", endpoint.addr, c.via, c.addr)?;
                }
                for message in [
                    Message::Snapshot(c.snapshot.clone()),
                    Message::Collection(Box::new(c.collection.clone())),
                ] {
                    match Envelope::new(message).to_json() {
                        Ok(json) => {
                            out.write_all(&json)?;
                            out.write_all(b"\n")?;
                        }
                        Err(e) => {
                            failed += 1;
                            writeln!(err, "{}: cannot encode: {e}", endpoint.addr)?;
                        }
                    }
                }
            }
            Ok(c) => write_human(out, &c)?,
            Err(e) => {
                failed += 1;
                writeln!(err, "{}: {} ({})", endpoint.addr, e, e.code())?;
            }
        }
    }
    Ok(u8::from(failed > 0))
}

/// Wire names, comma-separated; `none` for an empty list.
fn names<T: serde::Serialize>(items: &[T]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.iter().map(wire_name).collect::<Vec<_>>().join(", ")
    }
}

fn write_human(out: &mut impl Write, c: &Collected) -> std::io::Result<()> {
    let col = &c.collection;
    let st = &col.status;
    let absent = "-";
    let opt = |v: Option<String>| v.unwrap_or_else(|| absent.to_owned());
    writeln!(out, "{}  {}", c.addr, col.device_id)?;
    let rows: Vec<(&str, String)> = vec![
        ("interface", format!("{} ({})", c.via, c.addr)),
        (
            "serial",
            opt(col.info.serial_number.as_ref().map(|s| s.to_string())),
        ),
        ("model", opt(col.info.model.as_ref().map(|s| s.to_string()))),
        (
            "firmware",
            opt(col.info.firmware_version.as_ref().map(|s| s.to_string())),
        ),
        (
            "power",
            opt(st
                .power
                .zip(st.power_code)
                .map(|(p, c)| format!("{} ({:02X})", wire_name(&p), c.get()))),
        ),
        ("source", opt(st.source.as_ref().map(ToString::to_string))),
        (
            "inputs",
            opt(col.info.sources.as_ref().map(|list| {
                list.as_slice()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            })),
        ),
        (
            "a/v mute",
            opt(st.av_mute.map(|m| if m { "on" } else { "off" }.into())),
        ),
        ("signal", opt(st.signal.map(|s| wire_name(&s)))),
        (
            "light hours",
            opt(st.light_up_time_hours.as_ref().map(|h| {
                h.as_slice()
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            })),
        ),
        (
            "operation hours",
            opt(st.total_operation_time_hours.map(|h| h.to_string())),
        ),
        (
            "error",
            opt(st.error_code.map(|c| format!("{:02X}", c.get()))),
        ),
        (
            "warnings",
            opt(st.warnings.as_ref().map(|w| names(w.as_slice()))),
        ),
        (
            "alarms",
            opt(st.alarms.as_ref().map(|a| names(a.as_slice()))),
        ),
        (
            "projector name",
            opt(col.settings.projector_name.as_ref().map(|s| s.to_string())),
        ),
        (
            "colour mode",
            opt(col.settings.color_mode.map(|c| format!("{:02X}", c.get()))),
        ),
        (
            "luminance mode",
            opt(col
                .settings
                .luminance_mode
                .map(|c| format!("{:02X}", c.get()))),
        ),
        (
            "luminance level",
            opt(col.settings.luminance_constant_level.map(|v| v.to_string())),
        ),
        ("volume", opt(col.settings.volume.map(|v| v.to_string()))),
    ];
    for (k, v) in rows {
        writeln!(out, "  {k:<16} {v}")?;
    }
    if !c.report.unsupported.is_empty() {
        writeln!(
            out,
            "  {:<16} {}",
            "not supported",
            c.report.unsupported.join(" ")
        )?;
    }
    for p in &c.report.problems {
        writeln!(out, "  {:<16} {}: {}", "problem", p.command, p.reason)?;
    }
    Ok(())
}

async fn run_discover(
    args: DiscoverArgs,
    out: &mut impl Write,
    err: &mut impl Write,
    progress: bool,
) -> std::io::Result<u8> {
    let mut seen = BTreeSet::new();
    let mut endpoints = Vec::new();
    if let Some(path) = &args.config {
        match AgentConfig::load(path) {
            Ok(c) => {
                endpoints = c.endpoints();
                if args.no_http {
                    for e in &mut endpoints {
                        e.http_port = None;
                    }
                }
            }
            Err(e) => {
                writeln!(err, "--config: {e}")?;
                return Ok(1);
            }
        }
    }
    for spec in &args.ranges {
        for addr in spec.addresses() {
            if seen.insert(addr) {
                if endpoints.len() == MAX_TOTAL_ADDRESSES {
                    writeln!(
                        err,
                        "--range: the ranges expand to more than {MAX_TOTAL_ADDRESSES} addresses"
                    )?;
                    return Ok(1);
                }
                endpoints.push(
                    Endpoint::new(addr)
                        .with_password(args.password.clone())
                        .with_http_port((!args.no_http).then_some(args.http_port)),
                );
            }
        }
    }
    let hello = HelloOptions {
        timeout: Duration::from_millis(args.hello_timeout_ms),
        ..HelloOptions::default()
    };
    let total = endpoints.len();
    let mut line = progress.then(|| Progress::new(&mut *err));
    if let Some(p) = line.as_mut() {
        p.update(Instant::now(), || progress::swept(0, total, 0));
    }
    let mut found_so_far = 0;
    let probes = discover_combined_observed(
        &endpoints,
        &args.timeouts.options(),
        args.concurrency as usize,
        (!args.no_hello).then_some(&hello),
        |done, found| {
            found_so_far += usize::from(found);
            if let Some(p) = line.as_mut() {
                p.update(Instant::now(), || {
                    progress::swept(done, total, found_so_far)
                });
            }
        },
    )
    .await;
    if let Some(p) = line {
        p.finish();
    }
    // The first address each serial number was seen at.
    let mut first_seen: Vec<(String, SocketAddr)> = Vec::new();
    let mut found = 0;
    for p in &probes {
        let mut line = String::new();
        match (&p.tcp, &p.http, &p.hello) {
            (ProbeOutcome::Projector { serial, problem }, _, _) => {
                line = format!(
                    "{}  projector  {}",
                    p.addr,
                    serial.as_deref().unwrap_or("-")
                );
                if let Some(e) = problem {
                    line.push_str(&format!("  ({e})"));
                }
            }
            (ProbeOutcome::Locked(e), _, _) => {
                line = format!("{}  locked     {} ({})", p.addr, e.code(), e);
            }
            (ProbeOutcome::Absent(tcp), Some(HttpProbe::Projector { serial }), _) => {
                line = format!(
                    "{}  projector  {}  (over HTTP json_query; ESC/VP.net: {})",
                    p.addr,
                    serial.as_deref().unwrap_or("-"),
                    tcp.code()
                );
            }
            (ProbeOutcome::Absent(_), Some(HttpProbe::Locked(e)), _) => {
                line = format!(
                    "{}  locked     {} ({}) over HTTP json_query",
                    p.addr,
                    e.code(),
                    e
                );
            }
            (ProbeOutcome::Absent(tcp), _, Some(h)) => {
                line = format!(
                    "{}  hello      {}  (answered HELLO; ESC/VP.net session: {})",
                    p.addr,
                    h.name.as_deref().unwrap_or("-"),
                    tcp.code()
                );
            }
            (ProbeOutcome::Absent(e), _, None) if args.all => {
                line = format!("{}  absent     {} ({})", p.addr, e.code(), e);
            }
            (ProbeOutcome::Absent(_), _, None) => {}
        }
        if p.is_projector() {
            found += 1;
            if let Some(serial) = p.serial() {
                match first_seen.iter().find(|(s, _)| s == serial) {
                    Some((_, first)) => line.push_str(&format!("  (same device as {first})")),
                    None => first_seen.push((serial.to_owned(), p.addr)),
                }
            }
        }
        if !line.is_empty() {
            writeln!(out, "{line}")?;
        }
    }
    writeln!(
        out,
        "{found} of {} addresses answered ESC/VP.net",
        probes.len()
    )?;
    Ok(u8::from(found == 0))
}

fn run_check(args: CheckArgs, out: &mut impl Write, err: &mut impl Write) -> std::io::Result<u8> {
    match AgentConfig::load(&args.config) {
        Ok(c) => {
            let addresses = c.endpoints().len();
            let held = c
                .targets
                .iter()
                .filter(|t| t.session == SessionMode::Hold)
                .count();
            writeln!(
                out,
                "{}: ok: {} target(s) ({held} held), {addresses} address(es); {}; status every {} s, full collection every {} s; concurrency {}; server {}:{}{}",
                args.config.display(),
                c.targets.len(),
                match c.mode {
                    Mode::Bidirectional => "bidirectional",
                    Mode::MonitorOnly => "monitor-only",
                },
                c.schedule.status_interval.as_secs(),
                c.schedule.full_collection_interval.as_secs(),
                c.concurrency,
                c.server.url.host,
                c.server.url.port,
                c.proxy
                    .as_ref()
                    .map(|p| format!(" via proxy {}:{}", p.host, p.port))
                    .unwrap_or_default(),
            )?;
            for note in c.notes(Some(&args.config)) {
                writeln!(out, "note: {note}")?;
            }
            Ok(0)
        }
        Err(e) => {
            writeln!(err, "{e}")?;
            Ok(1)
        }
    }
}

/// The configuration `run` uses: the file, plus the command line's targets (an address the
/// file already covers is not added twice).
pub fn service_config(args: &RunArgs) -> Result<AgentConfig, String> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| args.dir.dir.join("agent.toml"));
    let mut config = AgentConfig::load(&path).map_err(|e| e.to_string())?;
    let known: BTreeSet<SocketAddr> = config.endpoints().iter().map(|e| e.addr).collect();
    for spec in &args.targets {
        if spec.addresses().all(|a| known.contains(&a)) {
            continue;
        }
        config.targets.push(crate::config::Target {
            spec: *spec,
            password: None,
            meta: Default::default(),
            session: SessionMode::Poll,
            http_port: crate::config::DEFAULT_HTTP_PORT,
            line: 0,
        });
    }
    Ok(config)
}

async fn run_service(args: RunArgs, err: &mut impl Write) -> std::io::Result<u8> {
    let config = match service_config(&args) {
        Ok(c) => c,
        Err(e) => {
            writeln!(err, "epmc-agent: {e}")?;
            return Ok(1);
        }
    };
    if config.targets.is_empty() {
        writeln!(
            err,
            "epmc-agent: no targets: add [[target]] entries to the configuration or --target ADDR"
        )?;
    }
    let mut options = crate::service::ServiceOptions::new(args.dir.dir.join("state"));
    options.config_file = Some(
        args.config
            .clone()
            .unwrap_or_else(|| args.dir.dir.join("agent.toml")),
    );
    match crate::service::run(config, options, shutdown_signal()).await {
        Ok(crate::service::RunOutcome::Stopped) => Ok(0),
        Ok(crate::service::RunOutcome::Updated(v)) => {
            writeln!(
                err,
                "epmc-agent: updated to {v}; exiting so that the supervisor starts the new binary (run it with Restart=always)"
            )?;
            Ok(0)
        }
        Err(e) => {
            writeln!(err, "epmc-agent: {e}")?;
            Ok(1)
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run_status(args: StatusArgs, out: &mut impl Write, err: &mut impl Write) -> std::io::Result<u8> {
    let state = args.dir.dir.join("state");
    let status = match crate::service::status::read(&state) {
        Ok(s) => s,
        Err(e) => {
            writeln!(err, "epmc-agent: {e}")?;
            return Ok(1);
        }
    };
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&status).map_err(std::io::Error::other)?
        )?;
        return Ok(0);
    }
    write_status(out, &status, epmc_proto::bounded::Timestamp::now().unix())?;
    Ok(0)
}

fn ago(now: i64, then: Option<i64>) -> String {
    match then {
        None => "never".into(),
        Some(t) => {
            let s = (now - t).max(0);
            if s < 120 {
                format!("{s} s ago")
            } else if s < 7200 {
                format!("{} min ago", s / 60)
            } else {
                format!("{} h ago", s / 3600)
            }
        }
    }
}

/// Prints the agent screen.
pub fn write_status(
    out: &mut impl Write,
    s: &crate::service::status::AgentStatus,
    now: i64,
) -> std::io::Result<()> {
    use crate::service::status::Reach;
    writeln!(
        out,
        "agent {} (epmc-agent {}, {})",
        s.agent_id, s.version, s.mode
    )?;
    writeln!(
        out,
        "server: {}; {} message(s) waiting{}; {} order(s) in progress; updated {}",
        if s.server_connected {
            "connected".to_owned()
        } else {
            format!(
                "not connected ({})",
                s.server_error.as_deref().unwrap_or("connecting")
            )
        },
        s.outbox_messages,
        if s.held_messages > 0 {
            format!(
                " ({} more held in memory: the outbox cannot take them)",
                s.held_messages
            )
        } else {
            String::new()
        },
        s.orders_in_progress,
        ago(now, Some(s.written_at)),
    )?;
    writeln!(
        out,
        "{:<18} {:<24} {:<22} {:<18} {:<10} {:<28} last contact",
        "name", "device", "address", "power", "source", "state / errors"
    )?;
    for t in &s.targets {
        let st = t.status.as_ref();
        let power = st
            .and_then(|s| s.power)
            .and_then(|p| serde_json::to_value(p).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "-".to_owned());
        let source = st
            .and_then(|s| s.source.as_ref())
            .map_or("-".to_owned(), |src| {
                src.name
                    .as_ref()
                    .map_or(format!("{:02X}", src.code.get()), |n| n.to_string())
            });
        let mut problems = Vec::new();
        match &t.reach {
            Reach::Unknown => problems.push("not tried yet".to_owned()),
            Reach::Ok => {}
            Reach::Busy => problems.push("busy (another controller)".to_owned()),
            Reach::Failed(why) => problems.push(why.clone()),
        }
        if let Some(st) = st {
            problems.extend(st.problems());
        }
        let state = if problems.is_empty() {
            "ok".to_owned()
        } else {
            problems.join(", ")
        };
        writeln!(
            out,
            "{:<18} {:<24} {:<22} {:<18} {:<10} {:<28} {}",
            t.display_name.as_deref().unwrap_or("-"),
            t.device_id.as_deref().unwrap_or("-"),
            t.addr.to_string(),
            power,
            source,
            state,
            ago(now, t.last_contact),
        )?;
    }
    Ok(())
}

async fn run_enroll(
    args: EnrollArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<u8> {
    let token: Token = match args.token.parse() {
        Ok(t) => t,
        Err(e) => {
            writeln!(err, "epmc-agent enroll: --token: {e}")?;
            return Ok(1);
        }
    };
    let credentials = match (&args.proxy_user, &args.proxy_password) {
        (Some(u), Some(p)) => match ProxyCredentials::new(u, p) {
            Ok(c) => Some(c),
            Err(e) => {
                writeln!(err, "epmc-agent enroll: --proxy-user/--proxy-password: {e}")?;
                return Ok(1);
            }
        },
        _ => None,
    };
    let mut options = EnrollOptions::new(args.server, token, &args.dir.dir);
    options.name = args.name;
    options.force = args.force;
    options.timeout = Duration::from_secs(args.timeout_s);
    options.proxy = args.proxy.map(|url| EnrollProxy { url, credentials });
    options.release_key = args.release_key;
    match enroll(&options).await {
        Ok(done) => {
            let dir = args.dir.dir.display();
            writeln!(
                out,
                "enrolled as agent {} (server CA sha256 {})",
                done.agent_id, done.ca_fingerprint
            )?;
            writeln!(
                out,
                "wrote {dir}/ca.crt, {dir}/agent.crt, {dir}/agent.key and {}; MQTT server {}",
                done.config.display(),
                done.mqtt
            )?;
            if options.release_key.is_none() {
                writeln!(
                    out,
                    "self-update is off: enroll with --release-key, or add an [update] section to {}",
                    done.config.display()
                )?;
            }
            writeln!(
                out,
                "next: add the projectors to {} ([[target]] sections), check it with `epmc-agent check --config {}`, then start it with `epmc-agent run --dir {dir}`",
                done.config.display(),
                done.config.display()
            )?;
            // `run` keeps its state for one agent id only (see `identity::claim_state_dir`).
            let state = args.dir.dir.join("state");
            if let Ok(owner) = std::fs::read_to_string(state.join("agent-id"))
                && owner.trim() != done.agent_id.to_string()
            {
                writeln!(
                    out,
                    "note: {} holds the state of the previous agent {} (messages not yet sent, orders); `run` will refuse it: move it away first",
                    state.display(),
                    owner.trim()
                )?;
            }
            Ok(0)
        }
        Err(e) => {
            writeln!(err, "epmc-agent enroll: {e}")?;
            Ok(1)
        }
    }
}

async fn run_update(
    args: UpdateArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<u8> {
    use crate::update::{Check, SelfTest, UpdateError, UpdateOutcome, Updater};
    let config_path = args
        .config
        .unwrap_or_else(|| args.dir.dir.join("agent.toml"));
    let config = match AgentConfig::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            writeln!(err, "epmc-agent update: {e}")?;
            return Ok(1);
        }
    };
    let updater = match Updater::from_config(&config) {
        Ok(u) => u,
        Err(e) => {
            writeln!(err, "epmc-agent update: {}: {e}", config_path.display())?;
            return Ok(1);
        }
    };
    if args.check {
        return match updater.check().await {
            Ok(Check::NotPublished) => {
                writeln!(
                    out,
                    "no release is published for {}",
                    crate::update::BUILD_TARGET
                )?;
                Ok(0)
            }
            Ok(Check::UpToDate { current, published }) => {
                writeln!(out, "up to date: running {current}, published {published}")?;
                Ok(0)
            }
            Ok(Check::Available { current, manifest }) => {
                writeln!(
                    out,
                    "update available: {} (running {current}), {} bytes, signature verified",
                    manifest.version(),
                    manifest.size()
                )?;
                Ok(0)
            }
            Err(e) => {
                writeln!(err, "epmc-agent update: refused: {e}")?;
                Ok(1)
            }
        };
    }
    let binary = match args.binary {
        Some(b) => b,
        None => match std::env::current_exe() {
            Ok(b) => b,
            Err(e) => {
                writeln!(err, "epmc-agent update: cannot find this executable: {e}")?;
                return Ok(1);
            }
        },
    };
    let test = SelfTest {
        timeout: Duration::from_secs(args.self_test_timeout),
        ..SelfTest::with_config(&config_path)
    };
    match updater.update(&binary, &test).await {
        Ok(UpdateOutcome::NotPublished) => {
            writeln!(
                out,
                "no release is published for {}",
                crate::update::BUILD_TARGET
            )?;
            Ok(0)
        }
        Ok(UpdateOutcome::Installed { from, installed }) => {
            writeln!(
                out,
                "installed {} (was {from}) at {}; the previous binary is kept as {}; restart the agent to run the new version",
                installed.version,
                installed.binary.display(),
                installed.previous.display()
            )?;
            Ok(0)
        }
        Err(UpdateError::NotNewer { current, offered }) if current == offered => {
            writeln!(out, "up to date: running {current}, published {offered}")?;
            Ok(0)
        }
        Err(e) => {
            writeln!(err, "epmc-agent update: refused: {e}")?;
            Ok(1)
        }
    }
}

fn run_self_test(
    args: SelfTestArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> std::io::Result<u8> {
    match crate::update::self_test(args.config.as_deref()) {
        Ok(line) => {
            writeln!(out, "{line}")?;
            Ok(0)
        }
        Err(e) => {
            writeln!(err, "epmc-agent self-test: {e}")?;
            Ok(1)
        }
    }
}
