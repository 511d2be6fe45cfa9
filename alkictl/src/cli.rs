//! alkictl's command line: the global connection and output options, declared once, and the command
//! groups (each group's subcommands live in the module that runs them).

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::connection::Connection;
use crate::output::Output;
use crate::{admin, bench, bundle, completion, devices, enroll, eval, events, key, registry, rollout, runtime};

/// Where every subcommand's help points for the options shared by all commands.
const SHARED_OPTIONS: &str = "Connection and output options (--controller, --ca-file, --registry, --token, --token-file, \
                              --registry-username, --registry-password-file, -o) apply to every command: see \
                              `alkictl --help`.";

#[derive(Parser)]
#[command(name = "alkictl", version = alki_shared::build::LONG_VERSION, about = "Operate an Alki Fleet: bundles, devices, rollouts.")]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Output format: tables for people, JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table, help_heading = "Connection and output")]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Pack, push, sign, inspect and list bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCmd),
    /// Devices in the fleet.
    #[command(subcommand)]
    Devices(devices::DevicesCmd),
    /// Roll bundles out to devices.
    #[command(subcommand)]
    Rollout(Box<rollout::RolloutCmd>),
    /// Benchmarks, calibration, A/B comparisons and variant recommendations.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Eval suites (push, inspect), quality evaluations on devices (run, list) and a rollout's quality (compare).
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// Access tokens (admin only).
    #[command(subcommand)]
    Token(admin::TokenCmd),
    /// The audit log of state-changing calls (admin only).
    #[command(subcommand)]
    Audit(admin::AuditCmd),
    /// The fleet's event log: rollout and device events, listed or followed live.
    #[command(subcommand)]
    Events(events::EventsCmd),
    /// Webhooks that receive every event as a signed CloudEvent (changes: admin only).
    #[command(subcommand)]
    Webhooks(events::WebhooksCmd),
    /// Device enrollment: bootstrap tokens (admin only).
    #[command(subcommand)]
    Enroll(enroll::EnrollCmd),
    /// The controller's embedded registry (admin only).
    #[command(subcommand)]
    Registry(registry::RegistryCmd),
    /// Signing keys (cosign-compatible).
    #[command(subcommand)]
    Key(key::KeyCmd),
    /// llama.cpp builds that bundles run with (`bundle pack --runtime-build`).
    #[command(subcommand)]
    Runtime(runtime::RuntimeCmd),
    /// Print a shell completion script: `alkictl completion bash > /etc/bash_completion.d/alkictl`.
    Completion(completion::CompletionArgs),
}

/// alkictl's command as parsed and as its help shows it: the global options are documented once, in
/// `alkictl --help`; every subcommand's help lists only its own options and points there.
pub fn command() -> clap::Command {
    let cmd = Cli::command();
    // Each subcommand gets hidden copies of the global options: they parse there as before, and clap
    // propagates a global option only to subcommands that do not have it yet.
    let hidden: Vec<clap::Arg> =
        cmd.get_arguments().filter(|a| a.is_global_set()).map(|a| a.clone().hide(true)).collect();
    cmd.mut_subcommands(|sub| with_hidden_globals(sub, &hidden))
}

fn with_hidden_globals(cmd: clap::Command, hidden: &[clap::Arg]) -> clap::Command {
    cmd.args(hidden.iter().cloned()).after_help(SHARED_OPTIONS).mut_subcommands(|sub| with_hidden_globals(sub, hidden))
}

/// Parses alkictl's arguments (the first is the program name), as `main` does.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::FromArgMatches as _;
    let matches = command().try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help(args: &[&str]) -> String {
        match command().try_get_matches_from(args) {
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => e.render().to_string(),
            Err(e) => panic!("{args:?}: {e}"),
            Ok(_) => panic!("{args:?} printed no help"),
        }
    }

    #[test]
    fn the_connection_options_are_documented_once() {
        let top = help(&["alkictl", "--help"]);
        for flag in ["--controller", "--ca-file", "--registry", "--token-file", "--registry-username", "--output"] {
            assert!(top.contains(flag), "alkictl --help documents {flag}:\n{top}");
        }
        for sub in [&["alkictl", "bundle", "push", "--help"][..], &["alkictl", "rollout", "create", "--help"]] {
            let text = help(sub);
            let documented = |flag: &str| text.lines().any(|l| l.trim_start().starts_with(flag));
            assert!(!documented("--token-file") && !documented("-o, --output"), "{sub:?} repeats them:\n{text}");
            assert!(text.contains("see `alkictl --help`"), "{sub:?} points to them:\n{text}");
        }
    }

    #[test]
    fn global_options_still_parse_after_the_subcommand() {
        let cli = parse_from(["alkictl", "devices", "list", "--token-file", "/t", "-o", "json", "--registry", "r:1"])
            .expect("parses");
        assert_eq!(cli.connection.token_file.as_deref(), Some(std::path::Path::new("/t")));
        assert_eq!((cli.output, cli.connection.registry.as_str()), (Output::Json, "r:1"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
