//! `alkictl key generate`: a cosign-compatible key pair (encrypted private key, PEM public key), and the
//! key password from the environment or a prompt.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use alki_shared::signing::{PASSWORD_ENV_VARS, SigningKey};
use anyhow::{Context as _, bail};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Generated {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub fingerprint: String,
}

/// Writes `<prefix>.key` (encrypted with `password`, mode 0600) and `<prefix>.pub`. Refuses to overwrite
/// either unless `force`.
pub fn generate(prefix: &Path, password: &[u8], force: bool) -> anyhow::Result<Generated> {
    let private_key = with_suffix(prefix, "key");
    let public_key = with_suffix(prefix, "pub");
    for path in [&private_key, &public_key] {
        if path.exists() && !force {
            bail!("{} already exists; choose another --output-prefix or pass --force to replace it", path.display());
        }
    }
    let key = SigningKey::generate()?;
    let encrypted = key.to_encrypted_pem(password)?;
    write_private(&private_key, encrypted.as_bytes())?;
    alki_shared::fsutil::write_atomic(&public_key, key.public_key().to_pem().as_bytes())
        .with_context(|| format!("writing {}", public_key.display()))?;
    // The public half is meant to be copied around.
    std::fs::set_permissions(&public_key, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    Ok(Generated { private_key, public_key, fingerprint: key.public_key().fingerprint().to_owned() })
}

/// Reads and decrypts a private key file.
pub fn load(path: &Path, password: &[u8]) -> anyhow::Result<SigningKey> {
    let text = std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?;
    Ok(SigningKey::from_encrypted_pem(&text, password, &path.display().to_string())?)
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_back_and_are_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = dir.path().join("release");
        let made = generate(&prefix, b"pw", false).expect("generate");
        assert_eq!(made.private_key, dir.path().join("release.key"));
        let key = load(&made.private_key, b"pw").expect("load");
        assert_eq!(key.public_key().fingerprint(), made.fingerprint);
        let public = alki_shared::signing::PublicKey::load(&made.public_key).expect("public key");
        assert_eq!(public.fingerprint(), made.fingerprint);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&made.private_key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the private key is readable by its owner only");
        let again = generate(&prefix, b"pw", false).expect_err("exists");
        assert!(again.to_string().contains("--force"), "{again}");
        assert!(load(&made.private_key, b"wrong").is_err());
    }
}
