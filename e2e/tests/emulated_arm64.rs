//! The arm64 device end to end, emulated: the cross-built arm64 `alki-agent` runs under `qemu-aarch64-static`
//! (invoked explicitly, with the Debian aarch64 sysroot; no binfmt_misc), against the x86 controller over TLS.
//! One runtime build holds two arm64 llama.cpp builds cross-compiled from the same sources: the armv8-a
//! baseline and the Pi 5 tuning (dotprod, fp16). Two devices enroll: one emulating a Pi 4's Cortex-A72, one a
//! Pi 5's Cortex-A76. Each pulls and verifies the signed bundle and build, chooses the build entry its CPU
//! runs (the A72 the baseline, the A76 the tuned one), starts that arm64 llama-server (through
//! `runtime.launcher`, which puts it under qemu too), serves a chat completion from the tiny model through
//! its front port, and reports `aarch64` and the entry it chose.
//!
//! Needs the release arm64 agent and the arm64 llama.cpp builds, so `e2e/scripts/test.sh` runs it (ignored
//! by a plain `cargo test`) after `deploy/release/build.sh` and `deploy/release/build-llama-arm64.sh`, with
//! `ALKI_ARM64_AGENT`, `ALKI_ARM64_LLAMA_BASELINE` and `ALKI_ARM64_LLAMA_A76` set.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use alki_e2e::harness::{self, AgentSetup, Proc, binary, free_port, run, wait_for};
use anyhow::{Context as _, bail};
use serde_json::Value;

/// Where Debian's libc6-arm64-cross puts the arm64 loader and C library.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
const QEMU: &str = "qemu-aarch64-static";

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary paths are UTF-8")
}

/// A path from the environment, which must exist.
fn required(var: &str, what: &str) -> anyhow::Result<PathBuf> {
    let Some(value) = std::env::var_os(var) else {
        bail!("{var} is not set: {what} (e2e/scripts/test.sh sets it)");
    };
    let value = PathBuf::from(value);
    if !value.exists() {
        bail!("{var}={} does not exist: {what}", value.display());
    }
    Ok(value)
}

/// One emulated device: its agent under qemu with `cpu`, and llama-server launched under the same CPU model.
struct Device {
    id: &'static str,
    cpu: &'static str,
    front_port: u16,
    agent: Proc,
}

fn start_device(
    root: &Path,
    controller: &harness::Controller,
    arm64_agent: &Path,
    fallback_server: &Path,
    trust_policy: &Path,
    (id, cpu): (&'static str, &'static str),
) -> anyhow::Result<Device> {
    let bootstrap = controller.bootstrap_token(1, "lab")?;
    let front_port = free_port()?;
    let launcher = format!("launcher = [\"{QEMU}\", \"-cpu\", \"{cpu}\", \"-L\", \"{SYSROOT}\"]");
    let setup = AgentSetup {
        device_id: id,
        site: "lab",
        controller: &controller.grpc,
        ca_file: &controller.ca_file,
        bootstrap_token: &bootstrap,
        registry: "",
        llama_server: fallback_server,
        front_port,
        // Loading and the smoke completion run emulated.
        health_timeout_secs: 600,
        trust_policy,
        runtime_extra: &launcher,
    };
    let config = harness::write_agent_config(root, &setup)?;
    let mut cmd = Command::new(QEMU);
    cmd.args(["-cpu", cpu, "-L", SYSROOT]).arg(arm64_agent).args(["run", "--config"]).arg(&config);
    Ok(Device { id, cpu, front_port, agent: Proc::spawn(id, cmd, root)? })
}

/// Resident memory of a process in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

#[test]
#[ignore = "needs the arm64 release agent and llama.cpp builds: e2e/scripts/test.sh runs it"]
fn arm64_agents_under_qemu_choose_their_build_and_serve_from_the_x86_controller() -> anyhow::Result<()> {
    let started = Instant::now();
    let arm64_agent = required("ALKI_ARM64_AGENT", "the cross-built arm64 alki-agent")?;
    let baseline = required("ALKI_ARM64_LLAMA_BASELINE", "deploy/release/build-llama-arm64.sh baseline")?;
    let a76 = required("ALKI_ARM64_LLAMA_A76", "deploy/release/build-llama-arm64.sh a76")?;
    let version = run(Command::new(QEMU).args(["-L", SYSROOT]).arg(&arm64_agent).arg("--version"))?;
    assert!(version.contains("aarch64"), "the arm64 agent says its target: {version}");

    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let controller = harness::start_controller(dir.path(), &["--trusted-key", path(&key.public_key)?])?;

    // One build, two arm64 entries: the Pi 5 tuning needs the dot product and fp16 arithmetic.
    let pushed = controller.alkictl_json(&[
        "runtime",
        "push",
        "acme/llama-server:b11434-arm64",
        "--platform",
        &format!("linux/arm64={}", baseline.display()),
        "--platform",
        &format!("linux/arm64+asimddp+asimdhp={}", a76.display()),
    ])?;
    let pinned = pushed["pinned"].as_str().context("runtime push prints the pinned reference")?.to_owned();
    let platforms: Vec<&str> =
        pushed["platforms"].as_array().into_iter().flatten().filter_map(|p| p["platform"].as_str()).collect();
    assert_eq!(platforms, ["linux/arm64", "linux/arm64+asimddp+asimdhp"], "{pushed}");
    controller.sign("acme/llama-server:b11434-arm64", &key)?;

    let model = dir.path().join("tiny.gguf");
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(&model).args(["--name", "alki-tiny"]))?;
    let bundle_digest =
        controller.release_on_build(&model, &dir.path().join("bundle"), "acme/tiny:v1", &pinned, &key)?;

    let trust_policy = harness::write_trust_policy(dir.path(), &key.public_key)?;
    // The configured llama-server is the baseline build's: only the runtime build's entry decides what runs.
    let fallback = baseline.join("llama-server");
    let devices = [("pi4-emulated", "cortex-a72"), ("pi5-emulated", "cortex-a76")]
        .into_iter()
        .map(|d| start_device(dir.path(), &controller, &arm64_agent, &fallback, &trust_policy, d))
        .collect::<anyhow::Result<Vec<Device>>>()?;
    let mut procs = vec![&controller.proc];
    procs.extend(devices.iter().map(|d| &d.agent));
    let device = |id: &str| -> anyhow::Result<Option<Value>> {
        let listed = controller.alkictl_json(&["devices", "list"])?;
        Ok(listed.as_array().and_then(|ds| ds.iter().find(|d| d["id"] == id)).cloned())
    };
    for d in &devices {
        let enrolled = wait_for("the emulated agent to enroll and connect", Duration::from_secs(300), &procs, || {
            Ok(device(d.id)?.filter(|v| v["connected"] == true))
        })?;
        assert_eq!(enrolled["arch"], "aarch64", "{enrolled}");
    }
    let enrolled_after = started.elapsed();

    controller.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:v1", "--selector", "site=lab"])?;
    let expected = [("pi4-emulated", "linux/arm64"), ("pi5-emulated", "linux/arm64+asimddp+asimdhp")];
    for (id, platform) in expected {
        let active = wait_for("the emulated device to serve on its build", Duration::from_secs(1200), &procs, || {
            Ok(device(id)?.filter(|v| {
                v["phase"] == "active" && v["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest))
            }))
        })?;
        assert_eq!(active["runtime_platform"], platform, "{id} chose by its CPU features: {active}");
    }
    let active_after = started.elapsed();

    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build()?;
    for d in &devices {
        let response = client
            .post(format!("http://127.0.0.1:{}/v1/chat/completions", d.front_port))
            .json(&serde_json::json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}))
            .send()?;
        let status = response.status().as_u16();
        let body: Value = response.json()?;
        assert_eq!(status, 200, "{}: {body}", d.id);
        let text = body["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        assert!(!text.is_empty(), "{} answered from its arm64 llama-server: {body}", d.id);
        // The served llama-server is the arm64 build the agent extracted, run by qemu with this CPU model.
        let data = harness::agent_dir(dir.path(), d.id).join("data/runtime-builds");
        let serving = serving_under(&data);
        assert_eq!(serving.len(), 1, "{}: one llama-server from the build: {serving:?}", d.id);
        assert!(serving[0].contains(QEMU) && serving[0].contains(d.cpu), "{}: {serving:?}", d.id);
    }
    for d in &devices {
        let rss = rss_kib(d.agent.child.id()).unwrap_or_default();
        eprintln!("figure: {} ({}) agent RSS under qemu, serving: {} KiB", d.id, d.cpu, rss);
    }
    eprintln!(
        "figure: emulated arm64 e2e: enrolled after {enrolled_after:?}, both serving after {active_after:?}, \
         done after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Command lines of processes running a `llama-server` from under `dir`.
fn serving_under(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let needle = dir.display().to_string();
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (line.contains(&needle) && line.contains("llama-server")).then_some(line)
        })
        .collect()
}
