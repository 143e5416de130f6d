//! The command line: argument errors name the flag at fault, `collect --once` prints what it
//! read (text or epmc-proto envelopes), `discover` sweeps, `check` validates; exit codes.
//! Most tests run the CLI in-process; one runs the built binary to check the wiring.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use epmc_agent::cli::{Cli, run};
use epmc_proto::model::PowerState;
use epmc_proto::{Envelope, Kind, Message};
use escvp::emulator::{ClosedPort, Fleet, ProjectorConfig, ProjectorHandle};

const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the test did not finish within its bound")
}

fn parse_error(args: &[&str]) -> clap::Error {
    let mut argv = vec!["epmc-agent"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).expect_err("must be refused")
}

/// Runs the CLI in-process: (exit code, stdout, stderr).
async fn run_cli(args: &[&str]) -> (u8, String, String) {
    let mut argv = vec!["epmc-agent"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("valid command line");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = bounded(run(cli, &mut out, &mut err)).await;
    (
        code,
        String::from_utf8(out).expect("utf-8"),
        String::from_utf8(err).expect("utf-8"),
    )
}

async fn emulators(n: usize) -> (Fleet, Vec<ProjectorHandle>) {
    let template = ProjectorConfig {
        serial: "CLI0000000".into(),
        model: "EB-CLI".into(),
        lamp_hours: vec![321],
        hours_per_second: 0.0,
        start_on: true,
        ..ProjectorConfig::default()
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let fleet = Fleet::spawn_consecutive(addr, n, template)
        .await
        .expect("emulators start");
    let handles = fleet.projectors().to_vec();
    (fleet, handles)
}

/// Refuses connections, and stays ours until dropped.
fn closed_port() -> ClosedPort {
    ClosedPort::on(Ipv4Addr::LOCALHOST.into()).expect("reserve a port")
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("epmc-agent-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn argument_errors_name_the_flag() {
    let e = parse_error(&["collect", "--target", "127.0.0.1"]);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("--once"), "{e}");

    let e = parse_error(&["collect", "--once", "--target", "projector.local"]);
    let text = e.to_string();
    assert!(text.contains("--target"), "{text}");
    assert!(text.contains("not an IP address"), "{text}");

    let e = parse_error(&["collect", "--once", "--target", "10.0.0.0/24"]);
    assert!(e.to_string().contains("use discover"), "{e}");

    let e = parse_error(&[
        "collect",
        "--once",
        "--target",
        "127.0.0.1",
        "--password",
        "seventeen-chars!!",
    ]);
    let text = e.to_string();
    assert!(text.contains("--password"), "{text}");
    assert!(text.contains("at most 16"), "{text}");

    let e = parse_error(&["discover", "--range", "10.0.0.0/8"]);
    let text = e.to_string();
    assert!(text.contains("--range"), "{text}");
    assert!(text.contains("at most 65536"), "{text}");

    let e = parse_error(&["discover", "--range", "10.0.0.1", "--concurrency", "0"]);
    assert!(e.to_string().contains("--concurrency"), "{e}");

    let e = parse_error(&["discover"]);
    assert!(e.to_string().contains("--range"), "{e}");
    let e = parse_error(&["discover", "--range", "10.0.0.1", "--config", "a.toml"]);
    assert!(e.to_string().contains("--config"), "{e}");

    let e = parse_error(&["check"]);
    assert!(e.to_string().contains("--config"), "{e}");
}

#[tokio::test]
async fn collect_once_prints_text() {
    let (_fleet, p) = emulators(1).await;
    let target = p[0].tcp_addr().to_string();
    let (code, out, err) = run_cli(&[
        "collect",
        "--once",
        "--target",
        &target,
        "--command-timeout-ms",
        "500",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("{target}  CLI0000001\n")), "{out}");
    for line in [
        "  model            EB-CLI\n",
        "  firmware         -\n",
        "  power            on (01)\n",
        "  warnings         none\n",
        "  source           HDMI1 (30)\n",
        "  inputs           HDMI1 (30), HDMI2 (A0), Computer1 (10), LAN (53)\n",
        "  light hours      321\n",
        "  volume           120\n",
        "  not supported    VER NWPNAME\n",
    ] {
        assert!(out.contains(line), "{line:?} missing from\n{out}");
    }
}

#[tokio::test]
async fn collect_once_json_prints_envelopes_and_fails_for_a_dead_target() {
    let (_fleet, p) = emulators(2).await;
    let closed = closed_port();
    let dead = closed.addr().to_string();
    let a = p[0].tcp_addr().to_string();
    let b = p[1].tcp_addr().to_string();
    let (code, out, err) = run_cli(&[
        "collect", "--once", "--json", "--target", &a, "--target", &dead, "--target", &b,
    ])
    .await;
    assert_eq!(code, 1, "a dead target makes the run fail");
    assert_eq!(err.trim(), format!("{dead}: connection refused (refused)"));
    let envelopes: Vec<Envelope> = out
        .lines()
        .map(|l| Envelope::from_json(l.as_bytes()).expect("an epmc-proto envelope"))
        .collect();
    let kinds: Vec<Kind> = envelopes.iter().map(Envelope::kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::Snapshot,
            Kind::Collection,
            Kind::Snapshot,
            Kind::Collection
        ]
    );
    let serials: Vec<String> = envelopes
        .iter()
        .map(|e| match &e.message {
            Message::Snapshot(s) => s.device_id.to_string(),
            Message::Collection(c) => {
                assert_eq!(c.status.power, Some(PowerState::On));
                assert_eq!(
                    c.status
                        .light_up_time_hours
                        .as_ref()
                        .map(|h| h.as_slice().to_vec()),
                    Some(vec![321])
                );
                c.device_id.to_string()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        serials,
        ["CLI0000001", "CLI0000001", "CLI0000002", "CLI0000002"]
    );
}

#[tokio::test]
async fn discover_reports_the_projectors_and_fails_when_none_answer() {
    let (_fleet, p) = emulators(2).await;
    let closed = closed_port();
    let dead = closed.addr().to_string();
    let a = p[0].tcp_addr().to_string();
    let b = p[1].tcp_addr().to_string();
    let (code, out, _) = run_cli(&["discover", "--range", &a, &dead, &b, "--all"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{a}  projector  CLI0000001"),
            format!("{dead}  absent     refused (connection refused)"),
            format!("{b}  projector  CLI0000002"),
            "2 of 3 addresses answered ESC/VP.net".to_owned(),
        ]
    );
    let (code, out, _) = run_cli(&["discover", "--range", &dead]).await;
    assert_eq!(code, 1);
    assert_eq!(out, "0 of 1 addresses answered ESC/VP.net\n");
}

#[tokio::test]
async fn check_validates_a_file() {
    let good = temp_file(
        "good.toml",
        "mode = \"monitor-only\"\n[server]\nurl = \"mqtts://s.example\"\nca_cert = \"ca.pem\"\nclient_cert = \"a.pem\"\nclient_key = \"a.key\"\n[[target]]\naddress = \"10.0.0.0/30\"\nsession = \"hold\"\n",
    );
    let (code, out, err) = run_cli(&["check", "--config", good.to_str().expect("path")]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(": ok: 1 target(s) (1 held), 2 address(es); monitor-only;"),
        "{out}"
    );
    // Relative certificate paths are beside the file; they do not exist yet.
    let dir = good.parent().expect("dir");
    assert!(
        out.contains(&format!(
            "note: client_key {} does not exist (yet)",
            dir.join("a.key").display()
        )),
        "{out}"
    );
    let bad = temp_file(
        "bad.toml",
        "[server]\nurl = \"mqtts://s.example\"\nca_cert = \"ca.pem\"\nclient_cert = \"a.pem\"\nclient_key = \"a.key\"\n[[target]]\naddress = \"10.0.0.0/30\"\nsesion = \"hold\"\n",
    );
    let (code, out, err) = run_cli(&["check", "--config", bad.to_str().expect("path")]).await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(
        err.starts_with(&format!("{}:8: unknown field `sesion`", bad.display())),
        "{err}"
    );
}

#[test]
fn the_binary_exits_non_zero_on_failure() {
    let exe = env!("CARGO_BIN_EXE_epmc-agent");
    let bad = temp_file(
        "bin-bad.toml",
        "concurrency = 0\n[server]\nurl = \"mqtts://s.example\"\nca_cert = \"c\"\nclient_cert = \"a\"\nclient_key = \"k\"\n",
    );
    let out = Command::new(exe)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":1: concurrency = 0 is out of range"),
        "{stderr}"
    );

    let out = Command::new(exe)
        .args(["collect", "--once", "--target", "300.1.1.1"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--target"), "{stderr}");

    let closed = closed_port();
    let dead = closed.addr().to_string();
    let out = Command::new(exe)
        .args(["collect", "--once", "--target", &dead])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    // stderr is a pipe, not a terminal: exactly the error, no progress line.
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("{dead}: connection refused (refused)\n")
    );

    // Nor colour codes in its log lines (a journal or a log file would keep them).
    let out = Command::new(exe)
        .args(["collect", "--once", "--target", &dead])
        .env("RUST_LOG", "debug")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ESC/VP.net unavailable"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );
}

#[tokio::test]
async fn discover_sweeps_the_configured_targets_with_their_passwords() {
    let template = ProjectorConfig {
        serial: "CFG0000000".into(),
        password: Some(escvp::net::Password::new("pw1").expect("password")),
        ..ProjectorConfig::default()
    };
    let fleet = Fleet::spawn_consecutive("127.0.0.1:0".parse().expect("address"), 2, template)
        .await
        .expect("emulators start");
    let p = fleet.projectors();
    let (a, b) = (p[0].tcp_addr(), p[1].tcp_addr());
    let config = temp_file(
        "discover.toml",
        &format!(
            "[server]\nurl = \"mqtts://s.example\"\nca_cert = \"c\"\nclient_cert = \"a\"\nclient_key = \"k\"\n\
             [[target]]\naddress = \"{a}\"\npassword = \"pw1\"\n\
             [[target]]\naddress = \"{b}\"\n"
        ),
    );
    let (code, out, err) = run_cli(&["discover", "--config", config.to_str().expect("path")]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("{a}  projector  CFG0000001"),
            format!(
                "{b}  locked     password_required (password required (ESC/VP.net status 0x41))"
            ),
            "2 of 2 addresses answered ESC/VP.net".to_owned(),
        ]
    );
    let bad = temp_file("discover-bad.toml", "concurrency = 1\n");
    let (code, _, err) = run_cli(&["discover", "--config", bad.to_str().expect("path")]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("--config: "), "{err}");
}

/// Runs the CLI in-process with or without the progress line: (exit code, stdout, stderr).
async fn run_cli_progress(args: &[&str], progress: bool) -> (u8, String, String) {
    let mut argv = vec!["epmc-agent"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("valid command line");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = bounded(epmc_agent::cli::run_with_progress(
        cli, &mut out, &mut err, progress,
    ))
    .await;
    (
        code,
        String::from_utf8(out).expect("utf-8"),
        String::from_utf8(err).expect("utf-8"),
    )
}

/// The progress text: `\r`-led lines, no new line, ending with the line blanked.
fn assert_progress_only(progress: &str, first: &str) {
    assert!(progress.starts_with(&format!("\r{first}")), "{progress:?}");
    assert!(!progress.contains('\n'), "{progress:?}");
    let last = progress.trim_end_matches('\r').rsplit('\r').next().unwrap();
    assert!(
        !last.is_empty() && last.chars().all(|c| c == ' '),
        "cleared at the end: {progress:?}"
    );
    assert!(progress.ends_with('\r'), "{progress:?}");
}

#[tokio::test]
async fn progress_goes_to_stderr_only_when_asked_and_changes_no_output() {
    let (_fleet, p) = emulators(2).await;
    let closed = closed_port();
    let dead = closed.addr().to_string();
    let a = p[0].tcp_addr().to_string();
    let b = p[1].tcp_addr().to_string();

    // discover: the same stdout; stderr has only the progress line, cleared.
    let args = ["discover", "--range", &a, &dead, &b, "--all"];
    let (code, out, err) = run_cli_progress(&args, false).await;
    assert_eq!((code, err.as_str()), (0, ""), "no progress when not asked");
    let (code_p, out_p, err_p) = run_cli_progress(&args, true).await;
    assert_eq!((code_p, &out_p), (code, &out));
    assert_progress_only(&err_p, "swept 0/3 addresses, 0 projectors found");

    // collect --once --json: the same envelopes and error line; the progress is cleared
    // before the error line is written.
    let args = [
        "collect", "--once", "--json", "--target", &a, "--target", &dead, "--target", &b,
    ];
    let (code, out, err) = run_cli_progress(&args, false).await;
    assert_eq!(err, format!("{dead}: connection refused (refused)\n"));
    let (code_p, out_p, err_p) = run_cli_progress(&args, true).await;
    assert_eq!(code_p, code);
    assert_eq!(out_p.lines().count(), out.lines().count());
    assert_eq!(out_p.lines().count(), 4, "two envelopes per projector read");
    let (progress, rest) = err_p.split_at(err_p.rfind('\r').unwrap() + 1);
    assert_eq!(rest, err, "after the progress, the same stderr");
    assert_progress_only(progress, "read 0/3 projectors, 0 failed");
}
