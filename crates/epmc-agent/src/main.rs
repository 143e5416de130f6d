//! `epmc-agent`: wiring only (logging, command line); the work is in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use epmc_agent::cli::{Cli, run_with_progress};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not into a pipe, a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    // Not `stderr().lock()`: the log writes to stderr from the runtime's threads, and a lock
    // held here for the whole of a long `run` would block them forever.
    // Progress lines only where a person watches: never into a pipe, a file or a log.
    let progress = std::io::stderr().is_terminal();
    let code = run_with_progress(
        cli,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        progress,
    )
    .await;
    ExitCode::from(code)
}
