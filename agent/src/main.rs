//! The `alki-agent` binary: parses flags, sets up logging, and runs the agent until SIGTERM or Ctrl-C (a stop:
//! llama-server is stopped) or SIGUSR2 (a hand-over: llama-server keeps running, the agent exits with
//! [`EXIT_HANDED_OVER`] and the next agent, started by systemd, adopts it). The front port comes from systemd
//! socket activation when the unit passes one (`alki-agent.socket`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Exit status after a hand-over (EX_TEMPFAIL): the unit restarts the agent (`RestartForceExitStatus=75`).
const EXIT_HANDED_OVER: i32 = 75;

#[derive(Parser)]
#[command(name = "alki-agent", about = "Alki Fleet's device agent", version = alki_shared::build::LONG_VERSION)]
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
    /// Evaluate a GGUF file's quality with an eval suite directory (perplexity, KL divergence and top-1
    /// agreement against a baseline, golden prompts), on the configured llama.cpp build.
    Eval {
        /// The agent's TOML configuration file (llama-server's path, priority, threads, memory reserve).
        #[arg(long, env = "ALKI_AGENT_CONFIG", default_value = "/etc/alki/agent.toml")]
        config: PathBuf,
        /// The suite directory: suite.toml and the corpus and prompts files it names.
        #[arg(long)]
        suite: PathBuf,
        /// The candidate GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// A baseline GGUF file to compare with (KL divergence, top-1 agreement, perplexity ratio).
        #[arg(long)]
        baseline: Option<PathBuf>,
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
    // Before any thread starts: take the socket systemd passed (if any) and clear the variables, so that
    // nothing started later (llama-server) takes them for its own.
    let front = alki_agent::systemd::front_listener_from_env();
    for name in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        // SAFETY: no other thread runs yet, so nothing reads the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("alki-agent {}", alki_shared::build::LONG_VERSION);
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
            let (config, runtime) = one_shot(&config)?;
            let result = runtime.block_on(alki_agent::bench::run_cli(&config, model.as_deref(), repetitions))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&result)?),
                Output::Table => print!("{}", alki_agent::bench::table(&result)),
            }
            anyhow::ensure!(result.error.is_empty(), "the benchmark failed: {}", result.error);
            Ok(())
        }
        Command::Eval { config, suite, model, baseline, output } => {
            let (config, runtime) = one_shot(&config)?;
            eprintln!("Evaluating {} with the suite in {} ...", model.display(), suite.display());
            let result = runtime.block_on(alki_agent::eval::run_cli(&config, &suite, &model, baseline.as_deref()))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&result)?),
                Output::Table => print!("{}", alki_agent::eval::table(&result)),
            }
            if let alki_shared::eval::quality::Outcome::CouldNotRun(why) = &result.outcome {
                anyhow::bail!("the evaluation could not run: {why}");
            }
            Ok(())
        }
        Command::Run { config } => {
            let path = config;
            let config = alki_agent::Config::load(&path)?;
            init_run_logging(&config);
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let notifier = alki_agent::systemd::Notifier::from_env();
            let front = front.context("the socket passed by systemd (LISTEN_FDS) is not a listening TCP socket")?;
            let exit = runtime.block_on(async {
                let agent = alki_agent::Agent::start_with_front(config, front).await?;
                let exit = std::sync::Arc::new(std::sync::Mutex::new(alki_agent::Exit::Stop));
                let seen = exit.clone();
                let signal = async move {
                    let how = shutdown_signal().await;
                    *seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = how;
                    how
                };
                agent.with_notifier(notifier).with_config_file(path).run_until(signal).await?;
                let how = *exit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok::<_, alki_agent::AgentError>(how)
            })?;
            // The runtime is dropped first so every task has finished before the exit.
            drop(runtime);
            if exit == alki_agent::Exit::HandOver {
                std::process::exit(EXIT_HANDED_OVER);
            }
            Ok(())
        }
    }
}

/// The running agent's log: stderr (the journal under systemd) and, when not under journald, a capped copy
/// in `<data_dir>/logs/agent.log` that remote diagnostics read (`[diagnostics] agent_log_file_mib`).
fn init_run_logging(config: &alki_agent::Config) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let cap = config.diagnostics.agent_log_file_mib << 20;
    let file = if cap > 0 && !alki_agent::logfile::under_journald() {
        match alki_agent::logfile::CappedLog::open(&config.data_dir.join("logs"), cap) {
            Ok(file) => Some(file),
            Err(e) => {
                eprintln!("alki-agent: cannot open its log file under {}: {e}", config.data_dir.display());
                None
            }
        }
    } else {
        None
    };
    let file_layer = file.map(|f| tracing_subscriber::fmt::layer().with_ansi(false).with_writer(f));
    tracing_subscriber::registry().with(filter).with(tracing_subscriber::fmt::layer()).with(file_layer).init();
}

/// What a one-shot command (`bench`, `eval`) needs: warnings on stderr (stdout is the result), the config,
/// an async runtime.
fn one_shot(config: &std::path::Path) -> anyhow::Result<(alki_agent::Config, tokio::runtime::Runtime)> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .init();
    let config = alki_agent::Config::load(config)?;
    Ok((config, tokio::runtime::Runtime::new().context("starting the async runtime")?))
}

fn unix_seconds(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("unix time {secs}")
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C) with a stop, on SIGUSR2 with a hand-over.
async fn shutdown_signal() -> alki_agent::Exit {
    let hand_over = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot listen for SIGUSR2; hand-over restarts are not available.");
                std::future::pending::<()>().await;
            }
        }
    };
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
        _ = ctrl_c => alki_agent::Exit::Stop,
        _ = term => alki_agent::Exit::Stop,
        _ = hand_over => alki_agent::Exit::HandOver,
    }
}
