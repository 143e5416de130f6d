//! `epmc-server`: the operator's commands. Wiring only; the logic is in [`epmc_server::cli`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use epmc_server::ca;
use epmc_server::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` logs what it does; a one-shot command prints its answer and logs only warnings
    // (RUST_LOG overrides both).
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not into a pipe, a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    ca::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("epmc-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `epmc-server devices | head`: the reader has what it wanted.
        Err(e) if e == cli::STDOUT_CLOSED => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("epmc-server: {e}");
            ExitCode::FAILURE
        }
    }
}
