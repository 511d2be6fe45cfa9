//! Device identity end to end with the real binaries: a controller with TLS on (the default) and its own CA;
//! a real agent enrolls with a bootstrap token (`alki-agent enroll`), keeps an mTLS session, pulls a bundle
//! over HTTPS with its short-lived registry token and serves it (fake llama-server; the real one runs the
//! same path in rollout_real_llama.rs); `alkictl devices decommission` closes its session and every later
//! session with its certificate is refused. Bootstrap tokens past their uses or expiry, and a device id
//! claimed twice, are refused.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use alki_e2e::harness::{self, AgentSetup, Controller, Proc, binary, free_port, run, wait_for};
use anyhow::{Context as _, ensure};
use serde_json::Value;

fn device(controller: &Controller, id: &str) -> anyhow::Result<Option<Value>> {
    let devices = controller.alkictl_json(&["devices", "list"])?;
    Ok(devices.as_array().and_then(|ds| ds.iter().find(|d| d["id"] == id)).cloned())
}

fn setup<'a>(
    controller: &'a Controller,
    id: &'a str,
    token: &'a str,
    fake: &'a Path,
    trust_policy: &'a Path,
) -> anyhow::Result<AgentSetup<'a>> {
    Ok(AgentSetup {
        device_id: id,
        site: "lab",
        controller: &controller.grpc,
        ca_file: &controller.ca_file,
        bootstrap_token: token,
        registry: "",
        llama_server: fake,
        front_port: free_port()?,
        health_timeout_secs: 30,
        trust_policy,
        runtime_extra: "",
    })
}

/// `alki-agent enroll` for `setup`; Ok(stdout) or Err(stderr).
fn enroll(root: &Path, setup: &AgentSetup<'_>) -> anyhow::Result<Result<String, String>> {
    let config = harness::write_agent_config(root, setup)?;
    let out = Command::new(binary("alki-agent")?).arg("enroll").arg("--config").arg(&config).output()?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn pack_and_push(controller: &Controller, dir: &Path) -> anyhow::Result<String> {
    let model = dir.join("tiny.gguf");
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(&model).args(["--name", "alki-tiny"]))?;
    let layout = dir.join("bundle");
    let packed = controller.alkictl_json(&[
        "bundle",
        "pack",
        model.to_str().context("utf-8")?,
        "--out",
        layout.to_str().context("utf-8")?,
        "--tag",
        "v1",
    ])?;
    let digest = packed["digest"].as_str().context("no digest from pack")?.to_owned();
    // Over HTTPS, trusting the controller CA (alkictl --ca-file).
    let pushed = controller.alkictl_json(&["bundle", "push", layout.to_str().context("utf-8")?, "acme/tiny:v1"])?;
    ensure!(pushed["digest"] == digest.as_str(), "pushed {pushed}");
    Ok(digest)
}

#[test]
fn an_enrolled_agent_rolls_out_over_mtls_and_is_refused_after_decommissioning() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let public_key = key.public_key.to_str().context("utf-8")?;
    let controller = harness::start_controller(dir.path(), &["--trusted-key", public_key])?;
    let fake = binary("fake-llama-server")?;
    let digest = pack_and_push(&controller, dir.path())?;
    controller.sign("acme/tiny:v1", &key)?;
    let trust = harness::write_trust_policy(dir.path(), &key.public_key)?;

    // Enrollment by hand, timed: key generation on the device, CSR, signing, files written.
    let token = controller.bootstrap_token(1, "lab")?;
    let agent_setup = setup(&controller, "pi-001", &token, &fake, &trust)?;
    let started = Instant::now();
    let enrolled = enroll(dir.path(), &agent_setup)?.map_err(|e| anyhow::anyhow!("enroll failed: {e}"))?;
    println!("enrollment took {} ms (alki-agent enroll, process start to exit)", started.elapsed().as_millis());
    ensure!(enrolled.contains("enrolled as pi-001"), "{enrolled}");
    let identity = harness::agent_dir(dir.path(), "pi-001").join("data/identity");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(identity.join("device.key"))?.permissions().mode();
        ensure!(mode & 0o777 == 0o600, "the device key is private: {mode:o}");
    }
    ensure!(identity.join("device.crt").is_file() && identity.join("ca.crt").is_file());

    let agent = harness::start_agent(dir.path(), &agent_setup)?;
    let procs = [&controller.proc, &agent];
    wait_for("the agent to connect over mTLS", Duration::from_secs(30), &procs, || {
        Ok(device(&controller, "pi-001")?.filter(|d| d["connected"] == true))
    })?;

    controller.alkictl_json(&["rollout", "create", "--bundle", "acme/tiny:v1", "--selector", "site=lab"])?;
    wait_for("the agent to pull and activate the bundle", Duration::from_secs(120), &procs, || {
        Ok(device(&controller, "pi-001")?
            .filter(|d| d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&digest))))
    })?;

    let done = controller.alkictl_json(&["devices", "decommission", "pi-001"])?;
    ensure!(done["session_closed"] == true, "the open session was closed: {done}");
    wait_for("the device to be disconnected", Duration::from_secs(30), &procs, || {
        Ok(device(&controller, "pi-001")?.filter(|d| d["connected"] == false))
    })?;
    // The agent keeps retrying with its certificate: each attempt is refused, and it never reconnects.
    wait_for("the agent to log a refused session", Duration::from_secs(30), &procs, || {
        let log = std::fs::read_to_string(&agent.log)?;
        Ok((log.contains("Controller session refused") && log.contains("decommissioned")).then_some(()))
    })?;
    ensure!(device(&controller, "pi-001")?.is_some_and(|d| d["connected"] == false), "still refused");

    // Enrolling the same id again with a fresh token is refused too.
    let again = controller.bootstrap_token(1, "lab")?;
    let refused = enroll(dir.path(), &setup(&controller, "pi-001", &again, &fake, &trust)?)?;
    let message = refused.err().context("re-enrolling a decommissioned id must fail")?;
    ensure!(message.contains("decommissioned"), "{message}");
    Ok(())
}

#[test]
fn stolen_bootstrap_tokens_past_their_uses_or_expiry_and_claimed_ids_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = harness::start_controller(dir.path(), &[])?;
    let fake = binary("fake-llama-server")?;
    // Only enrollment and sessions here: the trust policy names a key file nothing is signed with.
    let trust = harness::write_trust_policy(dir.path(), &dir.path().join("unused.pub"))?;

    // One use: the first device gets it, a thief with the same token does not.
    let token = controller.bootstrap_token(1, "lab")?;
    enroll(dir.path(), &setup(&controller, "pi-001", &token, &fake, &trust)?)?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let thief = enroll(dir.path(), &setup(&controller, "thief-1", &token, &fake, &trust)?)?;
    let message = thief.err().context("a used-up token must be refused")?;
    ensure!(message.contains("used as many times as it allows"), "{message}");

    // A device id with a live certificate cannot be claimed again, even with a valid token.
    let fresh = controller.bootstrap_token(5, "lab")?;
    let twice = enroll(dir.path(), &setup(&controller, "pi-001", &fresh, &fake, &trust)?)?;
    let message = twice.err().context("claiming an enrolled id must be refused")?;
    ensure!(message.contains("already enrolled"), "{message}");

    // Expiry: a token valid for one second is refused once it has passed.
    let short = controller.alkictl_json(&["enroll", "token", "create", "--uses", "5", "--expires", "1s"])?;
    let short = short["secret"].as_str().context("secret")?.to_owned();
    let mut attempt = 0;
    let message = wait_for("the one-second token to expire", Duration::from_secs(30), &[&controller.proc], || {
        attempt += 1;
        let id = format!("late-{attempt}");
        match enroll(dir.path(), &setup(&controller, &id, &short, &fake, &trust)?)? {
            Ok(_) => Ok(None),
            Err(message) => Ok(Some(message)),
        }
    })?;
    ensure!(message.contains("expired"), "{message}");

    // A revoked token is refused; the list shows every token's state and never a secret.
    let tokens = controller.alkictl_json(&["enroll", "token", "list"])?;
    let usable = tokens.as_array().and_then(|ts| ts.iter().find(|t| t["state"] == "usable")).context("usable")?;
    let id = usable["id"].as_str().context("id")?.to_owned();
    controller.alkictl_json(&["enroll", "token", "revoke", &id])?;
    let listed = controller.alkictl_json(&["enroll", "token", "list"])?.to_string();
    ensure!(!listed.contains(&fresh) && !listed.contains("alkienroll_"), "no secrets in the list: {listed}");
    let revoked = enroll(dir.path(), &setup(&controller, "pi-009", &fresh, &fake, &trust)?)?;
    ensure!(revoked.err().is_some_and(|m| m.contains("revoked")), "a revoked token is refused");

    // The agent's session with its certificate works; a Hello from an agent without one is refused.
    let agent = harness::start_agent(dir.path(), &setup(&controller, "pi-001", &token, &fake, &trust)?)?;
    wait_for("the enrolled agent to connect", Duration::from_secs(30), &[&controller.proc, &agent], || {
        Ok(device(&controller, "pi-001")?.filter(|d| d["connected"] == true))
    })?;
    let _keep: &Proc = &agent;
    Ok(())
}

#[test]
fn an_agent_enrolls_on_first_start_and_renews_its_certificate_without_an_operator() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Six-second certificates: the agent renews at two thirds of that, again and again.
    let controller = harness::start_controller(dir.path(), &["--device-cert-validity-secs", "6"])?;
    let fake = binary("fake-llama-server")?;
    let trust = harness::write_trust_policy(dir.path(), &dir.path().join("unused.pub"))?;
    let token = controller.bootstrap_token(1, "lab")?;
    let agent_setup = setup(&controller, "pi-renew", &token, &fake, &trust)?;
    let mut agent = harness::start_agent(dir.path(), &agent_setup)?;
    wait_for(
        "the agent to enroll on first start and connect",
        Duration::from_secs(30),
        &[&controller.proc, &agent],
        || Ok(device(&controller, "pi-renew")?.filter(|d| d["connected"] == true)),
    )?;
    let cert = harness::agent_dir(dir.path(), "pi-renew").join("data/identity/device.crt");
    let first = std::fs::read_to_string(&cert)?;
    // Two renewals: the second is made over mTLS with the first renewed certificate, after the original expired.
    let mut seen = vec![first];
    wait_for("two renewals", Duration::from_secs(60), &[&controller.proc, &agent], || {
        let now = std::fs::read_to_string(&cert)?;
        if !seen.contains(&now) {
            seen.push(now);
        }
        Ok((seen.len() >= 3).then_some(()))
    })?;
    // The agent logs a renewal after it has written the certificate: wait for the line, don't race it.
    wait_for("two renewals in the agent's log", Duration::from_secs(10), &[&controller.proc, &agent], || {
        let log = std::fs::read_to_string(&agent.log)?;
        Ok((log.matches("Renewed the device certificate").count() >= 2).then_some(()))
    })?;
    // A restarted agent connects with the renewed certificate (the enrolled one expired long ago).
    agent.stop(Duration::from_secs(10))?;
    let agent = harness::start_agent(dir.path(), &agent_setup)?;
    wait_for("the restarted agent to reconnect", Duration::from_secs(30), &[&controller.proc, &agent], || {
        Ok(device(&controller, "pi-renew")?.filter(|d| d["connected"] == true))
    })?;
    Ok(())
}
