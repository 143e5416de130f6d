//! The `epmc-agent` command line. `main.rs` parses [`Cli`] and calls [`run`]; tests call
//! [`run`] in-process with their own output buffers.
//!
//! Exit codes: 0 success, 1 a target failed or the configuration is invalid, 2 bad command
//! line (from clap).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use epmc_proto::{Envelope, Message};
use escvp::net::Password;

use crate::collect::{CollectOptions, Collected, Interface, collect_all};
use crate::config::{AgentConfig, Endpoint, MAX_TOTAL_ADDRESSES, Mode, SessionMode, TargetSpec};
use crate::discover::{HelloOptions, HttpProbe, ProbeOutcome, discover_combined};

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

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli, out: &mut impl Write, err: &mut impl Write) -> u8 {
    let result = match cli.command {
        Command::Collect(a) => run_collect(a, out, err).await,
        Command::Discover(a) => run_discover(a, out, err).await,
        Command::Check(a) => run_check(a, out, err),
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
    let results = collect_all(
        &endpoints,
        &args.timeouts.options(),
        args.concurrency as usize,
    )
    .await;
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
                .map(|(p, c)| format!("{p:?} ({:02X})", c.get()))),
        ),
        (
            "source",
            opt(st.source.as_ref().map(|s| match &s.name {
                Some(n) => format!("{n} ({:02X})", s.code.get()),
                None => format!("{:02X}", s.code.get()),
            })),
        ),
        (
            "a/v mute",
            opt(st.av_mute.map(|m| if m { "on" } else { "off" }.into())),
        ),
        ("signal", opt(st.signal.map(|s| format!("{s:?}")))),
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
            opt(st.warnings.as_ref().map(|w| format!("{:?}", w.as_slice()))),
        ),
        (
            "alarms",
            opt(st.alarms.as_ref().map(|a| format!("{:?}", a.as_slice()))),
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
    let probes = discover_combined(
        &endpoints,
        &args.timeouts.options(),
        args.concurrency as usize,
        (!args.no_hello).then_some(&hello),
    )
    .await;
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
