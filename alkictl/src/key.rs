//! `alkictl key generate`, `key sign-blob` and `key verify-blob` (cosign's key-based blob signatures), and
//! the key password every command that signs asks for: from the environment (ALKI_KEY_PASSWORD,
//! COSIGN_PASSWORD) or a prompt on the terminal.

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};

use alki_shared::digest::Digest;
use alki_shared::signing::{PASSWORD_ENV_VARS, PublicKey, short_fingerprint};
use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::Serialize;

use crate::output::{Output, bytes, print};

/// Largest file `sign-blob` and `verify-blob` read. The signing library signs the payload's bytes (it hashes
/// them itself and takes no prehash), so the file is held in memory: this is for checksum files, manifests
/// and release notes, not for the artifacts they list.
pub const MAX_BLOB_BYTES: u64 = 64 << 20;

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
    /// Sign a file as `cosign sign-blob --key` does: the base64 ECDSA P-256 signature over the SHA-256 of its
    /// bytes, printed or written to --output-signature. `cosign verify-blob --key KEY.pub --signature
    /// FILE.sig FILE` accepts it (cosign 2 wants --insecure-ignore-tlog too: no transparency log is used).
    /// Files up to 64 MiB: sign a checksum file (`sha256sum ARTIFACTS > SHA256SUMS`) rather than the
    /// artifacts. The key password comes from ALKI_KEY_PASSWORD, COSIGN_PASSWORD or a prompt.
    SignBlob {
        /// The file to sign.
        file: PathBuf,
        /// Encrypted private key (from `alkictl key generate` or `cosign generate-key-pair`).
        #[arg(long)]
        key: PathBuf,
        /// Write the base64 signature to this file (as cosign does) instead of printing it.
        #[arg(long, value_name = "FILE")]
        output_signature: Option<PathBuf>,
    },
    /// Check a file's signature made by `alkictl key sign-blob` or `cosign sign-blob --key`; exits non-zero
    /// when it does not verify.
    VerifyBlob {
        /// The signed file.
        file: PathBuf,
        /// PEM public key (the .pub from `alkictl key generate` or `cosign generate-key-pair`).
        #[arg(long)]
        key: PathBuf,
        /// The signature file (base64, as sign-blob writes it).
        #[arg(long, value_name = "FILE")]
        signature: PathBuf,
    },
}

/// Runs one `alkictl key` command.
pub fn run(output: Output, cmd: KeyCmd) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::Generate { output_prefix, force, no_password } => generate(output, &output_prefix, force, no_password),
        KeyCmd::SignBlob { file, key, output_signature } => sign_blob(output, &file, &key, output_signature),
        KeyCmd::VerifyBlob { file, key, signature } => verify_blob(output, &file, &key, &signature),
    }
}

fn generate(output: Output, output_prefix: &Path, force: bool, no_password: bool) -> anyhow::Result<()> {
    let password = if no_password { Vec::new() } else { password(true)? };
    if password.is_empty() && !no_password {
        bail!(
            "the key password is empty: set {} to a password (or answer the prompt with one); pass --no-password \
             only if the private key is protected otherwise (a hardware token, a secrets manager)",
            PASSWORD_ENV_VARS[0]
        );
    }
    let made = alki_bundle::keys::generate(output_prefix, &password, force)?;
    print(output, &made, |m| {
        format!(
            "private key {} (encrypted), public key {}\nfingerprint {}",
            m.private_key.display(),
            m.public_key.display(),
            m.fingerprint
        )
    })
}

/// What `key sign-blob` did.
#[derive(Debug, Serialize)]
pub struct SignedBlob {
    pub file: PathBuf,
    /// `sha256:<hex>` of the file's bytes (what the signature covers).
    pub sha256: Digest,
    pub size: u64,
    /// The base64 DER ECDSA signature (the signature file's contents).
    pub signature: String,
    /// Where it was written, with --output-signature.
    pub signature_file: Option<PathBuf>,
    pub key_fingerprint: String,
}

/// What `key verify-blob` found (printed only when the signature verifies).
#[derive(Debug, Serialize)]
pub struct VerifiedBlob {
    pub file: PathBuf,
    pub sha256: Digest,
    pub size: u64,
    pub signature_file: PathBuf,
    pub key_fingerprint: String,
    pub verified: bool,
}

fn sign_blob(output: Output, file: &Path, key_file: &Path, output_signature: Option<PathBuf>) -> anyhow::Result<()> {
    refuse_public_key(key_file)?;
    // The file is read before the password is asked for, so a wrong path fails without a prompt.
    let blob = read_blob(file)?;
    let password = password(false)?;
    let key = alki_bundle::keys::load(key_file, &password)?;
    let signature = key.sign(&blob).with_context(|| format!("signing {}", file.display()))?;
    if let Some(path) = &output_signature {
        alki_shared::fsutil::write_atomic(path, signature.as_bytes())
            .with_context(|| format!("writing the signature to {}", path.display()))?;
        // A signature is published beside the file it signs.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .with_context(|| format!("making {} readable", path.display()))?;
    }
    let signed = SignedBlob {
        file: file.to_owned(),
        sha256: Digest::of(&blob),
        size: blob.len() as u64,
        signature,
        signature_file: output_signature,
        key_fingerprint: key.public_key().fingerprint().to_owned(),
    };
    print(output, &signed, |s| match &s.signature_file {
        // Like cosign: without a signature file the signature alone goes to stdout, for scripts.
        None => s.signature.clone(),
        Some(sig) => format!(
            "signed {} ({}, {}) with key {}\nsignature {}",
            s.file.display(),
            s.sha256,
            bytes(s.size),
            short_fingerprint(&s.key_fingerprint),
            sig.display()
        ),
    })
}

fn verify_blob(output: Output, file: &Path, key_file: &Path, signature_file: &Path) -> anyhow::Result<()> {
    let key = load_public_key(key_file)?;
    let signature = read_signature(signature_file)?;
    let blob = read_blob(file)?;
    let sha256 = Digest::of(&blob);
    if !key.verifies(&blob, &signature) {
        bail!(
            "the signature {sig} does not verify {file} ({sha256}) with key {key_path} ({fingerprint}): the file \
             changed after it was signed, the signature belongs to another file, or it was made with another key; \
             fetch the file and its .sig again, or verify with the public key of the key that signed it",
            sig = signature_file.display(),
            file = file.display(),
            key_path = key_file.display(),
            fingerprint = short_fingerprint(key.fingerprint()),
        );
    }
    let verified = VerifiedBlob {
        file: file.to_owned(),
        sha256,
        size: blob.len() as u64,
        signature_file: signature_file.to_owned(),
        key_fingerprint: key.fingerprint().to_owned(),
        verified: true,
    };
    print(output, &verified, |v| {
        format!(
            "Verified OK: {} ({}) signed by key {}",
            v.file.display(),
            v.sha256,
            short_fingerprint(&v.key_fingerprint)
        )
    })
}

/// The whole file, refused unread beyond [`MAX_BLOB_BYTES`].
fn read_blob(file: &Path) -> anyhow::Result<Vec<u8>> {
    let opened = std::fs::File::open(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}; check the path", file.display()))?;
    let size = opened.metadata().with_context(|| format!("reading {}", file.display()))?.len();
    if size > MAX_BLOB_BYTES {
        bail!(
            "{} is {}, more than the {} sign-blob and verify-blob read; sign a checksum file instead \
             (`sha256sum FILES > SHA256SUMS`, then sign SHA256SUMS)",
            file.display(),
            bytes(size),
            bytes(MAX_BLOB_BYTES)
        );
    }
    let mut blob = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // `take` holds the cap for files whose size the metadata does not tell (a pipe, a growing file).
    opened.take(MAX_BLOB_BYTES + 1).read_to_end(&mut blob).with_context(|| format!("reading {}", file.display()))?;
    if blob.len() as u64 > MAX_BLOB_BYTES {
        bail!("{} grew past {} while it was read; sign a checksum file instead", file.display(), bytes(MAX_BLOB_BYTES));
    }
    Ok(blob)
}

/// The base64 signature in a signature file, trimmed (cosign writes none, `echo` adds a newline).
fn read_signature(path: &Path) -> anyhow::Result<String> {
    let mut text = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(64 << 10).read_to_end(&mut text)).map_err(|e| {
        anyhow::anyhow!("cannot read the signature file {}: {e}; pass the .sig that sign-blob wrote", path.display())
    })?;
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    if text.is_empty() || text.len() > 1024 || !text.chars().all(base64) {
        bail!(
            "{} is not a base64 signature (what `alkictl key sign-blob --output-signature` and `cosign sign-blob \
             --output-signature` write); pass the .sig file made for this file",
            path.display()
        );
    }
    Ok(text)
}

/// A public key file, with the fix named when it is the private half.
fn load_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    PublicKey::load(path).map_err(|e| {
        if is_private_key(path) {
            anyhow::anyhow!(
                "{} is a private key; verify with its public half (the .pub beside it from `alkictl key generate`)",
                path.display()
            )
        } else {
            e.into()
        }
    })
}

/// Refuses a public key given where the private key belongs (before a password prompt that would be useless).
fn refuse_public_key(path: &Path) -> anyhow::Result<()> {
    if let Ok(key) = PublicKey::load(path) {
        bail!(
            "{} is a public key ({}); sign with the private key (the .key file from `alkictl key generate`)",
            path.display(),
            short_fingerprint(key.fingerprint())
        );
    }
    Ok(())
}

fn is_private_key(path: &Path) -> bool {
    let mut head = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(64 << 10).read_to_end(&mut head)).is_ok()
        && String::from_utf8_lossy(&head).contains("PRIVATE KEY-----")
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
