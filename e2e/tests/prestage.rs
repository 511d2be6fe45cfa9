//! Pre-staging with the whole agent, a scripted controller session and a real registry (the controller's
//! embedded one on 127.0.0.1:0): a Prestage command downloads and verifies a signed bundle without activating
//! it; with the registry shut down, the staged bundle then activates from the content store alone (verified
//! again against the trust policy as it is at activation, so a key removed since refuses); an unsigned bundle
//! is refused before any layer is fetched; a restarted agent lists what it has staged in its Hello.

mod agent_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{TEST_TIMEOUT, fake_llama_server, next_where};
use alki_agent::reference::BundleLocation;
use alki_agent::{Agent, Config};
use alki_bundle::pack::{self, PackExtras, PackOptions};
use alki_bundle::sign::sign;
use alki_bundle::{Progress, Remote, runtime_build};
use alki_controller::config::ControllerConfig;
use alki_e2e::fake_controller::FakeController;
use alki_e2e::tiny_bundle::push_tiny_bundle_sized;
use alki_e2e::tiny_model::{TinyModelOptions, synthetic_tokenizer, write_tiny_model};
use alki_shared::digest::Digest;
use alki_shared::oci::ImageIndex;
use alki_shared::proto::{self, ErrorCode, Phase, agent_message, controller_message};
use alki_shared::signing::SigningKey;
use tokio::sync::mpsc;

const TOKEN: &str = "agent-secret";
const REPOSITORY: &str = "acme/tiny";

/// The controller, serving only as the registry; the session is the scripted fake controller's.
struct Registry {
    _data: tempfile::TempDir,
    addr: String,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

async fn registry() -> Registry {
    let data = tempfile::tempdir().expect("tempdir");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = http.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(data.path().to_owned());
    config.insecure_plaintext = true;
    let served = tokio::spawn(async move {
        let _ = alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
            let _ = stopped.await;
        })
        .await;
    });
    let token = data.path().join("admin.token");
    let admin = loop {
        if let Ok(t) = tokio::fs::read_to_string(&token).await
            && !t.trim().is_empty()
        {
            break t.trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Registry { _data: data, addr, admin, stop: Some(stop), served: Some(served) }
}

impl Registry {
    /// The admin token as a Basic password, as alkictl sends it.
    fn auth(&self) -> oci_client::secrets::RegistryAuth {
        oci_client::secrets::RegistryAuth::Basic("alkictl".into(), self.admin.clone())
    }

    fn remote(&self) -> Remote {
        Remote::new(self.addr.clone(), REPOSITORY.into(), self.auth(), true)
    }

    /// Packs a tiny GGUF model (`tiny-<tag>.gguf`) as a bundle and pushes it; signed with `key` when given.
    async fn publish(&self, tag: &str, seed: u64, key: Option<&SigningKey>) -> BundleLocation {
        self.publish_sized(tag, seed, key, 64).await
    }

    /// [`Registry::publish`] with a vocabulary of `vocab` tokens (about `vocab` × 512 bytes of weights).
    async fn publish_sized(&self, tag: &str, seed: u64, key: Option<&SigningKey>, vocab: usize) -> BundleLocation {
        let digest = push_tiny_bundle_sized(&self.addr, REPOSITORY, &self.admin, tag, seed, vocab).await.expect("push");
        if let Some(key) = key {
            sign(&self.remote(), tag, key).await.expect("sign");
        }
        BundleLocation { registry: self.addr.clone(), repository: REPOSITORY.into(), digest, tag: tag.into() }
    }

    /// The GGUF layer digests of a pushed bundle's variants.
    async fn gguf_layers(&self, bundle: &Digest) -> Vec<Digest> {
        let remote = self.remote();
        let client = remote.client();
        let (bytes, _) = remote.manifest(&client, bundle.as_str()).await.expect("read").expect("index");
        let index: ImageIndex = serde_json::from_slice(&bytes).expect("index");
        let mut out = Vec::new();
        for entry in index.manifests {
            let (bytes, _) = remote.manifest(&client, entry.digest.as_str()).await.expect("read").expect("variant");
            let variant: alki_shared::oci::ImageManifest = serde_json::from_slice(&bytes).expect("variant");
            out.extend(alki_shared::bundle::weight_layers(&variant).into_iter().map(|l| l.digest.clone()));
        }
        out
    }

    /// Stops the controller and waits until its registry port refuses connections.
    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = served.await;
        }
        let url = format!("http://{}/v2/", self.addr);
        while reqwest::get(&url).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A trust policy for the repository requiring a signature by `key`.
fn write_trust_policy(dir: &Path, key: &SigningKey) -> PathBuf {
    let pem = dir.join("release.pub");
    std::fs::write(&pem, key.public_key().to_pem()).expect("key");
    let path = dir.join("trust.toml");
    std::fs::write(&path, "[[repository]]\npattern = \"acme/*\"\nkeys = [\"release.pub\"]\n").expect("policy");
    path
}

/// The agent's config; the controller URL is set by [`start_agent`].
fn config_for(dir: &Path, registry: &Registry, key: &SigningKey) -> Config {
    config_with(dir, registry, key, "")
}

/// [`config_for`] with more lines in the `[store]` section.
fn config_with(dir: &Path, registry: &Registry, key: &SigningKey, store: &str) -> Config {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let password_file = dir.join("registry.password");
    std::fs::write(&password_file, &registry.admin).expect("password");
    let trust = write_trust_policy(dir, key);
    let text = format!(
        r#"
data_dir = {data_dir:?}
trust_policy = {trust:?}
metrics_addr = "127.0.0.1:0"
[controller]
url = "http://127.0.0.1:1"
insecure_plaintext = true
token_file = {token_file:?}
[registry]
insecure_plain_http = ["{registry}"]
[registry.credentials."{registry}"]
username = "alki-agent"
password_file = {password_file:?}
[runtime]
llama_server = {llama:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 15
drain_timeout_secs = 2
watch_window_secs = 0
[store]
{store}
"#,
        data_dir = dir.join("data"),
        registry = registry.addr,
        llama = fake_llama_server(),
    );
    Config::from_toml(&text).expect("valid config")
}

/// A running agent and its scripted controller session.
struct Running {
    up: mpsc::Receiver<proto::AgentMessage>,
    down: mpsc::Sender<proto::ControllerMessage>,
    front: SocketAddr,
    metrics: SocketAddr,
    hello: proto::Hello,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), alki_agent::AgentError>>,
}

async fn start_agent(config: Config) -> Running {
    let (controller, mut up, mut downs) = FakeController::new(1, TOKEN);
    let down = downs.remove(0);
    let mut config = config;
    config.controller.url = format!("http://{}", controller.serve().await.expect("fake controller"));
    let agent = Agent::start(config).await.expect("agent starts");
    let front = agent.front_addr();
    let metrics = agent.metrics_addr().expect("metrics listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));
    let agent_message::Msg::Hello(hello) = next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await
    else {
        unreachable!()
    };
    let running = Running { up, down, front, metrics, hello, stop, task };
    running
        .send(controller_message::Msg::Welcome(proto::Welcome {
            device_id: running.hello.device_id.clone(),
            heartbeat_interval_seconds: 30,
            ..Default::default()
        }))
        .await;
    running
}

impl Running {
    async fn send(&self, msg: controller_message::Msg) {
        self.down.send(proto::ControllerMessage { msg: Some(msg) }).await.expect("controller sends");
    }

    async fn desire(&self, generation: u64, bundle: &BundleLocation) {
        let desired = proto::DesiredState { generation, bundle: Some(bundle.to_proto()), ..Default::default() };
        self.send(controller_message::Msg::DesiredState(desired)).await;
    }

    async fn outcome(&mut self, generation: u64) -> proto::Status {
        let msg = next_where(&mut self.up, |m| {
            matches!(m, agent_message::Msg::Status(s) if s.generation == generation
                && (s.phase == Phase::Active as i32 || s.phase == Phase::Failed as i32))
        })
        .await;
        let agent_message::Msg::Status(status) = msg else { unreachable!() };
        status
    }

    async fn prestage(&mut self, id: &str, bundle: &BundleLocation) -> proto::PrestageReport {
        let prestage = proto::Prestage { bundle: Some(bundle.to_proto()), variant_digest: String::new() };
        self.send(controller_message::Msg::Command(proto::Command {
            id: id.to_owned(),
            kind: Some(proto::command::Kind::Prestage(prestage)),
        }))
        .await;
        let msg =
            next_where(&mut self.up, |m| matches!(m, agent_message::Msg::Prestage(r) if r.command_id == id)).await;
        let agent_message::Msg::Prestage(report) = msg else { unreachable!() };
        report
    }

    /// The agent's own `/metrics`.
    async fn metrics_text(&self) -> String {
        let response = reqwest::get(format!("http://{}/metrics", self.metrics)).await.expect("metrics reachable");
        response.text().await.expect("metrics body")
    }

    /// The agent's `alki_agent_pull_bytes_total` from its own `/metrics`.
    async fn pulled_bytes(&self) -> u64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix("alki_agent_pull_bytes_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the pull bytes counter")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("agent task").expect("clean exit");
    }
}

/// The content of a completion through the front port (the fake llama-server names its model file).
async fn served_model(front: SocketAddr) -> Option<String> {
    let response = reqwest::Client::new()
        .post(format!("http://{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}))
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    body["content"].as_str().map(str::to_owned)
}

fn blob_path(data_dir: &Path, digest: &Digest) -> PathBuf {
    data_dir.join("content").join("blobs").join(digest.storage_path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_bundle_activates_with_the_registry_gone_and_is_verified_against_the_policy_of_the_day() {
    tokio::time::timeout(TEST_TIMEOUT * 2, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::generate().expect("key");
        let mut registry = registry().await;
        let a = registry.publish("a", 1, Some(&key)).await;
        let b = registry.publish("b", 2, Some(&key)).await;
        let mut agent = start_agent(config_for(dir.path(), &registry, &key)).await;
        assert!(agent.hello.staged.is_empty(), "nothing staged yet");

        agent.desire(1, &a).await;
        let active = agent.outcome(1).await;
        assert_eq!(active.phase, Phase::Active as i32, "{:?}", active.error);

        // Staged: downloaded and verified, not activated; A keeps serving.
        let report = agent.prestage("stage-b", &b).await;
        assert!(report.ready, "{:?}", report.error);
        assert!(report.error.is_none());
        assert!(report.bytes_downloaded > 0, "B's layers were downloaded");
        assert!(!report.variant_digest.is_empty());
        assert_eq!(report.bundle, Some(b.to_proto()));
        assert!(served_model(agent.front).await.is_some_and(|c| c.contains("tiny-a.gguf")));
        // Staging the same bundle again downloads nothing.
        let again = agent.prestage("stage-b-again", &b).await;
        assert!(again.ready, "{:?}", again.error);
        assert_eq!(again.bytes_downloaded, 0);

        // The registry goes away for good.
        registry.shut_down().await;
        let pulled_before = agent.pulled_bytes().await;

        // A key removed from the policy since staging: the stored signature is checked again and refused.
        let stranger = SigningKey::generate().expect("key");
        write_trust_policy(dir.path(), &stranger);
        agent.desire(2, &b).await;
        let refused = agent.outcome(2).await;
        assert_eq!(refused.phase, Phase::Failed as i32);
        let error = refused.error.expect("error");
        assert_eq!(error.code, ErrorCode::SignatureUntrusted as i32, "{}", error.message);
        assert_eq!(refused.serving, Some(a.to_proto()), "the old model keeps serving");
        assert!(served_model(agent.front).await.is_some_and(|c| c.contains("tiny-a.gguf")));

        // The key back in the policy: B activates from the content store alone.
        write_trust_policy(dir.path(), &key);
        agent.desire(3, &b).await;
        let active = agent.outcome(3).await;
        assert_eq!(active.phase, Phase::Active as i32, "{:?}", active.error);
        assert_eq!(active.serving, Some(b.to_proto()));
        assert_eq!(active.variant_digest, report.variant_digest);
        assert_eq!(agent.pulled_bytes().await, pulled_before, "zero bytes downloaded for the activation");
        let metrics = agent.metrics_text().await;
        assert!(metrics.contains("alki_agent_prestages_total{outcome=\"ready\"} 2"), "{metrics}");
        // The staging task sees the activation on its own (the snapshot changes), shortly after the status.
        while !agent.metrics_text().await.contains("alki_agent_staged_bundles 0") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served_model(agent.front).await.is_some_and(|c| c.contains("tiny-b.gguf")));

        // Going back to A (the previous bundle) needs no registry either: its signature was kept at its pull.
        agent.desire(4, &a).await;
        let back = agent.outcome(4).await;
        assert_eq!(back.phase, Phase::Active as i32, "{:?}", back.error);
        assert!(served_model(agent.front).await.is_some_and(|c| c.contains("tiny-a.gguf")));
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestaging_an_unsigned_bundle_reports_signature_missing_and_downloads_no_layer() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::generate().expect("key");
        let registry = registry().await;
        let unsigned = registry.publish("unsigned", 3, None).await;
        let mut agent = start_agent(config_for(dir.path(), &registry, &key)).await;

        let report = agent.prestage("stage-unsigned", &unsigned).await;
        assert!(!report.ready);
        assert_eq!(report.bytes_downloaded, 0);
        let error = report.error.expect("error");
        assert_eq!(error.code, ErrorCode::SignatureMissing as i32, "{}", error.message);
        assert!(error.message.contains("not signed"), "{}", error.message);
        for layer in registry.gguf_layers(&unsigned.digest).await {
            assert!(!blob_path(&dir.path().join("data"), &layer).exists(), "GGUF layer {layer} was not downloaded");
        }
        // A bundle reference the agent cannot use is refused with its reason, not dropped.
        let bad = proto::Prestage { bundle: None, variant_digest: String::new() };
        agent
            .send(controller_message::Msg::Command(proto::Command {
                id: "stage-nothing".to_owned(),
                kind: Some(proto::command::Kind::Prestage(bad)),
            }))
            .await;
        let msg = next_where(
            &mut agent.up,
            |m| matches!(m, agent_message::Msg::Prestage(r) if r.command_id == "stage-nothing"),
        )
        .await;
        let agent_message::Msg::Prestage(report) = msg else { unreachable!() };
        assert_eq!(report.error.map(|e| e.code), Some(ErrorCode::BundleInvalid as i32));
        assert!(agent.hello.staged.is_empty());
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_lists_its_staged_bundles_in_hello_and_activates_them_offline() {
    tokio::time::timeout(TEST_TIMEOUT * 2, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::generate().expect("key");
        let mut registry = registry().await;
        // Bundles of a few MiB, over a store budget of 1 MiB: only what is kept survives garbage collection.
        let b = registry.publish_sized("b", 2, Some(&key), 8192).await;
        let c = registry.publish_sized("c", 3, Some(&key), 8192).await;
        let budget = "budget_mib = 1";

        let mut agent = start_agent(config_with(dir.path(), &registry, &key, budget)).await;
        for (id, bundle) in [("stage-b", &b), ("stage-c", &c)] {
            let report = agent.prestage(id, bundle).await;
            assert!(report.ready, "{:?}", report.error);
        }
        agent.stop().await;
        registry.shut_down().await;

        // Restarted, with no registry: both are listed, verified again from the store.
        let mut agent = start_agent(config_with(dir.path(), &registry, &key, budget)).await;
        assert_eq!(agent.hello.staged, vec![b.to_proto(), c.to_proto()]);
        agent.desire(1, &c).await;
        let active = agent.outcome(1).await;
        assert_eq!(active.phase, Phase::Active as i32, "{:?}", active.error);
        assert!(served_model(agent.front).await.is_some_and(|c| c.contains("tiny-c.gguf")));
        agent.stop().await;

        // Once activated, C is the running bundle, no longer listed as staged; B, still staged, survived the
        // garbage collection after C's activation (the budget evicts every blob not kept).
        let agent = start_agent(config_with(dir.path(), &registry, &key, budget)).await;
        assert_eq!(agent.hello.staged, vec![b.to_proto()]);
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

/// The stored bytes used to verify offline are checked like bytes from a registry: a signature payload or a
/// layer changed on disk is refused (and the damaged layer removed), never served for being there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_changed_in_the_content_store_are_not_trusted_offline() {
    use alki_agent::pull::{PullOptions, RegistryAccess, pull_bundle_with};
    use alki_agent::store::ContentStore;
    use alki_agent::trust::RepositoryTrust;
    use alki_shared::oci::Manifest;

    tokio::time::timeout(TEST_TIMEOUT, async {
        let key = SigningKey::generate().expect("key");
        let mut registry = registry().await;
        let a = registry.publish("a", 1, Some(&key)).await;
        let gguf = registry.gguf_layers(&a.digest).await.remove(0);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(&dir.path().join("content")).expect("store");
        let bundles = dir.path().join("bundles");
        let access =
            RegistryAccess::new(vec![registry.addr.clone()], registry.addr.clone(), Some(registry.admin.clone()));
        let trust = RepositoryTrust::require(vec![key.public_key().clone()], "test policy");
        let options = PullOptions { trust, disk_reserve: 0, ..PullOptions::default() };
        let pull = || async { pull_bundle_with(&access, &store, &bundles, &a, 1 << 30, &options, &mut |_| {}).await };

        let first = pull().await.expect("pulled from the registry");
        assert!(first.bytes_fetched > 0);
        registry.shut_down().await;
        let offline = pull().await.expect("verified from the store");
        assert_eq!(offline.bytes_fetched, 0);
        assert_eq!(offline.verified.map(|v| v.key_fingerprint), Some(key.public_key().fingerprint().to_owned()));

        // A signature payload edited on disk.
        let signature = store.signature_of(&a.digest).await.expect("the verified signature is recorded");
        let Ok(Manifest::Image(sig)) = Manifest::parse(&std::fs::read(store.path(&signature)).expect("read"), None)
        else {
            panic!("a signature manifest")
        };
        let payload = store.path(&sig.layers[0].digest);
        let original = std::fs::read(&payload).expect("payload");
        let mut edited = original.clone();
        let at = edited.len() / 2;
        edited[at] ^= 0x01;
        std::fs::write(&payload, &edited).expect("tamper");
        let err = pull().await.expect_err("refused");
        assert_eq!(err.code(), ErrorCode::SignatureInvalid, "{err}");
        std::fs::write(&payload, &original).expect("restore");

        // A GGUF layer edited on disk: removed, and without a registry the pull fails instead of serving it.
        let blob = store.path(&gguf);
        let mut bytes = std::fs::read(&blob).expect("blob");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        // The variant directory holds a hard link to the blob: write a new file so the link keeps the old bytes.
        std::fs::remove_file(&blob).expect("unlink");
        std::fs::write(&blob, &bytes).expect("tamper");
        let err = pull().await.expect_err("refused");
        assert_eq!(err.code(), ErrorCode::PullFailed, "{err}");
        assert!(!blob.exists(), "the damaged layer was removed from the store");
    })
    .await
    .expect("test timed out");
}

/// A bundle that names a runtime build: staging fetches and verifies the build too (its signature recorded
/// in the content store), so with the registry gone the bundle activates and runs that build's llama-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_bundle_naming_a_runtime_build_activates_on_that_build_with_the_registry_gone() {
    tokio::time::timeout(TEST_TIMEOUT * 2, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::generate().expect("key");
        let mut registry = registry().await;
        let a = registry.publish("a", 1, Some(&key)).await;

        // A "build": the fake llama-server as this platform's entry, pushed and signed in acme/llama-server.
        let work = tempfile::tempdir().expect("tempdir");
        let build_dir = work.path().join("bin");
        std::fs::create_dir_all(&build_dir).expect("build dir");
        std::fs::copy(fake_llama_server(), build_dir.join("llama-server")).expect("server");
        let arch = alki_agent::builds::oci_architecture(std::env::consts::ARCH);
        let platform =
            runtime_build::parse_platform(&format!("linux/{arch}={}", build_dir.display())).expect("platform");
        let none = Progress::none();
        let layout = work.path().join("build-layout");
        runtime_build::pack(&[platform], "b1", &layout, "b1", &none).expect("pack build");
        let build_remote = registry.remote().in_repository("acme/llama-server");
        let build_digest =
            alki_bundle::push::push(&layout, &build_remote, "b1", &none).await.expect("push build").digest;
        sign(&build_remote, "b1", &key).await.expect("sign build");

        // Bundle B names that build.
        let model = work.path().join("tiny-b.gguf");
        write_tiny_model(&model, &TinyModelOptions { name: "tiny-b".into(), seed: 2 }, &synthetic_tokenizer(64))
            .expect("model");
        let opts = PackOptions {
            files: vec![model],
            out: work.path().join("layout"),
            name: None,
            version: None,
            license: None,
            context: 256,
            tag: "b".into(),
        };
        let extras = PackExtras {
            runtime_build: Some(format!("{}/acme/llama-server@{build_digest}", registry.addr)),
            ..PackExtras::default()
        };
        pack::pack_with(&opts, &extras, &none).expect("pack bundle");
        let digest =
            alki_bundle::push::push(&opts.out, &registry.remote(), "b", &none).await.expect("push bundle").digest;
        sign(&registry.remote(), "b", &key).await.expect("sign bundle");
        let b =
            BundleLocation { registry: registry.addr.clone(), repository: REPOSITORY.into(), digest, tag: "b".into() };

        let mut agent = start_agent(config_for(dir.path(), &registry, &key)).await;
        agent.desire(1, &a).await;
        assert_eq!(agent.outcome(1).await.phase, Phase::Active as i32);
        let report = agent.prestage("stage-b", &b).await;
        assert!(report.ready, "{:?}", report.error);

        registry.shut_down().await;
        agent.desire(2, &b).await;
        let active = agent.outcome(2).await;
        assert_eq!(active.phase, Phase::Active as i32, "{:?}", active.error);
        assert!(served_model(agent.front).await.is_some_and(|c| c.contains("tiny-b.gguf")));
        let builds = dir.path().join("data").join(alki_agent::builds::DIR_NAME);
        let on_build = std::fs::read_dir("/proc")
            .expect("proc")
            .filter_map(|e| std::fs::read_link(e.ok()?.path().join("exe")).ok())
            .any(|exe| exe.starts_with(&builds));
        assert!(on_build, "a llama-server runs from the staged build under {}", builds.display());
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}
