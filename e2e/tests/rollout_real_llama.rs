//! End to end with the real binaries and a real llama-server: pack and push a bundle with alkictl, roll it
//! out through the controller, wait for the agent to report it active, and get a completion through the
//! agent's front port. Secure by default throughout: the controller serves TLS with its own CA, the agent
//! enrolls with a bootstrap token, keeps an mTLS session and pulls over HTTPS with its registry token; every
//! bundle is signed with a key from `alkictl key generate`, which the controller (`--trusted-key`) and the
//! agent's trust policy trust, and a bundle signed by another key is refused by both.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alki_e2e::harness::{self, Proc, binary, llama_bin_dir, run, wait_for};
use alki_shared::digest::Digest;
use anyhow::Context as _;
use serde_json::Value;

/// The controller with TLS (the default), reached over HTTPS with its CA; agents enroll with a bootstrap
/// token and keep mTLS sessions.
struct Fleet {
    dir: tempfile::TempDir,
    controller: harness::Controller,
    key: harness::SigningKey,
}

impl Fleet {
    fn alkictl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        self.controller.alkictl_json(args)
    }
}

fn start_controller() -> anyhow::Result<Fleet> {
    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let controller = harness::start_controller(dir.path(), &["--trusted-key", path(&key.public_key)?])?;
    Ok(Fleet { dir, controller, key })
}

fn make_model(out: &Path, name: &str, seed: u64) -> anyhow::Result<()> {
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(out).args([
        "--name",
        name,
        "--seed",
        &seed.to_string(),
    ]))?;
    Ok(())
}

fn start_agent(fleet: &Fleet, device_id: &str, llama_bin: &Path) -> anyhow::Result<(Proc, u16)> {
    let trust_policy = harness::write_trust_policy(fleet.dir.path(), &fleet.key.public_key)?;
    let server = llama_bin.join("llama-server");
    fleet.controller.start_agent(fleet.dir.path(), device_id, "lab", &server, &trust_policy, "")
}

fn device(fleet: &Fleet, id: &str) -> anyhow::Result<Option<Value>> {
    let devices = fleet.alkictl_json(&["devices", "list"])?;
    Ok(devices.as_array().and_then(|ds| ds.iter().find(|d| d["id"] == id)).cloned())
}

#[test]
fn a_bundle_rolls_out_to_an_agent_and_serves_completions_with_real_llama_server() -> anyhow::Result<()> {
    let llama_bin = llama_bin_dir()?;
    let fleet = start_controller()?;

    let model = fleet.dir.path().join("tiny-q.gguf");
    make_model(&model, "alki-tiny", 1)?;
    let layout = fleet.dir.path().join("bundle");
    let packed = fleet.alkictl_json(&[
        "bundle",
        "pack",
        model.to_str().context("path")?,
        "--out",
        layout.to_str().context("path")?,
        "--tag",
        "v1",
    ])?;
    let bundle_digest = packed["digest"].as_str().context("no digest from pack")?.to_owned();
    let pushed = fleet.alkictl_json(&["bundle", "push", layout.to_str().context("path")?, "acme/tiny:v1"])?;
    assert_eq!(pushed["digest"], bundle_digest.as_str());
    // Unsigned, the controller refuses to roll it out and says how to fix it.
    let refused = run(fleet.controller.alkictl()?.args([
        "rollout",
        "create",
        "--bundle",
        "acme/tiny:v1",
        "--selector",
        "site=lab",
    ]));
    let refused = format!("{:#}", refused.expect_err("an unsigned bundle is refused"));
    assert!(refused.contains("not signed") && refused.contains("alkictl bundle sign"), "{refused}");
    let signed = fleet.controller.sign("acme/tiny:v1", &fleet.key)?;
    assert_eq!(signed["signatures"].as_array().map(Vec::len), Some(2), "index and variant signed: {signed}");
    let bundles = fleet.alkictl_json(&["bundle", "list"])?;
    assert!(bundles.as_array().is_some_and(|bs| bs.iter().any(|b| b["digest"] == bundle_digest.as_str())), "{bundles}");

    let (agent, front_port) = start_agent(&fleet, "pi-001", &llama_bin)?;
    let procs = [&fleet.controller.proc, &agent];
    wait_for("the agent to connect", Duration::from_secs(30), &procs, || {
        Ok(device(&fleet, "pi-001")?.filter(|d| d["connected"] == true))
    })?;

    let rollout = fleet.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:v1", "--selector", "site=lab"])?;
    let rollout_id = rollout["id"].as_str().context("no rollout id")?.to_owned();
    let active = wait_for("the agent to activate the bundle", Duration::from_secs(180), &procs, || {
        Ok(device(&fleet, "pi-001")?
            .filter(|d| d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest))))
    })?;
    assert_eq!(active["applied_generation"], active["desired_generation"]);

    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let response = client
        .post(format!("http://127.0.0.1:{front_port}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}))
        .send()?;
    assert_eq!(response.status(), 200);
    let body: Value = response.json()?;
    let text = body["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!text.is_empty(), "no generated text in {body}");

    wait_for("the rollout to complete", Duration::from_secs(30), &procs, || {
        let r = fleet.alkictl_json(&["rollout", "get", &rollout_id])?;
        Ok((r["state"] == "completed").then_some(()))
    })?;

    // A corrupt layer in the registry: the agent refuses it as digest_mismatch naming the layer, and keeps
    // serving v1.
    let model_v2 = fleet.dir.path().join("tiny-v2.gguf");
    make_model(&model_v2, "alki-tiny-v2", 2)?;
    let layout_v2 = fleet.dir.path().join("bundle-v2");
    fleet.alkictl_json(&["bundle", "pack", path(&model_v2)?, "--out", path(&layout_v2)?, "--tag", "v2"])?;
    fleet.alkictl_json(&["bundle", "push", path(&layout_v2)?, "acme/tiny:v2"])?;
    fleet.controller.sign("acme/tiny:v2", &fleet.key)?;
    let weights = Digest::of(&std::fs::read(&model_v2)?);
    let blob = fleet.controller.data_dir.join("blobs").join(weights.storage_path());
    let mut bytes = std::fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, &bytes)?;

    let rollout_v2 =
        fleet.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:v2", "--selector", "site=lab"])?;
    let failed = wait_for("the agent to refuse the corrupt bundle", Duration::from_secs(120), &procs, || {
        Ok(device(&fleet, "pi-001")?.filter(|d| d["phase"] == "failed"))
    })?;
    assert_eq!(failed["error_code"], "digest_mismatch", "{failed}");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains(weights.hex())), "the error names the layer: {failed}");
    assert!(failed["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest)), "still serving v1: {failed}");
    let response = client
        .post(format!("http://127.0.0.1:{front_port}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 4}))
        .send()?;
    assert_eq!(response.status(), 200, "v1 keeps serving after a refused update");

    // The failed v2 rollout ends (abort is refused when the gates already ended it) before the next one.
    let v2_id = rollout_v2["id"].as_str().context("rollout id")?.to_owned();
    let _ = run(fleet.controller.alkictl()?.args(["rollout", "abort", &v2_id, "--reason", "e2e: corrupt layer"]));
    wait_for("the v2 rollout to end", Duration::from_secs(60), &procs, || {
        let r = fleet.alkictl_json(&["rollout", "get", &v2_id])?;
        Ok(["aborted", "completed", "failed"].contains(&r["state"].as_str().unwrap_or_default()).then_some(()))
    })?;

    // Signed by a key nobody trusts: the controller refuses; overridden there, the agent still refuses it
    // before fetching its layers, with the reason, and v1 keeps serving.
    let model_v3 = fleet.dir.path().join("tiny-v3.gguf");
    make_model(&model_v3, "alki-tiny-v3", 3)?;
    let layout_v3 = fleet.dir.path().join("bundle-v3");
    fleet.alkictl_json(&["bundle", "pack", path(&model_v3)?, "--out", path(&layout_v3)?, "--tag", "v3"])?;
    fleet.alkictl_json(&["bundle", "push", path(&layout_v3)?, "acme/tiny:v3"])?;
    let stranger = harness::generate_key(fleet.dir.path(), "stranger")?;
    fleet.controller.sign("acme/tiny:v3", &stranger)?;
    let inspected =
        fleet.alkictl_json(&["bundle", "inspect", "acme/tiny:v3", "--key", path(&fleet.key.public_key)?])?;
    assert_eq!(inspected["verified"], false, "{inspected}");
    let create_v3 = ["rollout", "create", "--bundle", "acme/tiny:v3", "--selector", "site=lab"];
    let refused = format!("{:#}", run(fleet.controller.alkictl()?.args(create_v3)).expect_err("untrusted"));
    assert!(refused.contains("no trusted key"), "{refused}");
    let overridden = fleet.alkictl_json(
        &[&create_v3[..], &["--override-signature-check", "--reason", "e2e: agents must refuse it"]].concat(),
    )?;
    let untrusted = wait_for("the agent to refuse the untrusted bundle", Duration::from_secs(120), &procs, || {
        Ok(device(&fleet, "pi-001")?.filter(|d| d["error_code"] == "signature_untrusted"))
    })?;
    assert!(untrusted["error"].as_str().is_some_and(|e| e.contains("no trusted key")), "{untrusted}");
    assert!(untrusted["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest)), "still v1: {untrusted}");
    let events = fleet.alkictl_json(&["rollout", "history", overridden["id"].as_str().context("rollout id")?])?;
    assert!(events.to_string().contains("signature_override"), "the override is recorded: {events}");
    let v3_weights = Digest::of(&std::fs::read(&model_v3)?);
    let device_blob = fleet.dir.path().join("pi-001/data").join(v3_weights.hex());
    assert!(
        harness_find(&fleet.dir.path().join("pi-001/data"), v3_weights.hex()).is_none(),
        "{} never fetched",
        device_blob.display()
    );
    let response = client
        .post(format!("http://127.0.0.1:{front_port}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "And now?"}], "max_tokens": 4}))
        .send()?;
    assert_eq!(response.status(), 200, "v1 keeps serving after refusing an untrusted bundle");

    // SIGTERM stops the controller gracefully even with an agent's session open.
    let mut fleet = fleet;
    let status = fleet.controller.proc.stop(Duration::from_secs(30))?;
    assert!(
        status.is_some_and(|s| s.success()),
        "controller did not stop gracefully: {status:?}\n{}",
        fleet.controller.proc.log_tail()
    );
    Ok(())
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary paths are UTF-8")
}

/// A file named `name` anywhere under `dir`.
fn harness_find(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(found) = harness_find(&p, name) {
                return Some(found);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
