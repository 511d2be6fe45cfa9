//! Signing keys (`alkictl key generate`): a cosign-compatible key pair written as an encrypted private key
//! (mode 0600) and a PEM public key, and loading the private key back. The password is the caller's to get.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use alki_shared::signing::SigningKey;
use serde::Serialize;

use crate::error::{IoContext as _, Result, refuse};

#[derive(Debug, Serialize)]
pub struct Generated {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub fingerprint: String,
}

/// Writes `<prefix>.key` (encrypted with `password`, mode 0600) and `<prefix>.pub`. Refuses to overwrite
/// either unless `force`.
pub fn generate(prefix: &Path, password: &[u8], force: bool) -> Result<Generated> {
    let private_key = with_suffix(prefix, "key");
    let public_key = with_suffix(prefix, "pub");
    for path in [&private_key, &public_key] {
        if path.exists() && !force {
            refuse!("{} already exists; choose another --output-prefix or pass --force to replace it", path.display());
        }
    }
    let key = SigningKey::generate()?;
    let encrypted = key.to_encrypted_pem(password)?;
    write_private(&private_key, encrypted.as_bytes())?;
    alki_shared::fsutil::write_atomic(&public_key, key.public_key().to_pem().as_bytes())
        .doing(|| format!("writing {}", public_key.display()))?;
    // The public half is meant to be copied around.
    std::fs::set_permissions(&public_key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .doing(|| format!("making {} readable", public_key.display()))?;
    Ok(Generated { private_key, public_key, fingerprint: key.public_key().fingerprint().to_owned() })
}

/// Reads and decrypts a private key file.
pub fn load(path: &Path, password: &[u8]) -> Result<SigningKey> {
    let text = std::fs::read(path).doing(|| format!("reading key file {}", path.display()))?;
    Ok(SigningKey::from_encrypted_pem(&text, password, &path.display().to_string())?)
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .doing(|| format!("creating a file in {}", dir.display()))?;
    let writing = || format!("writing {}", path.display());
    tmp.write_all(bytes).doing(writing)?;
    tmp.as_file().sync_all().doing(writing)?;
    tmp.persist(path).map_err(|e| e.error).doing(writing)?;
    Ok(())
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
