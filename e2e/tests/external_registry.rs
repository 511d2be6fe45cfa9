//! An external registry end to end: alkictl pushes a bundle to CNCF distribution (Debian's
//! `docker-registry`) on loopback; the controller, started with `--external-registry`, resolves the tag
//! there and pins the rollout's candidate by digest; the agent (real binary, fake llama-server) pulls from
//! distribution through a mirror list whose first entry is down, falls back to the origin, and reaches
//! ACTIVE. The agent's token is never sent to distribution (it has no auth here; the unit tests in
//! `agent/src/pull.rs` pin where credentials go). Bundles are signed in distribution with `alkictl bundle
//! sign`; the controller checks the signature there and the agent verifies it from whichever source serves.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alki_e2e::harness::{self, AgentSetup, Proc, binary, free_port, run, wait_for};
use alki_e2e::registries::Distribution;
use anyhow::{Context as _, ensure};
use serde_json::Value;

struct Fleet {
    dir: tempfile::TempDir,
    controller: harness::Controller,
    key: harness::SigningKey,
}

impl Fleet {
    fn alkictl_json(&self, registry: &str, args: &[&str]) -> anyhow::Result<Value> {
        let c = &self.controller;
        let mut cmd = Command::new(binary("alkictl")?);
        cmd.args(["--controller", &c.grpc, "--registry", registry]).arg("--token-file").arg(&c.token_file);
        cmd.arg("--ca-file").arg(&c.ca_file);
        let out = run(cmd.args(args).args(["-o", "json"]))?;
        serde_json::from_str(&out).with_context(|| format!("alkictl {args:?} printed non-JSON: {out}"))
    }

    /// Signs `reference` in the (plain HTTP) registry `host` with the fleet's key.
    fn sign(&self, host: &str, reference: &str) -> anyhow::Result<()> {
        self.sign_with(host, reference, &[])
    }

    /// Like [`Fleet::sign`] with extra global flags (a registry login).
    fn sign_with(&self, host: &str, reference: &str, extra: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new(binary("alkictl")?);
        cmd.args(extra);
        cmd.args(["--registry", host, "bundle", "sign", reference, "--insecure-plain-http", "--key"])
            .arg(&self.key.private_key)
            .env("ALKI_KEY_PASSWORD", &self.key.password);
        run(&mut cmd)?;
        Ok(())
    }
}

fn start_controller(external: &str) -> anyhow::Result<(Fleet, String)> {
    start_controller_with(|_| {
        Ok(vec!["--external-registry".into(), external.into(), "--external-registry-plain-http".into()])
    })
}

/// Starts the controller trusting the fleet's key, with the external-registry flags `registry_args` returns
/// (given the fleet's directory, for files they name).
fn start_controller_with(
    registry_args: impl FnOnce(&Path) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<(Fleet, String)> {
    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let mut args = registry_args(dir.path())?;
    args.extend(["--trusted-key".into(), path(&key.public_key)?.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let controller = harness::start_controller(dir.path(), &args)?;
    let embedded = controller.registry.clone();
    Ok((Fleet { dir, controller, key }, embedded))
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Starts the real agent (with the fake llama-server) labelled `site = <site>`, with `registry` as the body
/// of its `[registry]` section.
fn start_agent(fleet: &Fleet, _embedded: &str, id: &str, site: &str, registry: &str) -> anyhow::Result<Proc> {
    let bootstrap = fleet.controller.bootstrap_token(1, site)?;
    let trust_policy = harness::write_trust_policy(fleet.dir.path(), &fleet.key.public_key)?;
    let setup = AgentSetup {
        device_id: id,
        site,
        controller: &fleet.controller.grpc,
        ca_file: &fleet.controller.ca_file,
        bootstrap_token: &bootstrap,
        registry,
        llama_server: &binary("fake-llama-server")?,
        front_port: free_port()?,
        health_timeout_secs: 30,
        trust_policy: &trust_policy,
        runtime_extra: "",
    };
    harness::start_agent(fleet.dir.path(), &setup)
}

/// Packs a tiny model into a bundle layout; returns the layout and the bundle's digest.
fn pack(fleet: &Fleet, embedded: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
    let model = fleet.dir.path().join("tiny.gguf");
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(&model).args(["--name", "alki-tiny"]))?;
    let layout = fleet.dir.path().join("bundle");
    let packed = fleet.alkictl_json(embedded, &["bundle", "pack", path(&model)?, "--out", path(&layout)?])?;
    Ok((layout, packed["digest"].as_str().context("no digest from pack")?.to_owned()))
}

fn device(fleet: &Fleet, embedded: &str, id: &str) -> anyhow::Result<Option<Value>> {
    let devices = fleet.alkictl_json(embedded, &["devices", "list"])?;
    Ok(devices.as_array().and_then(|ds| ds.iter().find(|d| d["id"] == id)).cloned())
}

#[test]
fn an_agent_pulls_a_rollout_from_distribution_through_a_mirror_list_whose_first_mirror_is_down() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let distribution = Distribution::start(&work.path().join("distribution"))?;
    let external = distribution.host();
    let (fleet, embedded) = start_controller(&external)?;

    // Pack and push to distribution.
    let (layout, bundle_digest) = pack(&fleet, &embedded)?;
    let pushed =
        fleet.alkictl_json(&external, &["bundle", "push", path(&layout)?, "acme/tiny:v1", "--insecure-plain-http"])?;
    assert_eq!(pushed["digest"], bundle_digest.as_str());
    fleet.sign(&external, "acme/tiny:v1")?;

    // An agent whose first mirror for distribution is down (nothing listens there).
    let down_mirror = format!("127.0.0.1:{}", free_port()?);
    let registry_section = format!(
        "insecure_plain_http = [\"{external}\", \"{down_mirror}\"]\nmirrors = {{ \"{external}\" = [\"{down_mirror}\"] }}"
    );
    let agent = start_agent(&fleet, &embedded, "pi-ext", "ext", &registry_section)?;
    let procs = [&fleet.controller.proc, &agent];
    let device = |id: &str| device(&fleet, &embedded, id);
    wait_for("the agent to connect", Duration::from_secs(30), &procs, || {
        Ok(device("pi-ext")?.filter(|d| d["connected"] == true))
    })?;

    // A tag distribution does not have is refused when the rollout is created.
    let missing = fleet.alkictl_json(
        &embedded,
        &["rollout", "create", "--bundle", &format!("{external}/acme/tiny:nope"), "--selector", "site=ext"],
    );
    let message = format!("{:#}", missing.expect_err("an unknown tag in the external registry is refused"));
    ensure!(message.contains("not in the registry") || message.contains("not found"), "{message}");

    let rollout = fleet.alkictl_json(
        &embedded,
        &["rollout", "create", "--bundle", &format!("{external}/acme/tiny:v1"), "--selector", "site=ext"],
    )?;
    let rollout_id = rollout["id"].as_str().context("no rollout id")?.to_owned();
    let active =
        wait_for("the agent to activate the bundle from distribution", Duration::from_secs(120), &procs, || {
            Ok(device("pi-ext")?.filter(|d| {
                d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest))
            }))
        })?;
    let running = active["running"].as_str().unwrap_or_default();
    ensure!(running.starts_with(&format!("{external}/acme/tiny")), "the agent runs distribution's bundle: {active}");
    let log = agent.log_tail();
    ensure!(log.contains("trying the next source"), "the agent fell back from the down mirror:\n{log}");
    let stored = distribution.storage().join("docker/registry/v2/repositories/acme/tiny");
    ensure!(stored.is_dir(), "the bundle lives in distribution's storage");

    wait_for("the rollout to complete", Duration::from_secs(30), &procs, || {
        let r = fleet.alkictl_json(&embedded, &["rollout", "get", &rollout_id])?;
        Ok((r["state"] == "completed").then_some(()))
    })?;

    // By digest too: the controller checks the bytes it gets against it.
    let by_digest = fleet.alkictl_json(
        &embedded,
        &["rollout", "create", "--bundle", &format!("{external}/acme/tiny@{bundle_digest}"), "--selector", "site=ext"],
    )?;
    ensure!(by_digest.to_string().contains(&bundle_digest), "pinned to the digest asked for: {by_digest}");
    Ok(())
}

#[test]
fn a_site_mirror_serves_the_bundle_when_the_origin_registry_is_gone() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let origin = Distribution::start(&work.path().join("origin"))?;
    let mirror = Distribution::start(&work.path().join("mirror"))?;
    let (origin_host, mirror_host) = (origin.host(), mirror.host());
    let (fleet, embedded) = start_controller(&origin_host)?;
    let (layout, bundle_digest) = pack(&fleet, &embedded)?;
    for host in [&origin_host, &mirror_host] {
        fleet.alkictl_json(host, &["bundle", "push", path(&layout)?, "acme/tiny:v1", "--insecure-plain-http"])?;
        fleet.sign(host, "acme/tiny:v1")?;
    }
    let registry_section = format!(
        "insecure_plain_http = [\"{origin_host}\", \"{mirror_host}\"]\nmirrors = {{ \"{origin_host}\" = [\"{mirror_host}\"] }}"
    );
    let agent = start_agent(&fleet, &embedded, "pi-site", "site", &registry_section)?;
    let procs = [&fleet.controller.proc, &agent];
    wait_for("the agent to connect", Duration::from_secs(30), &procs, || {
        Ok(device(&fleet, &embedded, "pi-site")?.filter(|d| d["connected"] == true))
    })?;
    // The controller pins the tag at the origin; then the origin goes away and only the mirror is left.
    fleet.alkictl_json(
        &embedded,
        &["rollout", "create", "--bundle", &format!("{origin_host}/acme/tiny:v1"), "--selector", "site=site"],
    )?;
    drop(origin);
    let active =
        wait_for("the agent to activate the bundle from the mirror", Duration::from_secs(120), &procs, || {
            Ok(device(&fleet, &embedded, "pi-site")?.filter(|d| {
                d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest))
            }))
        })?;
    let running = active["running"].as_str().unwrap_or_default();
    ensure!(running.starts_with(&format!("{origin_host}/")), "the reference still names the origin: {active}");
    let log = agent.log_tail();
    ensure!(!log.contains("trying the next source"), "the first source (the mirror) served everything:\n{log}");
    Ok(())
}

/// A registry with its own accounts: CI pushes and signs with one login, the controller pins the tag with
/// the login its `--external-registries-file` names, the agent pulls with the credentials in its own config,
/// and nobody's Alki token is what gets them in. The pinned bundle is then listed by the controller.
#[test]
fn a_registry_with_its_own_login_is_used_with_each_party_s_credentials() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let distribution = Distribution::start_with_login(&work.path().join("distribution"), "site", "site-secret")?;
    let external = distribution.host();
    let password_file = work.path().join("site.password");
    std::fs::write(&password_file, "site-secret\n")?;
    let (fleet, embedded) = start_controller_with(|dir| {
        let file = dir.join("registries.toml");
        std::fs::write(
            &file,
            format!(
                "[[registry]]\nhost = \"{external}\"\nplain_http = true\nusername = \"site\"\npassword_file = \"{}\"\n",
                password_file.display()
            ),
        )?;
        Ok(vec!["--external-registries-file".into(), path(&file)?.into()])
    })?;
    let (layout, bundle_digest) = pack(&fleet, &embedded)?;

    // Without the registry's login, alkictl's token does not get in, and the error says so.
    let refused =
        fleet.alkictl_json(&external, &["bundle", "push", path(&layout)?, "acme/tiny:v1", "--insecure-plain-http"]);
    let message = format!("{:#}", refused.expect_err("the registry wants its own login"));
    ensure!(message.contains("refused the credentials"), "{message}");

    let login = ["--registry-username", "site", "--registry-password-file", path(&password_file)?];
    let push = [&login[..], &["bundle", "push", path(&layout)?, "acme/tiny:v1", "--insecure-plain-http"]].concat();
    let pushed = fleet.alkictl_json(&external, &push)?;
    assert_eq!(pushed["digest"], bundle_digest.as_str());
    fleet.sign_with(&external, "acme/tiny:v1", &login)?;

    let credentials = format!(
        "insecure_plain_http = [\"{external}\"]\n[registry.credentials.\"{external}\"]\nusername = \"site\"\npassword_file = \"{}\"",
        password_file.display()
    );
    let agent = start_agent(&fleet, &embedded, "pi-login", "login", &credentials)?;
    let procs = [&fleet.controller.proc, &agent];
    wait_for("the agent to connect", Duration::from_secs(30), &procs, || {
        Ok(device(&fleet, &embedded, "pi-login")?.filter(|d| d["connected"] == true))
    })?;
    fleet.alkictl_json(
        &embedded,
        &["rollout", "create", "--bundle", &format!("{external}/acme/tiny:v1"), "--selector", "site=login"],
    )?;
    wait_for("the agent to activate the bundle from the login registry", Duration::from_secs(120), &procs, || {
        Ok(device(&fleet, &embedded, "pi-login")?
            .filter(|d| d["phase"] == "active" && d["running"].as_str().is_some_and(|r| r.ends_with(&bundle_digest))))
    })?;

    // The controller lists the bundle it pinned there, with its registry and variants.
    let bundles = fleet.alkictl_json(&embedded, &["bundle", "list"])?;
    let listed = bundles
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["registry"] == external.as_str() && b["digest"] == bundle_digest.as_str()))
        .with_context(|| format!("the pinned external bundle is listed: {bundles}"))?;
    ensure!(listed["repository"] == "acme/tiny" && listed["tags"][0] == "v1", "{listed}");
    ensure!(listed["variants"].as_array().is_some_and(|v| !v.is_empty()), "variants are shown: {listed}");
    Ok(())
}
