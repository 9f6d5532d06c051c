//! ipamd: parse the configuration, turn SIGTERM/SIGINT into a stop, and
//! hand over to [`ipamd::daemon::run`].

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use ipamd::config::{Cli, Config};
use ipamd::daemon::{self, Host};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamd: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(tracing_subscriber::EnvFilter::new(config.log_filter()))
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipamd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Installed first: a stop signal during start-up is then handled as a
    // graceful stop right after the server comes up, not a kill.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            _ = sigint.recv() => info!("SIGINT: stopping"),
        }
    };
    let host = Host::open()?;
    daemon::run(config, host, stop).await?;
    Ok(())
}
