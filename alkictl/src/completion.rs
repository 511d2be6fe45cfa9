//! `alkictl completion bash|zsh|fish`: the shell completion script, generated from the command line itself
//! (every command, flag and value choice, the connection options included).

use clap::{Args, CommandFactory as _, ValueEnum};
use clap_complete::Shell;

/// Shells alkictl completes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args)]
pub struct CompletionArgs {
    /// bash: `alkictl completion bash > /etc/bash_completion.d/alkictl`; zsh: into a directory on `$fpath`
    /// as `_alkictl`; fish: `~/.config/fish/completions/alkictl.fish`.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Prints the script for `args.shell` on stdout.
pub fn print(args: &CompletionArgs) -> anyhow::Result<()> {
    std::io::Write::write_all(&mut std::io::stdout(), &script(args.shell))?;
    Ok(())
}

/// The completion script for `shell`.
pub fn script(shell: CompletionShell) -> Vec<u8> {
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    // The command as declared, not as `cli::command` shows its help: completions offer the connection
    // options after every subcommand too, where they parse.
    let mut cmd = crate::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "alkictl", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_that_completes_commands_and_connection_options() {
        for shell in [CompletionShell::Bash, CompletionShell::Zsh, CompletionShell::Fish] {
            let text = String::from_utf8(script(shell)).expect("utf-8");
            for word in ["bundle", "rollout", "inspect", "token-file", "completion"] {
                assert!(text.contains(word), "{shell:?} script lacks {word}");
            }
        }
        let fish = String::from_utf8(script(CompletionShell::Fish)).expect("utf-8");
        assert!(fish.contains("__fish_seen_subcommand_from push"), "fish completes subcommands' flags");
    }
}
