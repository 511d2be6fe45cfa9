//! End to end with the real binaries and the real llama-server as a runtime build: `alkictl runtime push` packs
//! the cached llama.cpp build (llama-server and its shared libraries) into the controller's registry, `alkictl
//! bundle sign` signs it, a bundle names it by digest (`bundle pack --runtime-build`), and a rollout makes the
//! agent verify, pull and extract the build and serve the model with it: the served llama-server's executable
//! and its libllama lie under the agent's runtime-build directory, and a chat completion answers through the
//! front port. A bundle naming an unsigned build is refused by the agent with the reason, and the build-served
//! model keeps serving.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use alki_e2e::harness::{self, AgentSetup, binary, free_port, llama_bin_dir, run, wait_for};
use anyhow::Context as _;
use serde_json::Value;

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary paths are UTF-8")
}

/// This machine's platform as `alkictl runtime push --platform` names it.
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// Processes whose executable lies under `dir`.
fn processes_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            exe.starts_with(dir).then_some((pid, exe))
        })
        .collect()
}

#[test]
fn a_bundle_naming_a_signed_runtime_build_is_served_by_that_build_of_real_llama_server() -> anyhow::Result<()> {
    let llama_bin = llama_bin_dir()?;
    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let controller = harness::start_controller(dir.path(), &["--trusted-key", path(&key.public_key)?])?;

    // The build: pushed, signed like a bundle (its index and its one platform manifest).
    let started = std::time::Instant::now();
    let pushed = controller.alkictl_json(&[
        "runtime",
        "push",
        "acme/llama-server:b11434",
        "--platform",
        &format!("{}={}", platform(), llama_bin.display()),
    ])?;
    eprintln!("runtime push took {:?}: {pushed}", started.elapsed());
    let pinned = pushed["pinned"].as_str().context("runtime push prints the pinned reference")?.to_owned();
    assert!(pinned.contains("/acme/llama-server@sha256:"), "{pushed}");
    let entry = &pushed["platforms"][0];
    assert_eq!(entry["platform"], platform().as_str(), "{pushed}");
    assert!(entry["files"].as_u64().is_some_and(|n| n > 2), "llama-server and its libraries: {pushed}");
    assert!(entry["build_info"].as_str().is_some_and(|b| !b.is_empty()), "--version read: {pushed}");
    let signed = controller.sign("acme/llama-server:b11434", &key)?;
    assert_eq!(signed["signatures"].as_array().map(Vec::len), Some(2), "index and platform manifest: {signed}");

    // A bundle naming the build by digest; a tag alone is refused with how to get the digest.
    let model = dir.path().join("tiny.gguf");
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(&model).args(["--name", "alki-tiny"]))?;
    let tag_only = format!("{}:b11434", pinned.split('@').next().unwrap_or_default());
    let refused = run(controller
        .alkictl()?
        .args(["bundle", "pack", path(&model)?, "--out"])
        .arg(dir.path().join("refused"))
        .args(["--runtime-build", &tag_only]));
    let refused = format!("{:#}", refused.expect_err("a tag is not a pin"));
    assert!(refused.contains("no digest") && refused.contains("alkictl runtime push"), "{refused}");
    let bundle_digest =
        controller.release_on_build(&model, &dir.path().join("bundle"), "acme/tiny:v1", &pinned, &key)?;

    // The agent's own llama-server is the fake: only the build can make the real one serve.
    let bootstrap = controller.bootstrap_token(1, "lab")?;
    let front_port = free_port()?;
    let trust_policy = harness::write_trust_policy(dir.path(), &key.public_key)?;
    let fake = binary("fake-llama-server")?;
    let setup = AgentSetup {
        device_id: "pi-001",
        site: "lab",
        controller: &controller.grpc,
        ca_file: &controller.ca_file,
        bootstrap_token: &bootstrap,
        registry: "",
        llama_server: &fake,
        front_port,
        health_timeout_secs: 120,
        trust_policy: &trust_policy,
        runtime_extra: "",
    };
    let agent = harness::start_agent(dir.path(), &setup)?;
    let procs = [&controller.proc, &agent];
    let device = |id: &str| -> anyhow::Result<Option<Value>> {
        let devices = controller.alkictl_json(&["devices", "list"])?;
        Ok(devices.as_array().and_then(|ds| ds.iter().find(|d| d["id"] == id)).cloned())
    };
    wait_for("the agent to connect", Duration::from_secs(30), &procs, || {
        Ok(device("pi-001")?.filter(|d| d["connected"] == true))
    })?;
    let rollout =
        controller.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:v1", "--selector", "site=lab"])?;
    let rollout_id = rollout["id"].as_str().context("rollout id")?.to_owned();
    let started = std::time::Instant::now();
    let active = wait_for("the agent to activate the bundle on its build", Duration::from_secs(180), &procs, || {
        Ok(device("pi-001")?
            .filter(|d| d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest))))
    })?;
    assert_eq!(active["runtime_platform"], platform().as_str(), "the device reports the entry it runs: {active}");

    eprintln!("rollout create to active on the build (pull, verify, extract, start): {:?}", started.elapsed());
    let builds = harness::agent_dir(dir.path(), "pi-001").join("data/runtime-builds");
    let serving = processes_under(&builds);
    assert_eq!(serving.len(), 1, "one llama-server from the build: {serving:?}");
    let (pid, exe) = &serving[0];
    assert_eq!(exe.file_name().and_then(|n| n.to_str()), Some("llama-server"));
    let build_dir = exe.parent().context("build dir")?.to_owned();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    assert!(
        maps.lines().any(|l| l.contains(&format!("{}/libllama.so", build_dir.display()))),
        "libllama comes from the build directory, not {}",
        llama_bin.display()
    );

    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let chat = |content: &str| -> anyhow::Result<(u16, Value)> {
        let response = client
            .post(format!("http://127.0.0.1:{front_port}/v1/chat/completions"))
            .json(&serde_json::json!({"messages": [{"role": "user", "content": content}], "max_tokens": 8}))
            .send()?;
        Ok((response.status().as_u16(), response.json()?))
    };
    let (status, body) = chat("Say hello.")?;
    assert_eq!(status, 200, "{body}");
    assert!(body["choices"][0]["message"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    wait_for("the rollout to complete", Duration::from_secs(30), &procs, || {
        let r = controller.alkictl_json(&["rollout", "get", &rollout_id])?;
        Ok((r["state"] == "completed").then_some(()))
    })?;

    // The same build under another version (another digest) left unsigned: the trust policy applies to the
    // build's repository like to any bundle's, so the agent refuses it, and the signed build keeps serving.
    let unsigned = controller.alkictl_json(&[
        "runtime",
        "push",
        "acme/llama-server:unsigned",
        "--build-version",
        "unsigned",
        "--platform",
        &format!("{}={}", platform(), llama_bin.display()),
    ])?;
    let unsigned_pin = unsigned["pinned"].as_str().context("pinned")?.to_owned();
    assert_ne!(unsigned_pin, pinned);
    let layout_v2 = dir.path().join("bundle-v2");
    controller.alkictl_json(&[
        "bundle",
        "pack",
        path(&model)?,
        "--out",
        path(&layout_v2)?,
        "--tag",
        "v2",
        "--context",
        "1024",
        "--runtime-build",
        &unsigned_pin,
    ])?;
    controller.alkictl_json(&["bundle", "push", path(&layout_v2)?, "acme/tiny:v2"])?;
    controller.sign("acme/tiny:v2", &key)?;
    controller.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:v2", "--selector", "site=lab"])?;
    let refused = wait_for("the agent to refuse the unsigned build", Duration::from_secs(120), &procs, || {
        Ok(device("pi-001")?.filter(|d| d["phase"] == "failed"))
    })?;
    assert_eq!(refused["error_code"], "signature_missing", "{refused}");
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("runtime build")), "{refused}");
    assert!(refused["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest)), "v1 still serves: {refused}");
    let (status, _) = chat("Still there?")?;
    assert_eq!(status, 200);
    assert_eq!(processes_under(&builds).len(), 1, "still the signed build");
    Ok(())
}
