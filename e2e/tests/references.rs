//! Every reference alkictl prints is accepted back by every command that takes one, with the real binaries
//! over TLS: `bundle push`'s `HOST:PORT/REPOSITORY:TAG`, `bundle sign`'s `HOST:PORT/REPOSITORY@DIGEST`, a
//! rollout's candidate (the same form, as devices show what they run), the same without its registry, and
//! `runtime push`'s reference and pinned reference, each given to `bundle inspect`, `bundle sign`, `bundle
//! push`, `rollout create`, `bench recommend` and `bundle pack --runtime-build`; and `eval push`'s reference
//! and pinned reference of an eval suite (and a rollout's pinned suite), each given to `eval inspect`, `bundle
//! sign`, `eval run`, `eval list`, `rollout create --eval-suite`, `bench calibrate --suite` and `bench
//! recommend --suite`.

mod quality_support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use alki_e2e::harness::{self, Controller, binary, run};
use anyhow::{Context as _, ensure};
use serde_json::Value;

fn text(value: &Value, field: &str) -> anyhow::Result<String> {
    value[field].as_str().map(str::to_owned).with_context(|| format!("no {field} in {value}"))
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a UTF-8 path")
}

/// A rollout of `bundle` to no device (its own selector, so rollouts never overlap); returns its candidate.
fn rollout_candidate(controller: &Controller, bundle: &str, site: &str) -> anyhow::Result<String> {
    let selector = format!("site={site}");
    let rollout = controller.alkictl_json(&["rollout", "create", "--bundle", bundle, "--selector", &selector])?;
    text(&rollout, "candidate")
}

/// A controller trusting a fresh key, and the tiny model packed as `acme/gemma:v1` (not pushed).
struct Setup {
    dir: tempfile::TempDir,
    key: harness::SigningKey,
    controller: Controller,
    model: std::path::PathBuf,
    layout: std::path::PathBuf,
}

fn setup() -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let key = harness::generate_key(dir.path(), "release")?;
    let controller = harness::start_controller(dir.path(), &["--trusted-key", path(&key.public_key)?])?;
    let model = dir.path().join("gemma.gguf");
    run(Command::new(binary("make-tiny-model")?).arg("--out").arg(&model).args(["--name", "gemma"]))?;
    let layout = dir.path().join("layout");
    controller.alkictl_json(&["bundle", "pack", path(&model)?, "--out", path(&layout)?, "--tag", "v1"])?;
    Ok(Setup { dir, key, controller, model, layout })
}

#[test]
fn every_bundle_reference_alkictl_prints_is_accepted_back() -> anyhow::Result<()> {
    let Setup { dir, key, controller, model, layout } = setup()?;
    let public = path(&key.public_key)?;
    let registry = controller.registry.clone();

    // bundle push prints HOST:PORT/REPOSITORY:TAG.
    let pushed = controller.alkictl_json(&["bundle", "push", path(&layout)?, "acme/gemma:v1"])?;
    let (pushed_ref, digest) = (text(&pushed, "reference")?, text(&pushed, "digest")?);
    ensure!(pushed_ref == format!("{registry}/acme/gemma:v1"), "{pushed}");
    let inspected = controller.alkictl_json(&["bundle", "inspect", &pushed_ref])?;
    ensure!(inspected["digest"] == digest.as_str(), "inspect {pushed_ref}: {inspected}");
    // ... and bundle push takes its own form as a target.
    let again = controller.alkictl_json(&["bundle", "push", path(&layout)?, &format!("{registry}/acme/gemma:v2")])?;
    ensure!(again["reference"] == format!("{registry}/acme/gemma:v2").as_str(), "{again}");

    // bundle sign takes push's form and prints HOST:PORT/REPOSITORY@DIGEST.
    let signed = controller.sign(&pushed_ref, &key)?;
    let signed_ref = text(&signed, "reference")?;
    ensure!(signed_ref == format!("{registry}/acme/gemma@{digest}"), "{signed}");
    let inspected = controller.alkictl_json(&["bundle", "inspect", &signed_ref, "--key", public])?;
    ensure!(inspected["verified"] == true, "inspect {signed_ref}: {inspected}");

    // rollout create takes both; its candidate (as devices print what they run) and the same without the
    // registry are accepted back by rollout create, bundle inspect and bench recommend.
    let candidate = rollout_candidate(&controller, &pushed_ref, "refs-pushed")?;
    ensure!(candidate == signed_ref, "the candidate is pinned where it was pushed: {candidate}");
    let bare = format!("acme/gemma@{digest}");
    for (reference, site) in [(&signed_ref, "refs-signed"), (&bare, "refs-bare")] {
        let pinned = rollout_candidate(&controller, reference, site)?;
        ensure!(pinned == candidate, "rollout create --bundle {reference}: {pinned}");
    }
    let inspected = controller.alkictl_json(&["bundle", "inspect", &bare])?;
    ensure!(inspected["digest"] == digest.as_str(), "inspect {bare}: {inspected}");
    for reference in [&pushed_ref, &signed_ref, &bare] {
        controller
            .alkictl_json(&["bench", "recommend", reference])
            .with_context(|| format!("recommend {reference}"))?;
    }

    runtime_build_references(&controller, dir.path(), &key, &model)
}

#[test]
fn every_eval_suite_reference_alkictl_prints_is_accepted_back() -> anyhow::Result<()> {
    let Setup { dir, key, controller, layout, .. } = setup()?;
    let public = path(&key.public_key)?;
    let registry = controller.registry.clone();
    controller.alkictl_json(&["bundle", "push", path(&layout)?, "acme/gemma:v1"])?;
    controller.sign("acme/gemma:v1", &key)?;
    let suite = quality_support::write_suite(
        &dir.path().join("suite"),
        &quality_support::SMOKE,
        &quality_support::lenient_prompts(),
    )?;

    // eval push prints HOST:PORT/REPOSITORY:TAG and the pinned HOST:PORT/REPOSITORY@DIGEST, and takes its own
    // form as a target.
    let pushed = controller.alkictl_json(&["eval", "push", path(&suite)?, "acme/evals:v1"])?;
    let (reference, pinned, digest) = (text(&pushed, "reference")?, text(&pushed, "pinned")?, text(&pushed, "digest")?);
    ensure!(reference == format!("{registry}/acme/evals:v1"), "{pushed}");
    ensure!(pinned == format!("{registry}/acme/evals@{digest}"), "{pushed}");
    let again = controller.alkictl_json(&["eval", "push", path(&suite)?, &format!("{registry}/acme/evals:v2")])?;
    ensure!(again["digest"] == digest.as_str(), "the same suite, the same digest: {again}");

    // bundle sign takes the suite as push printed it and prints the pinned form.
    let signed = controller.sign(&reference, &key)?;
    ensure!(text(&signed, "reference")? == pinned, "{signed}");
    ensure!(signed["signatures"][0]["what"] == "suite", "{signed}");

    let bare = format!("acme/evals@{digest}");
    let mut forms = vec![reference.clone(), pinned.clone(), bare];
    // A rollout pins the suite; the form it prints is accepted back too.
    let rollout = controller.alkictl_json(&[
        "rollout",
        "create",
        "--bundle",
        "acme/gemma:v1",
        "--selector",
        "site=refs-suite",
        "--eval-suite",
        &reference,
    ])?;
    let rollout_suite = text(&rollout, "eval_suite")?;
    ensure!(rollout_suite.ends_with(&digest), "the rollout pins the suite: {rollout}");
    forms.push(rollout_suite);
    for (i, form) in forms.iter().enumerate() {
        let inspected = controller.alkictl_json(&["eval", "inspect", form, "--key", public])?;
        ensure!(inspected["digest"] == digest.as_str() && inspected["verified"] == true, "inspect {form}: {inspected}");
        controller
            .alkictl_json(&["eval", "list", "--suite", form])
            .with_context(|| format!("eval list --suite {form}"))?;
        let site = format!("site=refs-suite-{i}");
        let pinned_again = controller.alkictl_json(&[
            "rollout",
            "create",
            "--bundle",
            "acme/gemma:v1",
            "--selector",
            &site,
            "--eval-suite",
            form,
        ])?;
        ensure!(
            pinned_again["eval_suite"].as_str().is_some_and(|s| s.ends_with(&digest)),
            "--eval-suite {form}: {pinned_again}"
        );
        for args in [
            &["eval", "run", "--bundle", "acme/gemma:v1", "--suite", form, "--selector", &site][..],
            &["bench", "calibrate", "acme/gemma:v1", "--suite", form, "--selector", &site],
            &["bench", "recommend", "acme/gemma:v1", "--suite", form, "--max-kld", "0.05"],
        ] {
            controller.alkictl_json(args).with_context(|| format!("alkictl {args:?}"))?;
        }
    }
    Ok(())
}

/// `runtime push` prints a reference (signed as printed) and a pinned reference (inspected, and named by
/// `bundle pack --runtime-build`).
fn runtime_build_references(
    controller: &Controller,
    dir: &Path,
    key: &harness::SigningKey,
    model: &Path,
) -> anyhow::Result<()> {
    let build = dir.join("build");
    std::fs::create_dir_all(&build)?;
    let server = build.join("llama-server");
    std::fs::write(&server, "#!/bin/sh\necho 'version: 1 (e2e)' >&2\n")?;
    std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755))?;
    let arch = alki_shared::bundle::oci_architecture(std::env::consts::ARCH);
    let platform = format!("linux/{arch}={}", path(&build)?);
    let pushed = controller.alkictl_json(&["runtime", "push", "acme/llama-server:b1", "--platform", &platform])?;
    let (reference, pinned) = (text(&pushed, "reference")?, text(&pushed, "pinned")?);
    ensure!(reference == format!("{}/acme/llama-server:b1", controller.registry), "{pushed}");
    controller.sign(&reference, key)?;
    let inspected = controller.alkictl_json(&["bundle", "inspect", &pinned, "--key", path(&key.public_key)?])?;
    ensure!(inspected["verified"] == true, "inspect {pinned}: {inspected}");
    let layout = dir.join("with-build");
    let args = ["bundle", "pack", path(model)?, "--out", path(&layout)?, "--runtime-build", &pinned];
    let packed = controller.alkictl_json(&args)?;
    ensure!(packed["digest"].is_string(), "{packed}");
    Ok(())
}
