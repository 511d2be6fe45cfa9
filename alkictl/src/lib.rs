//! alkictl: the operators' and CI's command line. Tables for people, `-o json` for scripts.
//!
//! [`cli`] declares the command line, [`run`] hands each command group to the module that runs it, the
//! bundle commands are thin over `alki_bundle`, the rest are gRPC calls to the controller through
//! [`connection`], and [`output`] prints the result.

pub mod admin;
pub mod bench;
pub mod bundle;
pub mod cli;
pub mod completion;
pub mod connection;
pub mod devices;
pub mod diagnostics;
pub mod enroll;
pub mod eval;
pub mod events;
pub mod inspect;
pub mod key;
pub mod labels;
pub mod output;
pub mod quality;
pub mod registry;
pub mod rollout;
pub mod runtime;

pub use cli::{Cli, Command, command, parse_from};

/// Runs one alkictl command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let (connection, output) = (&cli.connection, cli.output);
    match cli.command {
        Command::Bundle(cmd) => bundle::run(connection, output, cmd).await,
        Command::Devices(cmd) => devices::run(connection, output, cmd).await,
        Command::Rollout(cmd) => rollout::run(connection, output, *cmd).await,
        Command::Bench(cmd) => bench::run(connection, output, cmd).await,
        Command::Eval(cmd) => eval::run(connection, output, cmd).await,
        Command::Token(cmd) => admin::run_token(connection, output, cmd).await,
        Command::Audit(cmd) => admin::run_audit(connection, output, cmd).await,
        Command::Events(cmd) => events::run_events(connection, output, cmd).await,
        Command::Webhooks(cmd) => events::run_webhooks(connection, output, cmd).await,
        Command::Enroll(cmd) => enroll::run(connection, output, cmd).await,
        Command::Registry(cmd) => registry::run(connection, output, cmd).await,
        Command::Key(cmd) => key::run(output, cmd),
        Command::Runtime(cmd) => runtime::run(connection, output, cmd).await,
        Command::Completion(args) => completion::print(&args),
    }
}
