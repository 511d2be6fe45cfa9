//! The p95 latency gate end to end with the real binaries: two agents (fake llama-server) serve bundle A and
//! real requests through their front ports; `alkictl rollout create --max-p95-latency-ratio 1.5` then moves
//! them to a candidate whose model answers about four times slower (its GGUF carries the fake's
//! `FAKE_LLAMA_TOKEN_MS`, `make-tiny-model --fake-knob`): the class halts, the rollout aborts with both p95
//! values named, and `rollout status` shows them. A second candidate as fast as A completes under the same
//! gate. Latency is what the agents' proxies measured, accumulated by the controller from their telemetry.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alki_e2e::harness::{self, Controller, Proc, binary, run, wait_for};
use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

/// Generated tokens per request: with [`A_TOKEN_MS`] a request takes 320 ms, in the agents' (250, 500] ms
/// latency bucket with room for a loaded machine's delays on either side of the proxy.
const TOKENS: u64 = 8;
const A_TOKEN_MS: u64 = 40;
/// 1.2 s a request: the (1000, 2500] ms bucket.
const SLOW_TOKEN_MS: u64 = 150;
/// Requests each device serves on each bundle.
const REQUESTS: u64 = 20;
/// Concurrent clients per device.
const CLIENTS: u64 = 4;
/// Covers a pull, a start and a telemetry interval (10 s).
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const DEVICES: [&str; 2] = ["pi-p95-1", "pi-p95-2"];

struct Fleet {
    dir: tempfile::TempDir,
    controller: Controller,
    key: harness::SigningKey,
    agents: Vec<(Proc, u16)>,
    /// HTTPS to the controller's dashboard API, trusting its CA.
    https: reqwest::blocking::Client,
}

impl Fleet {
    fn start() -> anyhow::Result<Fleet> {
        let dir = tempfile::tempdir()?;
        let key = harness::generate_key(dir.path(), "release")?;
        let public_key = key.public_key.to_str().context("utf-8")?.to_owned();
        let controller = harness::start_controller(dir.path(), &["--trusted-key", &public_key])?;
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&controller.ca_file)?)?;
        let https = reqwest::blocking::Client::builder().add_root_certificate(ca).build()?;
        let trust = harness::write_trust_policy(dir.path(), &key.public_key)?;
        let fake = binary("fake-llama-server")?;
        let mut agents = Vec::new();
        for id in DEVICES {
            agents.push(controller.start_agent(dir.path(), id, "lab", &fake, &trust, "watch_window_secs = 0")?);
        }
        Ok(Fleet { dir, controller, key, agents, https })
    }

    fn procs(&self) -> Vec<&Proc> {
        std::iter::once(&self.controller.proc).chain(self.agents.iter().map(|(p, _)| p)).collect()
    }

    /// Makes a tiny model whose every generated token takes `token_ms` on the fake llama-server, packs and
    /// pushes it as `acme/tiny:<tag>`, signs it; returns its digest.
    fn push(&self, tag: &str, seed: u64, token_ms: u64) -> anyhow::Result<String> {
        let dir = self.dir.path();
        let model = dir.join(format!("tiny-{tag}.gguf"));
        run(Command::new(binary("make-tiny-model")?)
            .arg("--out")
            .arg(&model)
            .args(["--name", &format!("tiny-{tag}"), "--seed", &seed.to_string()])
            .args(["--fake-knob", &format!("FAKE_LLAMA_TOKEN_MS={token_ms}")]))?;
        let layout = dir.join(format!("layout-{tag}"));
        let packed =
            self.controller.alkictl_json(&["bundle", "pack", path(&model)?, "--out", path(&layout)?, "--tag", tag])?;
        let digest = packed["digest"].as_str().context("no digest from pack")?.to_owned();
        self.controller.alkictl_json(&["bundle", "push", path(&layout)?, &format!("acme/tiny:{tag}")])?;
        self.controller.sign(&format!("acme/tiny:{tag}"), &self.key)?;
        Ok(digest)
    }

    /// `alkictl rollout create` for `acme/tiny:<tag>` on the lab devices with `extra` flags; its id.
    fn rollout(&self, tag: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["rollout", "create", "--bundle"];
        let bundle = format!("acme/tiny:{tag}");
        args.extend([bundle.as_str(), "--selector", "site=lab"]);
        args.extend(extra);
        let created = self.controller.alkictl_json(&args)?;
        Ok(created["id"].as_str().context("no rollout id")?.to_owned())
    }

    fn wait_running(&self, digest: &str) -> anyhow::Result<()> {
        for id in DEVICES {
            wait_for(&format!("{id} to serve {digest}"), STEP_TIMEOUT, &self.procs(), || {
                let devices = self.controller.alkictl_json(&["devices", "list"])?;
                let device = devices.as_array().and_then(|ds| ds.iter().find(|d| d["id"] == id)).cloned();
                Ok(device
                    .filter(|d| d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(digest))))
            })?;
        }
        Ok(())
    }

    /// Sends [`REQUESTS`] completions to every device's front port.
    fn serve(&self) -> anyhow::Result<()> {
        std::thread::scope(|s| {
            let clients: Vec<_> = self
                .agents
                .iter()
                .flat_map(|(_, port)| (0..CLIENTS).map(move |_| *port))
                .map(|port| s.spawn(move || complete(port, REQUESTS / CLIENTS)))
                .collect();
            clients.into_iter().try_for_each(|c| c.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
        })
    }

    /// Waits until the controller stored telemetry of `digest` from every device whose latency histogram
    /// counts the requests [`Fleet::serve`] sent.
    fn wait_counted(&self, digest: &str) -> anyhow::Result<()> {
        for id in DEVICES {
            wait_for(
                &format!("telemetry of {digest} with the requests from {id}"),
                STEP_TIMEOUT,
                &self.procs(),
                || {
                    let device: Value = self
                        .https
                        .get(format!("https://{}/api/v1/devices/{id}", self.controller.registry))
                        .bearer_auth(std::fs::read_to_string(&self.controller.token_file)?.trim())
                        .send()?
                        .error_for_status()?
                        .json()?;
                    let t = &device["latest_telemetry"];
                    let measured =
                        t["latency_buckets"].as_array().and_then(|b| b.last()).and_then(|b| b["count"].as_u64());
                    Ok((t["bundle_digest"] == digest && measured.is_some_and(|n| n >= REQUESTS)).then_some(()))
                },
            )?;
        }
        Ok(())
    }

    fn wait_finished(&self, rollout: &str) -> anyhow::Result<Value> {
        wait_for(&format!("rollout {rollout} to finish"), STEP_TIMEOUT, &self.procs(), || {
            let r = self.controller.alkictl_json(&["rollout", "get", rollout])?;
            Ok((r["state"] == "completed" || r["state"] == "aborted").then_some(r))
        })
    }
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// `n` completions one after the other through the front port at `port`.
fn complete(port: u16, n: u64) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
    for _ in 0..n {
        let response = client
            .post(format!("http://127.0.0.1:{port}/completion"))
            .json(&serde_json::json!({"prompt": "hello there", "n_predict": TOKENS}))
            .send()?;
        if !response.status().is_success() {
            bail!("the front port {port} answered {}: {}", response.status(), response.text().unwrap_or_default());
        }
    }
    Ok(())
}

/// The one class's p95 values (B, A) in `rollout get`/`status` JSON.
fn p95s(class: &Value) -> (f64, f64) {
    (class["b_p95_latency_ms"].as_f64().unwrap_or(0.0), class["a_p95_latency_ms"].as_f64().unwrap_or(0.0))
}

#[test]
fn a_slower_candidate_halts_on_the_p95_latency_gate_and_one_as_fast_completes() -> anyhow::Result<()> {
    let fleet = Fleet::start()?;
    let a = fleet.push("v1", 1, A_TOKEN_MS)?;
    let slow = fleet.push("v2-slow", 2, SLOW_TOKEN_MS)?;
    let fast = fleet.push("v3", 3, A_TOKEN_MS)?;

    // A everywhere, serving real traffic the controller has counted before any candidate arrives.
    let first = fleet.rollout("v1", &[])?;
    fleet.wait_running(&a)?;
    ensure!(fleet.wait_finished(&first)?["state"] == "completed", "A rolls out");
    fleet.serve()?;
    fleet.wait_counted(&a)?;

    // The slow candidate: B's p95 is several times A's, past the gate's 1.5x. Its only class halts, so the
    // rollout aborts and both devices return to A.
    let gate = ["--max-p95-latency-ratio", "1.5", "--min-devices", "2", "--max-failures", "0"];
    let halting = [&gate[..], &["--on-class-failure", "halt-class"]].concat();
    let rollout = fleet.rollout("v2-slow", &halting)?;
    fleet.wait_running(&slow)?;
    fleet.serve()?;
    let aborted = fleet.wait_finished(&rollout)?;
    ensure!(aborted["state"] == "aborted", "the slow candidate is stopped: {aborted}");
    let class = &aborted["classes"][0];
    ensure!(class["verdict"] == "halted", "{class}");
    let (b, a_p95) = p95s(class);
    println!("slow candidate: p95 {b:.1} ms on B against {a_p95:.1} ms on A ({:.2}x)", b / a_p95);
    ensure!((1000.0..=2500.0).contains(&b) && (250.0..=500.0).contains(&a_p95), "p95 B {b} / A {a_p95}: {class}");
    let message = aborted["message"].as_str().unwrap_or_default();
    let named = format!("p95 latency {b:.0} ms on B is {:.2}x A's {a_p95:.0} ms, over the gate 1.5x", b / a_p95);
    ensure!(message.contains(&named), "the reason names both values ({named}): {message}");
    let status = run(fleet.controller.alkictl()?.args(["rollout", "status", &rollout]))?;
    ensure!(status.contains("B/A p95 latency <= 1.50") && status.contains("B P95"), "{status}");
    ensure!(status.contains(&format!("{b:.0} ms")) && status.contains(&format!("{a_p95:.0} ms")), "{status}");
    fleet.wait_running(&a)?;

    // A candidate as fast as A passes the same gate and completes.
    let rollout = fleet.rollout("v3", &gate)?;
    fleet.wait_running(&fast)?;
    fleet.serve()?;
    let completed = fleet.wait_finished(&rollout)?;
    ensure!(completed["state"] == "completed", "the fast candidate completes: {completed}");
    let (b, a_p95) = p95s(&completed["classes"][0]);
    println!("fast candidate: p95 {b:.1} ms on B against {a_p95:.1} ms on A");
    ensure!(b > 0.0 && b <= 1.5 * a_p95, "p95 B {b} / A {a_p95}: {completed}");
    Ok(())
}
