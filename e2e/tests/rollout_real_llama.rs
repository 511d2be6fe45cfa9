//! End to end with the real binaries and a real llama-server: pack and push a bundle with alkictl, roll it
//! out through the controller, wait for the agent to report it active, and get a completion through the
//! agent's front port.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alki_e2e::harness::{self, AgentSetup, Proc, binary, free_port, llama_bin_dir, run, wait_for};
use alki_shared::digest::Digest;
use anyhow::Context as _;
use serde_json::Value;

struct Fleet {
    dir: tempfile::TempDir,
    grpc: String,
    registry: String,
    token_file: std::path::PathBuf,
    controller: Proc,
}

impl Fleet {
    fn alkictl(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(binary("alkictl")?);
        cmd.args(["--controller", &self.grpc, "--registry", &self.registry]).arg("--token-file").arg(&self.token_file);
        Ok(cmd)
    }

    fn alkictl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = run(self.alkictl()?.args(args).args(["-o", "json"]))?;
        serde_json::from_str(&out).with_context(|| format!("alkictl {args:?} printed non-JSON: {out}"))
    }
}

fn start_controller() -> anyhow::Result<Fleet> {
    let dir = tempfile::tempdir()?;
    let (grpc_port, http_port) = (free_port()?, free_port()?);
    let mut cmd = Command::new(binary("alki-controller")?);
    cmd.arg("--data-dir")
        .arg(dir.path().join("controller"))
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .args(["--heartbeat-seconds", "2"]);
    let controller = Proc::spawn("controller", cmd, dir.path())?;
    let token_file = dir.path().join("controller/admin.token");
    let registry = format!("127.0.0.1:{http_port}");
    wait_for("the controller to be ready", Duration::from_secs(30), &[&controller], || {
        let ready = reqwest::blocking::get(format!("http://{registry}/readyz")).map(|r| r.status().is_success());
        Ok((ready.unwrap_or(false) && token_file.is_file()).then_some(()))
    })?;
    Ok(Fleet { grpc: format!("http://127.0.0.1:{grpc_port}"), registry, token_file, controller, dir })
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
    let agent_token = fleet.alkictl_json(&["token", "create", "--name", device_id, "--role", "agent"])?;
    let front_port = free_port()?;
    let setup = AgentSetup {
        device_id,
        site: "lab",
        controller: &fleet.grpc,
        token: agent_token["token"].as_str().context("no token in alkictl output")?,
        registry: &format!("insecure_plain_http = [\"{}\"]", fleet.registry),
        llama_server: &llama_bin.join("llama-server"),
        front_port,
        health_timeout_secs: 120,
    };
    Ok((harness::start_agent(fleet.dir.path(), &setup)?, front_port))
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
    let pushed = fleet.alkictl_json(&[
        "bundle",
        "push",
        layout.to_str().context("path")?,
        "acme/tiny:v1",
        "--insecure-plain-http",
    ])?;
    assert_eq!(pushed["digest"], bundle_digest.as_str());
    let bundles = fleet.alkictl_json(&["bundle", "list"])?;
    assert!(bundles.as_array().is_some_and(|bs| bs.iter().any(|b| b["digest"] == bundle_digest.as_str())), "{bundles}");

    let (agent, front_port) = start_agent(&fleet, "pi-001", &llama_bin)?;
    let procs = [&fleet.controller, &agent];
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
    fleet.alkictl_json(&["bundle", "push", path(&layout_v2)?, "acme/tiny:v2", "--insecure-plain-http"])?;
    let weights = Digest::of(&std::fs::read(&model_v2)?);
    let blob = fleet.dir.path().join("controller/blobs").join(weights.storage_path());
    let mut bytes = std::fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, &bytes)?;

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

    // SIGTERM stops the controller gracefully even with an agent's session open.
    let mut fleet = fleet;
    let status = fleet.controller.stop(Duration::from_secs(30))?;
    assert!(
        status.is_some_and(|s| s.success()),
        "controller did not stop gracefully: {status:?}\n{}",
        fleet.controller.log_tail()
    );
    Ok(())
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary paths are UTF-8")
}
