//! alkictl's errors for people: an unreachable controller and unknown names give one line that says which.

use std::process::{Command, Stdio};

use alki_e2e::harness::{binary, free_port};

fn alkictl(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(binary("alkictl")?).args(args).stdin(Stdio::null()).output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[test]
fn an_unreachable_controller_is_named() -> anyhow::Result<()> {
    let addr = format!("http://127.0.0.1:{}", free_port()?);
    let (ok, stderr) = alkictl(&["--controller", &addr, "--token", "alki_x", "devices", "list"])?;
    assert!(!ok);
    assert!(stderr.contains(&format!("cannot reach the controller at {addr}")), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    Ok(())
}

#[test]
fn a_bad_gguf_is_named_by_pack() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00")?;
    let out = dir.path().join("bundle");
    let (ok, stderr) =
        alkictl(&["bundle", "pack", bad.to_str().unwrap_or_default(), "--out", out.to_str().unwrap_or_default()])?;
    assert!(!ok);
    assert!(stderr.contains("broken.gguf"), "{stderr}");
    assert!(!out.exists(), "a refused pack writes nothing");
    Ok(())
}

#[test]
fn an_empty_key_password_is_refused_unless_no_password_is_asked_for() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let prefix = dir.path().join("ci");
    let generate = |extra: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = Command::new(binary("alkictl")?)
            .args(["key", "generate", "--output-prefix"])
            .arg(&prefix)
            .args(extra)
            .env("ALKI_KEY_PASSWORD", "")
            .env_remove("COSIGN_PASSWORD")
            .stdin(Stdio::null())
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let (ok, stderr) = generate(&[])?;
    assert!(!ok);
    assert!(stderr.contains("password is empty") && stderr.contains("--no-password"), "{stderr}");
    assert!(!prefix.with_extension("key").exists(), "nothing written");
    let (ok, stderr) = generate(&["--no-password"])?;
    assert!(ok, "{stderr}");
    assert!(prefix.with_extension("key").is_file() && prefix.with_extension("pub").is_file());
    Ok(())
}
