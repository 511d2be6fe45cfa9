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
    /// Enroll this device: generate its key, send a CSR with a bootstrap token, store the certificate.
    Enroll {
        /// The agent's TOML configuration file.
        #[arg(long, env = "ALKI_AGENT_CONFIG", default_value = "/etc/alki/agent.toml")]
        config: PathBuf,
        /// File holding the bootstrap token (default: controller.bootstrap_token_file from the config).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Benchmark the model this device serves (or a GGUF file) with the fixed prompt set.
    Bench {
        /// The agent's TOML configuration file.
        #[arg(long, env = "ALKI_AGENT_CONFIG", default_value = "/etc/alki/agent.toml")]
        config: PathBuf,
        /// Benchmark this GGUF file in a llama-server of its own instead of the served model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Repetitions of the prompt set (median and spread are over these).
        #[arg(long, default_value_t = alki_agent::bench::DEFAULT_REPETITIONS)]
        repetitions: u32,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print the agent's version.
    Version,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("alki-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Enroll { config, token_file } => {
            tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new("info")).init();
            let config = alki_agent::Config::load(&config)?;
            let token_file = token_file.or_else(|| config.controller.bootstrap_token_file.clone()).context(
                "no bootstrap token: pass --token-file or set controller.bootstrap_token_file in the config",
            )?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let enrolled = runtime.block_on(async {
                let device_id = alki_agent::enroll::device_id(&config)?;
                alki_agent::enroll::enroll_with_file(&config, &device_id, &token_file)
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            let expires =
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(enrolled.expires_unix_ms.max(0) as u64);
            println!(
                "enrolled as {} (certificate valid until {}, renewed automatically)",
                enrolled.device_id,
                unix_seconds(expires)
            );
            Ok(())
        }
        Command::Bench { config, model, repetitions, output } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                .init();
            let config = alki_agent::Config::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let result = runtime.block_on(alki_agent::bench::run_cli(&config, model.as_deref(), repetitions))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&result)?),
                Output::Table => print!("{}", alki_agent::bench::table(&result)),
            }
            anyhow::ensure!(result.error.is_empty(), "the benchmark failed: {}", result.error);
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

fn unix_seconds(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("unix time {secs}")
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
