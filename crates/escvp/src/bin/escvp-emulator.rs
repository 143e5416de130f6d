//! `escvp-emulator`: runs one or many emulated Epson projectors on loopback (or any address
//! you give it) until Ctrl-C, printing one line per projector.
//!
//! ```text
//! escvp-emulator --listen 127.0.0.1:3629
//! escvp-emulator --listen 127.0.0.1:0 --count 20            # 20 projectors on free ports
//! escvp-emulator --listen 127.0.0.1:13629 --count 5         # ports 13629..13633
//! escvp-emulator --listen 127.0.0.2:3629 --count 5 --vary-address   # 127.0.0.2..6, port 3629
//! escvp-emulator --listen 127.0.0.1:0 --http-port 0 --password pw  # + json_query with Digest
//! escvp-emulator --listen 127.0.0.1:0 --http-port 0 --tcp-closed   # reachable over HTTP only
//! ```

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use escvp::emulator::{
    AckStyle, DigestAlgorithm, Faults, Fleet, HttpConfig, ProjectorConfig, TcpService, fleet_plan,
};
use escvp::net::Password;

/// Emulated Epson projectors speaking ESC/VP.net (TCP) and answering HELLO (UDP).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of the first projector (port 0: a free port for each).
    #[arg(long, default_value = "127.0.0.1:3629")]
    listen: SocketAddr,
    /// Number of projectors.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Use consecutive IPv4 addresses on one port instead of consecutive ports.
    #[arg(long)]
    vary_address: bool,
    /// ESC/VP.net password (at most 16 printable ASCII characters).
    #[arg(long)]
    password: Option<String>,
    /// Warm-up duration in seconds.
    #[arg(long, default_value_t = 5.0)]
    warmup_secs: f64,
    /// Cool-down duration in seconds.
    #[arg(long, default_value_t = 3.0)]
    cooldown_secs: f64,
    /// Emulated lamp hours per real second while on.
    #[arg(long, default_value_t = 1.0)]
    hours_per_second: f64,
    /// Acknowledge sets with `\r:` instead of `:`.
    #[arg(long)]
    cr_ack: bool,
    /// Start with the light on.
    #[arg(long)]
    on: bool,
    /// Delay every reply by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Answer the first N commands of the run with ERR.
    #[arg(long, default_value_t = 0)]
    err_next: u32,
    /// Refuse every CONNECT with 0x53 (busy).
    #[arg(long)]
    busy: bool,
    /// Also serve the HTTP json_query interface on this port (0: a free port each; shifted
    /// like the ESC/VP.net port for consecutive ports), with Digest auth when --password is
    /// set.
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,
    /// Offer SHA-256 instead of MD5 in HTTP Digest challenges.
    #[arg(long, requires = "http_port")]
    http_sha256: bool,
    /// Close the ESC/VP.net TCP port (connections refused; UDP HELLO still answered).
    #[arg(long)]
    tcp_closed: bool,
}

fn secs(s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|e| format!("bad duration {s}: {e}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        // The log goes to standard error: standard output is the projectors' list.
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not into a pipe, a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    if args.count == 0 || args.count > 1000 {
        return Err("--count must be between 1 and 1000".into());
    }
    let password = args.password.as_deref().map(Password::new).transpose()?;
    let template = ProjectorConfig {
        password,
        warm_up: secs(args.warmup_secs)?,
        cool_down: secs(args.cooldown_secs)?,
        hours_per_second: args.hours_per_second,
        ack_style: if args.cr_ack {
            AckStyle::CrColon
        } else {
            AckStyle::Colon
        },
        start_on: args.on,
        http: args.http_port.map(|port| {
            HttpConfig::default()
                .with_port(port)
                .with_algorithm(if args.http_sha256 {
                    DigestAlgorithm::Sha256
                } else {
                    DigestAlgorithm::Md5
                })
        }),
        tcp: if args.tcp_closed {
            TcpService::Closed
        } else {
            TcpService::Open
        },
        faults: Faults {
            reply_delay: Duration::from_millis(args.delay_ms),
            err_next: args.err_next,
            busy: args.busy,
            ..Faults::default()
        },
        ..ProjectorConfig::default()
    };
    let fleet = Fleet::spawn(fleet_plan(
        args.listen,
        args.count,
        args.vary_address,
        &template,
    ))
    .await?;
    for p in fleet.projectors() {
        print!(
            "projector name={} serial={} tcp={}{} udp={}",
            p.name(),
            p.serial(),
            p.tcp_addr(),
            if args.tcp_closed { "(closed)" } else { "" },
            p.udp_addr()
        );
        match p.http_addr() {
            Some(h) => println!(" http={h}"),
            None => println!(),
        }
    }
    println!(
        "serving {} projector(s); Ctrl-C to stop",
        fleet.projectors().len()
    );
    tokio::signal::ctrl_c().await?;
    fleet.shutdown().await;
    Ok(())
}
