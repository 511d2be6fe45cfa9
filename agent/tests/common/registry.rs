//! A real OCI registry for agent tests (CNCF distribution on loopback, `alki_e2e::registries`) and pushing to
//! it what alkictl would, without the controller: model bundles (an index of one-GGUF variants with the
//! ModelPack annotations), eval suites (the manifest `alki_shared::eval::artifact` builds) and cosign
//! signatures (`alki_shared::signing`), with the trust policy that trusts the signing key.

use std::path::{Path, PathBuf};

use alki_agent::identity::DeviceRegistryToken;
use alki_agent::pull::{Acquirer, RegistrySettings};
use alki_agent::reference::BundleLocation;
use alki_agent::store::ContentStore;
use alki_agent::trust::TrustStore;
use alki_e2e::registries::Distribution;
use alki_shared::bundle::{ARTIFACT_TYPE_MODEL, MEDIA_TYPE_WEIGHT_RAW, variant_annotations};
use alki_shared::digest::Digest;
use alki_shared::eval::artifact::{EMPTY_CONFIG, build_manifest};
use alki_shared::eval::suite::{Suite, SuiteFiles};
use alki_shared::oci::{
    ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
};
use alki_shared::signing::{self, SigningKey};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

/// A distribution registry on loopback with a client that pushes to it anonymously.
pub struct Registry {
    pub distribution: Distribution,
    client: Client,
}

/// A bundle pushed: where it is, and its variants' manifest digests in index order.
#[derive(Clone, Debug)]
pub struct PushedBundle {
    pub location: BundleLocation,
    pub variants: Vec<Digest>,
}

/// The three files of a suite, as bytes.
#[derive(Clone, Debug)]
pub struct SuiteBytes {
    pub manifest: Vec<u8>,
    pub corpus: Vec<u8>,
    pub prompts: Vec<u8>,
}

impl SuiteBytes {
    pub fn files(&self) -> SuiteFiles<'_> {
        SuiteFiles { manifest: &self.manifest, corpus: &self.corpus, prompts: &self.prompts }
    }
}

impl Registry {
    /// Starts `docker-registry` under `dir` (it must be installed: CI installs it).
    pub fn start(dir: &Path) -> Registry {
        let distribution = Distribution::start(&dir.join("registry")).expect("docker-registry starts");
        let config = ClientConfig { protocol: ClientProtocol::Http, ..Default::default() };
        Registry { distribution, client: Client::new(config) }
    }

    pub fn host(&self) -> String {
        self.distribution.host()
    }

    /// `repository@digest` in this registry.
    pub fn location(&self, repository: &str, digest: &Digest) -> BundleLocation {
        BundleLocation {
            registry: self.host(),
            repository: repository.to_owned(),
            digest: digest.clone(),
            tag: String::new(),
        }
    }

    fn reference(&self, repository: &str, tag: &str) -> Reference {
        Reference::with_tag(self.host(), repository.to_owned(), tag.to_owned())
    }

    pub async fn blob(&self, repository: &str, bytes: &[u8]) -> Descriptor {
        let digest = Digest::of(bytes);
        let reference = self.reference(repository, "x");
        self.client.auth(&reference, &RegistryAuth::Anonymous, RegistryOperation::Push).await.expect("auth");
        self.client.push_blob(&reference, bytes.to_vec(), digest.as_str()).await.expect("push blob");
        Descriptor::new("application/octet-stream", digest, bytes.len() as u64)
    }

    /// Pushes a manifest under `tag`; its digest.
    pub async fn manifest(&self, repository: &str, tag: &str, media_type: &'static str, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        let reference = self.reference(repository, tag);
        self.client.auth(&reference, &RegistryAuth::Anonymous, RegistryOperation::Push).await.expect("auth");
        let content_type = http::HeaderValue::from_static(media_type);
        self.client.push_manifest_raw(&reference, bytes, content_type).await.expect("push manifest");
        digest
    }

    /// A bundle whose variants are GGUF files (quantization name, file), as an index. Each variant's memory
    /// need is twice its weights.
    pub async fn push_bundle(&self, repository: &str, variants: &[(&str, &Path)]) -> PushedBundle {
        self.push_bundle_needing(repository, variants, None).await
    }

    /// [`Registry::push_bundle`] whose variants say they need `memory` bytes (None: twice their weights), so
    /// a fake model can claim a real model's memory.
    pub async fn push_bundle_needing(
        &self,
        repository: &str,
        variants: &[(&str, &Path)],
        memory: Option<u64>,
    ) -> PushedBundle {
        let config = self.blob(repository, EMPTY_CONFIG).await;
        let mut entries = Vec::new();
        for (quantization, file) in variants {
            let weights = std::fs::read(file).expect("model file");
            let mut layer = self.blob(repository, &weights).await;
            layer.media_type = MEDIA_TYPE_WEIGHT_RAW.to_owned();
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            layer.annotations.insert(ANNOTATION_TITLE.to_owned(), name);
            let manifest = ImageManifest {
                schema_version: 2,
                media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
                artifact_type: Some(ARTIFACT_TYPE_MODEL.to_owned()),
                config: Descriptor::new(MEDIA_TYPE_EMPTY, config.digest.clone(), config.size),
                layers: vec![layer],
                subject: None,
                annotations: Default::default(),
            };
            let bytes = serde_json::to_vec(&manifest).expect("json");
            let size = bytes.len() as u64;
            let digest = self.manifest(repository, quantization, MEDIA_TYPE_IMAGE_MANIFEST, bytes).await;
            let mut entry = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, digest, size);
            let w = weights.len() as u64;
            let needs = memory.unwrap_or(2 * w);
            entry.annotations = variant_annotations(quantization, "llama", "alki-tiny", 1, 2048, w, needs);
            entries.push(entry);
        }
        let variants = entries.iter().map(|e| e.digest.clone()).collect();
        let index = ImageIndex {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_IMAGE_INDEX.to_owned()),
            artifact_type: None,
            manifests: entries,
            subject: None,
            annotations: Default::default(),
        };
        let bytes = serde_json::to_vec(&index).expect("json");
        let digest = self.manifest(repository, "latest", MEDIA_TYPE_IMAGE_INDEX, bytes).await;
        PushedBundle { location: self.location(repository, &digest), variants }
    }

    /// An eval suite as `alkictl eval push` pushes it (the manifest of `alki_shared::eval::artifact`); its
    /// digest. The files are pushed as given: the caller decides whether they are valid.
    pub async fn push_suite(&self, repository: &str, tag: &str, files: &SuiteBytes, suite: &Suite) -> Digest {
        self.blob(repository, EMPTY_CONFIG).await;
        for bytes in [&files.manifest, &files.corpus, &files.prompts] {
            self.blob(repository, bytes).await;
        }
        let manifest = build_manifest(suite, files.files());
        self.manifest(repository, tag, MEDIA_TYPE_IMAGE_MANIFEST, serde_json::to_vec(&manifest).expect("json")).await
    }

    /// A suite whose corpus layer is `corpus` (pushed as is, whatever its size), the rest as in `files`.
    pub async fn push_oversized_suite(
        &self,
        repository: &str,
        files: &SuiteBytes,
        suite: &Suite,
        corpus: &[u8],
    ) -> Digest {
        self.blob(repository, EMPTY_CONFIG).await;
        for bytes in [&files.manifest, &files.prompts, &corpus.to_vec()] {
            self.blob(repository, bytes).await;
        }
        let mut manifest = build_manifest(suite, files.files());
        manifest.layers[1].digest = Digest::of(corpus);
        manifest.layers[1].size = corpus.len() as u64;
        let bytes = serde_json::to_vec(&manifest).expect("json");
        self.manifest(repository, "oversized", MEDIA_TYPE_IMAGE_MANIFEST, bytes).await
    }

    /// Signs `digest` in `repository` with `key`, as `alkictl bundle sign` does (cosign's tag scheme).
    pub async fn sign(&self, repository: &str, digest: &Digest, key: &SigningKey) {
        self.sign_as(repository, digest, digest, key).await;
    }

    /// Puts a valid signature of `signed` at `target`'s signature tag (a signature copied from another
    /// artifact).
    pub async fn sign_as(&self, repository: &str, target: &Digest, signed: &Digest, key: &SigningKey) {
        let payload = signing::payload(&format!("{}/{repository}", self.host()), signed);
        let signature = key.sign(&payload).expect("sign");
        self.blob(repository, &payload).await;
        let (manifest, config) = signing::signature_manifest(vec![signing::signature_layer(&payload, &signature)]);
        self.blob(repository, &config).await;
        let tag = signing::signature_tag(target);
        self.manifest(repository, &tag, MEDIA_TYPE_IMAGE_MANIFEST, serde_json::to_vec(&manifest).expect("json")).await;
    }

    /// Where the registry keeps a blob's bytes (to damage them at rest, as a tampered registry would).
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.distribution.storage().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// An acquire path pulling from this registry into `data_dir`, with the trust policy at `policy`.
    pub fn acquirer(&self, data_dir: &Path, policy: &Path) -> Acquirer {
        let store = ContentStore::open(&data_dir.join("content")).expect("store");
        let registry = RegistrySettings {
            plain_http: vec![self.host()],
            embedded: self.host(),
            token_file: PathBuf::new(),
            mirrors: Default::default(),
            credentials: Default::default(),
            device_token: DeviceRegistryToken::default(),
            ca_file: None,
            trust: TrustStore::new(Some(policy.to_owned())),
        };
        Acquirer { registry, store, builds_dir: data_dir.join("runtime-builds") }
    }
}

/// A signing key and the trust policy (`<dir>/trust.toml`) requiring its signature for every repository.
pub fn trusted_key(dir: &Path) -> (SigningKey, PathBuf) {
    let key = SigningKey::generate().expect("key");
    std::fs::write(dir.join("release.pub"), key.public_key().to_pem()).expect("public key");
    let policy = dir.join("trust.toml");
    std::fs::write(&policy, "[[repository]]\npattern = \"*\"\nkeys = [\"release.pub\"]\n").expect("policy");
    (key, policy)
}

/// A suite's files: `suite.toml` with `context_size` 128, `chunks` 16 and `budget` seconds, the corpus, the
/// prompts.
pub fn suite_files(corpus: &str, prompts: &str, budget: u32) -> SuiteBytes {
    let manifest = format!(
        "name = \"smoke\"\nversion = \"1\"\ncorpus = \"corpus.txt\"\nprompts = \"prompts.jsonl\"\n\
         context_size = 128\nchunks = 16\ntime_budget_seconds = {budget}\n"
    );
    SuiteBytes {
        manifest: manifest.into_bytes(),
        corpus: corpus.as_bytes().to_vec(),
        prompts: prompts.as_bytes().to_vec(),
    }
}

/// The first 12,000 bytes of this repository's ARCHITECTURE.md: more than 2,048 tokens of English text.
pub fn corpus() -> String {
    let text = include_str!("../../../ARCHITECTURE.md");
    let mut end = 12_000.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
