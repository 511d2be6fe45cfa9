//! Signing end to end with the real binaries: the CI script in deploy/ci packs, pushes and signs a bundle
//! with a key from `alkictl key generate` handed over as a secret in the environment; `alkictl bundle
//! inspect` and `bundle list` show the signatures verify; the controller (`--trusted-key`) accepts the
//! rollout. The agent's side with a real llama-server is in rollout_real_llama.rs.

use std::path::Path;
use std::process::Command;

use alki_e2e::harness::{self, binary, run};
use anyhow::{Context as _, ensure};

#[test]
fn the_ci_script_packs_pushes_and_signs_a_bundle_the_fleet_trusts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let public = key.public_key.to_str().context("utf-8 path")?;
    let controller = harness::start_controller(dir.path(), &["--trusted-key", public])?;
    let model = dir.path().join("tiny.gguf");
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(&model).args(["--name", "alki-tiny"]))?;
    let license = dir.path().join("LICENSE");
    std::fs::write(&license, "Apache License, Version 2.0")?;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ci/release-bundle.sh");
    let token = std::fs::read_to_string(&controller.token_file)?;
    let private_pem = std::fs::read_to_string(&key.private_key)?;
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["acme/tiny", "v1"])
        .arg(&model)
        .env("ALKICTL", binary("alkictl")?)
        .env("ALKI_REGISTRY", &controller.registry)
        .env("ALKI_CONTROLLER", &controller.grpc)
        .env("ALKI_TOKEN", token.trim())
        .env("ALKI_CA_FILE", &controller.ca_file)
        .env("ALKI_SIGNING_KEY", private_pem)
        .env("ALKI_KEY_PASSWORD", &key.password)
        .env("LICENSE_FILE", &license)
        .env_remove("COSIGN_PASSWORD");
    let out = run(&mut cmd)?;
    ensure!(out.contains("verified"), "the script ends with bundle inspect:\n{out}");

    let inspected = controller.alkictl_json(&["bundle", "inspect", "acme/tiny:v1", "--key", public])?;
    ensure!(inspected["verified"] == true, "{inspected}");
    let signatures = inspected["signatures"].as_array().context("signatures")?;
    ensure!(signatures.len() == 2 && signatures.iter().all(|s| s["verified"] == true), "{inspected}");
    let layers = inspected["variants"][0]["layers"].as_array().context("layers")?;
    for title in ["tiny.gguf", "LICENSE", "sbom.spdx.json", "runtime.json"] {
        ensure!(layers.iter().any(|l| l["title"] == title), "{title} in {inspected}");
    }

    let bundles = controller.alkictl_json(&["bundle", "list"])?;
    let listed = bundles.as_array().and_then(|bs| bs.iter().find(|b| b["tags"].to_string().contains("v1")));
    let listed = listed.context("bundle listed")?;
    ensure!(listed["signatures"].as_array().is_some_and(|s| s.iter().any(|s| s["verified"] == true)), "{listed}");

    let rollout =
        controller.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:v1", "--selector", "site=nowhere"])?;
    ensure!(rollout["id"].is_string(), "{rollout}");

    // Without the password the script stops before doing anything, and says which variable to set.
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["acme/tiny", "v2"])
        .arg(&model)
        .env("ALKI_REGISTRY", &controller.registry)
        .env("ALKI_TOKEN", "x")
        .env_remove("ALKI_KEY_PASSWORD")
        .env_remove("COSIGN_PASSWORD");
    let err = format!("{:#}", run(&mut cmd).expect_err("no password"));
    ensure!(err.contains("ALKI_KEY_PASSWORD"), "{err}");
    Ok(())
}
