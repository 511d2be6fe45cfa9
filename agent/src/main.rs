//! The `alki-agent` binary: parses flags, sets up logging, and runs [`alki_agent::run`] until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "alki-agent", about = "Alki Fleet's device agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// The agent's TOML configuration file.
        #[arg(long, env = "ALKI_AGENT_CONFIG", default_value = "/etc/alki/agent.toml")]
        config: PathBuf,
    },
    /// Print the agent's version.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("alki-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let path = config;
            let config = alki_agent::Config::load(&path)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let notifier = alki_agent::systemd::Notifier::from_env();
            runtime.block_on(async {
                let agent = alki_agent::Agent::start(config).await?;
                agent.with_notifier(notifier).with_config_file(path).run(shutdown_signal()).await
            })?;
            Ok(())
        }
    }
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "Cannot listen for Ctrl-C.");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
