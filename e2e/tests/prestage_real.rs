//! End to end with the real binaries and a real llama-server: a rollout created with `--prestage` (and a
//! window that is closed now) has the agent download and verify the candidate without serving it; the
//! controller counts it staged; then the registry's copies of the candidate's weights and signature are
//! corrupted, and the operator's promote activates the candidate anyway, from the device's content store alone
//! (weights or a signature fetched from the registry would have been refused).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alki_e2e::harness::{self, binary, llama_bin_dir, run, wait_for};
use alki_shared::digest::Digest;
use anyhow::Context as _;
use serde_json::Value;

fn make_model(out: &Path, name: &str, seed: u64) -> anyhow::Result<()> {
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(out).args([
        "--name",
        name,
        "--seed",
        &seed.to_string(),
    ]))?;
    Ok(())
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary paths are UTF-8")
}

/// Packs `model` as `acme/tiny:<tag>`, pushes and signs it; returns the bundle digest.
fn publish(
    controller: &harness::Controller,
    key: &harness::SigningKey,
    model: &Path,
    tag: &str,
) -> anyhow::Result<String> {
    let layout = model.with_extension("layout");
    let packed = controller.alkictl_json(&["bundle", "pack", path(model)?, "--out", path(&layout)?, "--tag", tag])?;
    let reference = format!("acme/tiny:{tag}");
    controller.alkictl_json(&["bundle", "push", path(&layout)?, &reference])?;
    controller.sign(&reference, key)?;
    Ok(packed["digest"].as_str().context("no digest from pack")?.to_owned())
}

/// A daily UTC window that is closed now: it opens two hours from now, for half an hour.
fn closed_window() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let hour = (now % 86_400 / 3600 + 2) % 24;
    format!("{hour:02}:00-{hour:02}:30")
}

#[test]
fn a_prestaged_candidate_activates_from_the_device_store_when_the_registry_copy_is_corrupt() -> anyhow::Result<()> {
    let llama_bin = llama_bin_dir()?;
    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let controller = harness::start_controller(dir.path(), &["--trusted-key", path(&key.public_key)?])?;

    let model_a = dir.path().join("tiny-a.gguf");
    make_model(&model_a, "alki-tiny-a", 1)?;
    let model_b = dir.path().join("tiny-b.gguf");
    make_model(&model_b, "alki-tiny-b", 2)?;
    let a = publish(&controller, &key, &model_a, "a")?;
    let b = publish(&controller, &key, &model_b, "b")?;

    let trust_policy = harness::write_trust_policy(dir.path(), &key.public_key)?;
    let (agent, front_port) =
        controller.start_agent(dir.path(), "pi-001", "lab", &llama_bin.join("llama-server"), &trust_policy, "")?;
    let procs = [&controller.proc, &agent];
    let device = || -> anyhow::Result<Option<Value>> {
        let devices = controller.alkictl_json(&["devices", "list"])?;
        Ok(devices.as_array().and_then(|ds| ds.iter().find(|d| d["id"] == "pi-001")).cloned())
    };
    wait_for("the agent to connect", Duration::from_secs(30), &procs, || {
        Ok(device()?.filter(|d| d["connected"] == true))
    })?;

    // A first, the ordinary way.
    let first = controller.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:a", "--selector", "site=lab"])?;
    let first_id = first["id"].as_str().context("rollout id")?.to_owned();
    wait_for("the agent to serve A", Duration::from_secs(180), &procs, || {
        Ok(device()?.filter(|d| d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&a))))
    })?;
    wait_for("the first rollout to complete", Duration::from_secs(60), &procs, || {
        let r = controller.alkictl_json(&["rollout", "get", &first_id])?;
        Ok((r["state"] == "completed").then_some(()))
    })?;

    // B with pre-staging, outside its window: staged on the device, not served.
    let window = closed_window();
    let rollout = controller.alkictl_json(&[
        "rollout",
        "create",
        "--bundle",
        "acme/tiny:b",
        "--selector",
        "site=lab",
        "--prestage",
        "--window",
        &window,
    ])?;
    let id = rollout["id"].as_str().context("rollout id")?.to_owned();
    let status = wait_for("the controller to count B staged", Duration::from_secs(120), &procs, || {
        let s = controller.alkictl_json(&["rollout", "status", &id])?;
        let staged: u64 = s["classes"].as_array().into_iter().flatten().filter_map(|c| c["staged"].as_u64()).sum();
        Ok((staged == 1).then_some(s))
    })?;
    let failed: u64 =
        status["classes"].as_array().into_iter().flatten().filter_map(|c| c["stage_failed"].as_u64()).sum();
    assert_eq!(failed, 0, "{status}");
    let serving = device()?.context("device")?;
    assert!(serving["running"].as_str().is_some_and(|r| r.ends_with(&a)), "still A while staged: {serving}");

    // The registry's copies of B's weights and of its signature manifest go bad: an activation that fetched
    // either (the weights, or the signature to check it) would be refused; only the device's own copies, checked
    // again, can serve now. The device recorded which signature manifest it verified when it staged B.
    let b_digest: Digest = b.parse()?;
    let record = harness::agent_dir(dir.path(), "pi-001").join("data/content/signatures").join(b_digest.hex());
    let signature: Digest = std::fs::read_to_string(&record)
        .with_context(|| format!("the staged signature record {}", record.display()))?
        .trim()
        .parse()?;
    for digest in [Digest::of(&std::fs::read(&model_b)?), signature] {
        let blob = controller.data_dir.join("blobs").join(digest.storage_path());
        let mut bytes = std::fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&blob, &bytes)?;
    }

    controller.alkictl_json(&["rollout", "promote", &id, "--reason", "e2e: activate the staged bundle"])?;
    let active = wait_for("the agent to serve B from its store", Duration::from_secs(180), &procs, || {
        let d = device()?;
        if let Some(d) = &d
            && d["phase"] == "failed"
        {
            anyhow::bail!("the activation failed: {d}");
        }
        Ok(d.filter(|d| d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&b))))
    })?;
    assert_eq!(active["applied_generation"], active["desired_generation"], "{active}");

    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let response = client
        .post(format!("http://127.0.0.1:{front_port}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}))
        .send()?;
    assert_eq!(response.status(), 200);
    Ok(())
}
