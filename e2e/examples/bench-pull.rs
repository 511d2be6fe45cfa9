//! Pull + verify benchmark: the agent's pull of a signed 1 GiB bundle from the controller's embedded
//! registry on loopback (signature checked first, layer streamed into the content store with its SHA-256
//! computed on the way, fsynced, then linked for llama-server) against `curl -o` of the same layer followed
//! by `openssl dgst -sha256` of the file, in one run, best of N rounds each. Goal: ours ≥ 1.3× faster.
//!
//!   cargo run --release -p alki-e2e --example bench-pull -- [--size-mib 1024] [--rounds 3]
//!
//! A command, not a test: it prints figures for the note.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use alki_agent::pull::{PullOptions, RegistryAccess, pull_bundle_with};
use alki_agent::reference::BundleLocation;
use alki_agent::store::ContentStore;
use alki_agent::trust::RepositoryTrust;
use alki_bundle::pack::{self, PackOptions};
use alki_bundle::sign::sign;
use alki_bundle::{Progress, Remote};
use alki_controller::config::ControllerConfig;
use alki_shared::digest::Digest;
use alki_shared::signing::SigningKey;
use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use rand::RngCore as _;

const REPOSITORY: &str = "bench/big";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut size_mib: u64 = 1024;
    let mut rounds: u32 = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--size-mib" => size_mib = value()?.parse().context("--size-mib takes a number")?,
            "--rounds" => rounds = value()?.parse().context("--rounds takes a number")?,
            other => bail!("unknown argument {other:?}; use --size-mib N and --rounds N"),
        }
    }
    for tool in ["curl", "openssl"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok() || Command::new(tool).arg("version").output().is_ok(),
            "{tool} is not installed; apt-get install -y {tool}"
        );
    }

    let work = tempfile::tempdir()?;
    let (registry, admin, _stop) = start_controller(work.path()).await?;
    eprintln!("==> packing, pushing and signing a {size_mib} MiB GGUF");
    let model = work.path().join("big.gguf");
    write_gguf(&model, size_mib << 20)?;
    let layout = work.path().join("layout");
    let none = Progress::none();
    let options = PackOptions {
        files: vec![model.clone()],
        out: layout.clone(),
        name: None,
        version: None,
        license: None,
        context: 256,
        tag: "v1".into(),
    };
    pack::pack(&options, &none)?;
    std::fs::remove_file(&model)?;
    let remote = Remote::with_token(registry.clone(), REPOSITORY.into(), Some(admin.clone()), true);
    let bundle = alki_bundle::push::push(&layout, &remote, "v1", &none).await?.digest;
    let key = SigningKey::generate()?;
    sign(&remote, bundle.as_str(), &key).await?;
    let layer = largest_blob(&layout)?;
    std::fs::remove_dir_all(&layout)?;

    let access = RegistryAccess::new(vec![registry.clone()], registry.clone(), Some(admin.clone()));
    let location =
        BundleLocation { registry: String::new(), repository: REPOSITORY.into(), digest: bundle, tag: String::new() };
    let trust = RepositoryTrust { required: true, keys: vec![key.public_key().clone()], source: "bench".into() };
    let (mut ours, mut theirs, mut durable, mut again) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    let bytes = (size_mib << 20) as f64;
    for round in 1..=rounds {
        // Ours: a fresh content store each round, so every byte is downloaded again.
        let dir = work.path().join(format!("agent-{round}"));
        let store = ContentStore::open(&dir.join("store"))?;
        let options = PullOptions { trust: trust.clone(), disk_reserve: 0, ..PullOptions::default() };
        let started = Instant::now();
        let pulled =
            pull_bundle_with(&access, &store, &dir.join("bundles"), &location, 64 << 30, &options, &mut |_| {})
                .await
                .map_err(|e| anyhow::anyhow!("pull: {e}"))?;
        let took = started.elapsed().as_secs_f64();
        ensure!(pulled.verified.is_some(), "the signature was verified");
        ensure!(pulled.bytes_fetched >= size_mib << 20, "every byte was fetched ({})", pulled.bytes_fetched);
        ours = ours.min(took);
        // The same bundle again, as an activation of a pre-staged bundle or a return to it: all from the
        // content store, its blobs trusted by their seals (nothing downloaded, nothing hashed again).
        let started = Instant::now();
        let stored =
            pull_bundle_with(&access, &store, &dir.join("bundles"), &location, 64 << 30, &options, &mut |_| {})
                .await
                .map_err(|e| anyhow::anyhow!("pull from the store: {e}"))?;
        again = again.min(started.elapsed().as_secs_f64());
        ensure!(stored.bytes_fetched == 0, "the second pull came from the store");
        drop(store);
        std::fs::remove_dir_all(&dir)?;

        // Theirs: download the layer, then hash it.
        let file = work.path().join(format!("curl-{round}.blob"));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("alki-agent:{admin}"));
        let url = format!("http://{registry}/v2/{REPOSITORY}/blobs/{layer}");
        let started = Instant::now();
        run(Command::new("curl")
            .args(["-sSf", "-o"])
            .arg(&file)
            .args(["-H", &format!("Authorization: Basic {basic}")])
            .arg(&url))?;
        let printed = run(Command::new("openssl").args(["dgst", "-sha256"]).arg(&file))?;
        let took_theirs = started.elapsed().as_secs_f64();
        // The agent's blobs are durable before they are used; the same for curl's file, for comparison.
        run(Command::new("sync").arg(&file))?;
        let took_durable = started.elapsed().as_secs_f64();
        durable = durable.min(took_durable);
        ensure!(printed.trim().ends_with(layer.hex()), "openssl computed another digest: {printed}");
        theirs = theirs.min(took_theirs);
        std::fs::remove_file(&file)?;
        eprintln!(
            "round {round}: agent pull + verify {took:.2} s, curl + openssl {took_theirs:.2} s ({took_durable:.2} s \
             with sync)"
        );
    }
    let mib = bytes / f64::from(1u32 << 20);
    println!("Bundle: {size_mib} MiB layer, signed; loopback; best of {rounds} rounds.");
    println!("agent pull + verify (hash while downloading, fsync, link): {ours:6.2} s  {:7.0} MiB/s", mib / ours);
    println!("curl -o, then openssl dgst -sha256                       : {theirs:6.2} s  {:7.0} MiB/s", mib / theirs);
    println!(
        "curl -o, openssl, then sync FILE (durable, as the agent)  : {durable:6.2} s  {:7.0} MiB/s",
        mib / durable
    );
    println!("the same bundle again, from the content store (sealed)  : {again:6.3} s");
    println!(
        "speed-up: {:.2}x against curl + openssl (goal >= 1.30x), {:.2}x against the durable variant",
        theirs / ours,
        durable / ours
    );
    Ok(())
}

/// The controller in this process, plain HTTP on loopback; returns its registry address and admin token.
async fn start_controller(data: &Path) -> anyhow::Result<(String, String, tokio::sync::oneshot::Sender<()>)> {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let registry = http.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(data.join("controller"));
    config.insecure_plaintext = true;
    tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    let token = data.join("controller/admin.token");
    let started = Instant::now();
    loop {
        if let Ok(t) = std::fs::read_to_string(&token)
            && !t.trim().is_empty()
        {
            return Ok((registry, t.trim().to_owned(), stop));
        }
        ensure!(started.elapsed() < Duration::from_secs(30), "the controller wrote no admin token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The largest blob of an OCI layout: the GGUF layer.
fn largest_blob(layout: &Path) -> anyhow::Result<Digest> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(layout.join("blobs/sha256"))? {
        let entry = entry?;
        let len = entry.metadata()?.len();
        if best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, entry.path()));
        }
    }
    let (_, path) = best.context("empty layout")?;
    let hex = path.file_name().and_then(|n| n.to_str()).context("blob name")?;
    Ok(format!("sha256:{hex}").parse()?)
}

/// A GGUF v3 file with llama metadata and one F32 tensor of `data_bytes` random bytes.
fn write_gguf(path: &Path, data_bytes: u64) -> anyhow::Result<()> {
    use std::io::Write as _;
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut kv = Vec::new();
    let mut count = 0u64;
    for (key, value) in [("general.architecture", "llama"), ("general.name", "bench")] {
        string(&mut kv, key);
        kv.extend(8u32.to_le_bytes());
        string(&mut kv, value);
        count += 1;
    }
    for (key, value) in [
        ("general.file_type", 0u32),
        ("llama.context_length", 4096),
        ("llama.embedding_length", 64),
        ("llama.block_count", 2),
        ("llama.attention.head_count", 4),
    ] {
        string(&mut kv, key);
        kv.extend(4u32.to_le_bytes());
        kv.extend(value.to_le_bytes());
        count += 1;
    }
    let mut head = Vec::new();
    head.extend(b"GGUF");
    head.extend(3u32.to_le_bytes());
    head.extend(1u64.to_le_bytes());
    head.extend(count.to_le_bytes());
    head.extend(kv);
    string(&mut head, "w");
    head.extend(1u32.to_le_bytes());
    head.extend((data_bytes / 4).to_le_bytes());
    head.extend(0u32.to_le_bytes());
    head.extend(0u64.to_le_bytes());
    head.resize(head.len().div_ceil(32) * 32, 0);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    out.write_all(&head)?;
    let mut chunk = vec![0u8; 16 << 20];
    let mut left = data_bytes / 4 * 4;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rand::rng().fill_bytes(&mut chunk[..n]);
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
