//! `alkictl key generate`, and the key password every command that signs asks for: from the environment
//! (ALKI_KEY_PASSWORD, COSIGN_PASSWORD) or a prompt on the terminal.

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;

use alki_shared::signing::PASSWORD_ENV_VARS;
use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::output::{Output, print};

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Write a cosign-compatible key pair: PREFIX.key (encrypted with the password from ALKI_KEY_PASSWORD,
    /// COSIGN_PASSWORD or a prompt) and PREFIX.pub (give it to agents' trust policies and the controller).
    Generate {
        #[arg(long, default_value = "alki")]
        output_prefix: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
        /// Write the private key unprotected by a password (an empty one). Without this flag an empty
        /// password is refused: anyone who copies the file could then sign bundles your fleet trusts.
        #[arg(long)]
        no_password: bool,
    },
}

/// Runs one `alkictl key` command.
pub fn run(output: Output, cmd: KeyCmd) -> anyhow::Result<()> {
    let KeyCmd::Generate { output_prefix, force, no_password } = cmd;
    let password = if no_password { Vec::new() } else { password(true)? };
    if password.is_empty() && !no_password {
        bail!(
            "the key password is empty: set {} to a password (or answer the prompt with one); pass --no-password \
             only if the private key is protected otherwise (a hardware token, a secrets manager)",
            PASSWORD_ENV_VARS[0]
        );
    }
    let made = alki_bundle::keys::generate(&output_prefix, &password, force)?;
    print(output, &made, |m| {
        format!(
            "private key {} (encrypted), public key {}\nfingerprint {}",
            m.private_key.display(),
            m.public_key.display(),
            m.fingerprint
        )
    })
}

/// The key password: the first of [`PASSWORD_ENV_VARS`] that is set (it may be empty), else a prompt on
/// the terminal (twice when `confirm`). Without either, says which variable to set.
pub fn password(confirm: bool) -> anyhow::Result<Vec<u8>> {
    for var in PASSWORD_ENV_VARS {
        if let Some(value) = std::env::var_os(var) {
            return Ok(value.into_encoded_bytes());
        }
    }
    let first = prompt("Key password: ")?;
    if confirm && prompt("Repeat the password: ")? != first {
        bail!("the passwords differ; run the command again");
    }
    Ok(first.into_bytes())
}

/// Reads a line from the terminal with echo off (`stty`), so the password never shows.
fn prompt(text: &str) -> anyhow::Result<String> {
    let tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty").map_err(|_| {
        anyhow::anyhow!(
            "no terminal to ask for the key password; set {} (or {}) in the environment",
            PASSWORD_ENV_VARS[0],
            PASSWORD_ENV_VARS[1]
        )
    })?;
    let stty = |arg: &str| {
        tty.try_clone().ok().and_then(|t| std::process::Command::new("stty").arg(arg).stdin(t).status().ok())
    };
    let mut out = tty.try_clone()?;
    write!(out, "{text}")?;
    out.flush()?;
    stty("-echo");
    let mut line = String::new();
    let read = std::io::BufReader::new(tty.try_clone()?).read_line(&mut line);
    stty("echo");
    writeln!(out)?;
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
