//! Interop with real registry clients and servers: Debian's skopeo and the PyPI oras client against the
//! controller's registry (started in-process on 127.0.0.1:0), and alkictl's push against CNCF
//! distribution (Debian's docker-registry) on loopback. A missing tool fails its test with the command
//! that installs it; CI installs them all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_controller::config::ControllerConfig;
use alki_e2e::registries::{Distribution, require_tool};
use alki_e2e::tiny_model::{TinyModelOptions, synthetic_tokenizer, write_tiny_model};
use alki_shared::digest::Digest;
use alki_shared::oci::{MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, Manifest};
use alkictl::{parse_from, run};
use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

/// Every test is bounded; child processes are killed when a timed-out test drops them.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

async fn bounded(test: impl Future<Output = anyhow::Result<()>>) {
    match tokio::time::timeout(TEST_TIMEOUT, test).await {
        Ok(result) => result.unwrap_or_else(|e| panic!("{e:#}")),
        Err(_) => panic!("test timed out after {TEST_TIMEOUT:?}"),
    }
}

/// The controller, in-process, with its HTTP (registry) listener on 127.0.0.1:0.
struct Controller {
    dir: tempfile::TempDir,
    /// host:port of the registry.
    host: String,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Controller {
    async fn start() -> anyhow::Result<Controller> {
        let dir = tempfile::tempdir()?;
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let host = http.local_addr()?.to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut config = ControllerConfig::new(dir.path().to_owned());
        // A scripted agent over plaintext with a token of role agent: the TLS and enrollment paths are
        // covered by tests/enroll.rs and e2e/tests/enrollment.rs.
        config.insecure_plaintext = true;
        config.insecure_agent_tokens = true;
        let task = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
            let _ = stopped.await;
        }));
        let token_path = dir.path().join("admin.token");
        let admin = loop {
            if let Ok(t) = tokio::fs::read_to_string(&token_path).await
                && !t.trim().is_empty()
            {
                break t.trim().to_owned();
            }
            if task.is_finished() {
                bail!("the controller stopped before writing {}", token_path.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(Controller { dir, host, admin, stop: Some(stop), task })
    }

    /// The bytes the registry stores for `repository`'s `reference`, as GET returns them.
    async fn manifest(&self, repository: &str, reference: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("http://{}/v2/{repository}/manifests/{reference}", self.host);
        let resp = reqwest::Client::new().get(&url).bearer_auth(&self.admin).send().await?;
        ensure!(resp.status() == 200, "GET {url} answered {}", resp.status());
        Ok(resp.bytes().await?.to_vec())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await.context("controller shutdown")???;
        drop(self.dir);
        Ok(())
    }
}

/// Writes a tiny GGUF and packs it with alkictl's code into an OCI layout `<work>/<name>` tagged `tag`.
async fn pack_bundle(work: &Path, name: &str, tag: &str) -> anyhow::Result<PathBuf> {
    let model = work.join(format!("{name}.gguf"));
    write_tiny_model(&model, &TinyModelOptions::default(), &synthetic_tokenizer(64))?;
    let layout = work.join(name);
    let (model_arg, layout_arg) = (model.display().to_string(), layout.display().to_string());
    let args = ["alkictl", "-o", "json", "bundle", "pack", &model_arg, "--out", &layout_arg, "--tag", tag];
    run(parse_from(args.into_iter().chain(["--license", "Apache-2.0", "--context", "512"]))?)
        .await
        .context("alkictl bundle pack")?;
    Ok(layout)
}

/// Every blob of an OCI layout, by digest.
fn layout_blobs(layout: &Path) -> anyhow::Result<BTreeMap<Digest, Vec<u8>>> {
    let dir = layout.join("blobs/sha256");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let digest: Digest = format!("sha256:{name}").parse().with_context(|| format!("blob file {name}"))?;
        let bytes = std::fs::read(entry.path())?;
        ensure!(Digest::of(&bytes) == digest, "{} does not hash to its name", entry.path().display());
        out.insert(digest, bytes);
    }
    Ok(out)
}

/// The descriptor `index.json` of a layout names by `org.opencontainers.image.ref.name` = `tag`.
fn tagged(layout: &Path, tag: &str) -> anyhow::Result<Digest> {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifests = index["manifests"].as_array().context("index.json has no manifests")?;
    let found = manifests.iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag);
    let digest =
        found.and_then(|m| m["digest"].as_str()).with_context(|| format!("no tag {tag} in {}", layout.display()))?;
    Ok(digest.parse()?)
}

/// Runs a tool to completion (killed if the test times out) and returns its stdout; fails with its stderr.
async fn tool(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let mut command = tokio::process::Command::new(program);
    command.args(args).envs(envs.iter().copied()).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = command.output().await.with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn skopeo() -> anyhow::Result<PathBuf> {
    require_tool("skopeo", "apt-get install -y skopeo")
}

/// The index with image-spec 1.1's `artifactType` removed everywhere: what skopeo 1.9.3 (containers/image
/// 5.23, which predates the field) writes when it re-serialises an index during `copy --all`.
fn without_artifact_type(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        object.remove("artifactType");
        for (_, v) in object.iter_mut() {
            *v = without_artifact_type(v.take());
        }
    } else if let Some(array) = value.as_array_mut() {
        for v in array.iter_mut() {
            *v = without_artifact_type(v.take());
        }
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_round_trips_a_model_manifest_through_our_registry_byte_identical() {
    bounded(async {
        let skopeo = skopeo()?;
        let c = Controller::start().await?;
        let work = tempfile::tempdir()?;
        let bundle = pack_bundle(work.path(), "bundle", "v1").await?;
        // A layout whose tag names the variant (an image manifest) rather than the bundle's index.
        let index =
            Manifest::parse(&std::fs::read(bundle.join("blobs/sha256").join(tagged(&bundle, "v1")?.hex()))?, None)?;
        let Manifest::Index(index) = index else { bail!("the packed bundle is not an index") };
        let variant = index.manifests.first().context("the bundle lists no variant")?.clone();
        let source = work.path().join("variant-layout");
        std::fs::create_dir_all(source.join("blobs"))?;
        std::fs::copy(bundle.join("oci-layout"), source.join("oci-layout"))?;
        let mut entry = serde_json::to_value(&variant)?;
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "variant"});
        let layout_index =
            serde_json::json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_IMAGE_INDEX, "manifests": [entry]});
        std::fs::write(source.join("index.json"), serde_json::to_vec(&layout_index)?)?;
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(bundle.join("blobs/sha256"))
            .arg(source.join("blobs"))
            .status()?;
        ensure!(status.success(), "copying the layout's blobs");

        let creds = format!("alki:{}", c.admin);
        let dest = format!("docker://{}/acme/tiny:variant", c.host);
        let src = format!("oci:{}:variant", source.display());
        tool(&skopeo, &["copy", "--dest-creds", &creds, "--dest-tls-verify=false", &src, &dest], &[]).await?;

        // skopeo inspect --raw answers the manifest byte for byte as packed, and so does the registry.
        let packed = std::fs::read(source.join("blobs/sha256").join(variant.digest.hex()))?;
        let raw = tool(&skopeo, &["inspect", "--raw", "--creds", &creds, "--tls-verify=false", &dest], &[]).await?;
        ensure!(
            raw == packed,
            "skopeo inspect --raw differs from the packed manifest:\n{}",
            String::from_utf8_lossy(&raw)
        );
        ensure!(c.manifest("acme/tiny", "variant").await? == packed, "the registry stores the manifest byte-exact");
        ensure!(c.manifest("acme/tiny", variant.digest.as_str()).await? == packed, "and by digest");

        // Back out into a new layout: every blob, the manifest included, is byte-identical.
        let back = work.path().join("back");
        let back_ref = format!("oci:{}:variant", back.display());
        tool(&skopeo, &["copy", "--src-creds", &creds, "--src-tls-verify=false", &dest, &back_ref], &[]).await?;
        ensure!(tagged(&back, "variant")? == variant.digest, "the copied-back layout names the same manifest");
        let original = layout_blobs(&source)?;
        let copied = layout_blobs(&back)?;
        let Manifest::Image(image) = Manifest::parse(&packed, Some(MEDIA_TYPE_IMAGE_MANIFEST))? else {
            bail!("the variant is not an image manifest")
        };
        let expected: Vec<&Digest> = std::iter::once(&variant.digest)
            .chain(std::iter::once(&image.config.digest))
            .chain(image.layers.iter().map(|l| &l.digest))
            .collect();
        ensure!(copied.len() == expected.len(), "copied back {} blobs, expected {}", copied.len(), expected.len());
        for digest in expected {
            let (Some(a), Some(b)) = (original.get(digest), copied.get(digest)) else {
                bail!("blob {digest} missing after the round trip")
            };
            ensure!(a == b, "blob {digest} changed in the round trip");
        }
        c.stop().await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_a_whole_bundle_index_into_our_registry_and_back() {
    bounded(async {
        let skopeo = skopeo()?;
        let c = Controller::start().await?;
        let work = tempfile::tempdir()?;
        let bundle = pack_bundle(work.path(), "bundle", "v1").await?;
        let index_digest = tagged(&bundle, "v1")?;
        let creds = format!("alki:{}", c.admin);
        let dest = format!("docker://{}/acme/tiny:v1", c.host);
        let src = format!("oci:{}:v1", bundle.display());
        tool(&skopeo, &["copy", "--all", "--dest-creds", &creds, "--dest-tls-verify=false", &src, &dest], &[]).await?;

        let stored = c.manifest("acme/tiny", "v1").await?;
        let raw = tool(&skopeo, &["inspect", "--raw", "--creds", &creds, "--tls-verify=false", &dest], &[]).await?;
        ensure!(raw == stored, "skopeo inspect --raw answers exactly the bytes the registry stores");

        let back = work.path().join("back");
        let back_ref = format!("oci:{}:v1", back.display());
        tool(&skopeo, &["copy", "--all", "--src-creds", &creds, "--src-tls-verify=false", &dest, &back_ref], &[])
            .await?;
        let original = layout_blobs(&bundle)?;
        let copied = layout_blobs(&back)?;
        let back_index = tagged(&back, "v1")?;
        let copied_index = copied.get(&back_index).context("the copied-back layout lacks its index")?;
        ensure!(*copied_index == stored, "the index copied back is the one the registry stores");
        // Variants, configs and weights are byte-identical. The index is too, unless skopeo rewrote it on
        // the way in; then it differs only by the `artifactType` fields skopeo 1.9.3 does not know.
        for (digest, bytes) in &original {
            if *digest == index_digest {
                continue;
            }
            ensure!(copied.get(digest) == Some(bytes), "blob {digest} is missing or changed after the round trip");
        }
        let original_index = &original[&index_digest];
        if *copied_index != *original_index {
            let a: Value = serde_json::from_slice(original_index)?;
            let b: Value = serde_json::from_slice(copied_index)?;
            ensure!(without_artifact_type(a) == b, "skopeo changed the index beyond dropping artifactType");
        }
        c.stop().await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oras_py_pushes_and_pulls_artifacts_through_our_registry() {
    bounded(async {
        let python = require_tool("python3", "apt-get install -y python3 python3-pip")?;
        let check = tokio::process::Command::new(&python).args(["-c", "import oras.provider"]).output().await?;
        if !check.status.success() {
            bail!("the PyPI oras client is not installed for {}; install it with `pip install oras`", python.display());
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/oras-roundtrip.py");
        let c = Controller::start().await?;
        let work = tempfile::tempdir()?;
        let weights: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(work.path().join("weights.bin"), &weights)?;
        std::fs::write(work.path().join("README.md"), b"# tiny\n")?;
        let push_token = c.admin.clone();
        let env = [("ORAS_USER", "alki"), ("ORAS_PASS", push_token.as_str())];
        let workdir = work.path().display().to_string();

        for (tag, chunked) in [("v1", false), ("v2", true)] {
            let mut args =
                vec![script.to_str().context("script path")?, "--registry", &c.host, "--repository", "acme/oras"];
            args.extend([
                "--tag",
                tag,
                "--work",
                &workdir,
                "weights.bin:application/vnd.cncf.model.weight.v1.raw",
                "README.md",
            ]);
            if chunked {
                args.push("--chunked");
            }
            let out = tool(&python, &args, &env).await?;
            let report: Value =
                serde_json::from_slice(&out).with_context(|| String::from_utf8_lossy(&out).into_owned())?;
            let pulled_dir = PathBuf::from(report["pulled_dir"].as_str().context("pulled_dir")?);
            ensure!(report["pulled"] == serde_json::json!(["README.md", "weights.bin"]), "pulled {}", report["pulled"]);
            ensure!(std::fs::read(pulled_dir.join("weights.bin"))? == weights, "weights.bin round-trips ({tag})");
            ensure!(std::fs::read(pulled_dir.join("README.md"))? == b"# tiny\n", "README.md round-trips ({tag})");
            let digest = report["digest"].as_str().context("manifest digest")?;
            let stored = c.manifest("acme/oras", tag).await?;
            ensure!(Digest::of(&stored).as_str() == digest, "the registry stores the manifest oras pushed");
            let layers = report["layers"].as_array().context("layers")?;
            ensure!(
                layers.iter().any(|l| l == Digest::of(&weights).as_str()),
                "the weights layer is addressed by its sha256"
            );
        }
        let out = tool(
            &python,
            &[
                script.to_str().context("script path")?,
                "--registry",
                &c.host,
                "--repository",
                "acme/oras",
                "--tag",
                "v3",
                "--work",
                &workdir,
                "README.md",
            ],
            &[("ORAS_USER", "alki"), ("ORAS_PASS", "alki_not_a_token")],
        )
        .await;
        ensure!(out.is_err(), "a wrong token is refused");
        c.stop().await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alkictl_pushes_a_bundle_to_cncf_distribution_and_it_pulls_back_intact() {
    bounded(async {
        let work = tempfile::tempdir()?;
        let registry = Distribution::start(&work.path().join("distribution"))?;
        let bundle = pack_bundle(work.path(), "bundle", "v1").await?;
        let layout = bundle.display().to_string();
        let host = registry.host();
        let args = [
            "alkictl",
            "--registry",
            &host,
            "-o",
            "json",
            "bundle",
            "push",
            &layout,
            "acme/tiny:v1",
            "--insecure-plain-http",
        ];
        run(parse_from(args)?).await.with_context(|| format!("alkictl bundle push\n{}", registry.log_tail()))?;

        // Pull everything back by plain HTTP and compare with the layout.
        let blobs = layout_blobs(&bundle)?;
        let client = reqwest::Client::new();
        let accept = format!("{MEDIA_TYPE_IMAGE_INDEX}, {MEDIA_TYPE_IMAGE_MANIFEST}");
        let get = |path: String| {
            let request = client.get(format!("http://{host}/v2/acme/tiny/{path}")).header("accept", &accept);
            async move {
                let resp = request.send().await?;
                ensure!(resp.status() == 200, "GET {path} answered {}", resp.status());
                let digest =
                    resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
                Ok((resp.bytes().await?.to_vec(), digest))
            }
        };
        let index_digest = tagged(&bundle, "v1")?;
        let (index_bytes, header) = get("manifests/v1".into()).await?;
        ensure!(index_bytes == blobs[&index_digest], "the index comes back byte-exact");
        ensure!(header.as_deref() == Some(index_digest.as_str()), "Docker-Content-Digest names the index");
        let Manifest::Index(index) = Manifest::parse(&index_bytes, Some(MEDIA_TYPE_IMAGE_INDEX))? else {
            bail!("the tag does not name an index")
        };
        let mut checked = 1;
        for variant in &index.manifests {
            let (bytes, _) = get(format!("manifests/{}", variant.digest)).await?;
            ensure!(bytes == blobs[&variant.digest], "variant {} comes back byte-exact", variant.digest);
            checked += 1;
            for descriptor in Manifest::parse(&bytes, Some(MEDIA_TYPE_IMAGE_MANIFEST))?.references() {
                let (blob, _) = get(format!("blobs/{}", descriptor.digest)).await?;
                ensure!(Digest::of(&blob) == descriptor.digest, "blob {} hashes to its digest", descriptor.digest);
                ensure!(blob == blobs[&descriptor.digest], "blob {} comes back byte-exact", descriptor.digest);
                checked += 1;
            }
        }
        ensure!(checked == blobs.len(), "checked {checked} of the layout's {} blobs", blobs.len());
        Ok(())
    })
    .await;
}
