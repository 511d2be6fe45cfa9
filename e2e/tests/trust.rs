//! The agent refuses what it cannot trust: pulls from a real registry (the controller's, on 127.0.0.1:0) of
//! bundles signed with alkictl's code, through the tamper matrix. Each case is refused with its own reason
//! and nothing of it is materialised for llama-server.

mod agent_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_agent::pull::{PullError, PullOptions, PulledBundle, RegistryAccess, VERIFICATION_RECORD, pull_bundle_with};
use alki_agent::reference::BundleLocation;
use alki_agent::store::ContentStore;
use alki_agent::trust::{RepositoryTrust, TrustStore};
use alki_bundle::Remote;
use alki_bundle::sign::sign;
use alki_controller::config::ControllerConfig;
use alki_shared::bundle::{ANNOTATION_WEIGHTS_BYTES, MEDIA_TYPE_WEIGHT_RAW};
use alki_shared::digest::Digest;
use alki_shared::oci::{
    ANNOTATION_TITLE, ImageIndex, ImageManifest, MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST,
};
use alki_shared::proto::ErrorCode;
use alki_shared::signing::{SigningKey, signature_tag};

struct Fixture {
    data: tempfile::TempDir,
    registry: String,
    admin: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    key: SigningKey,
}

async fn start() -> Fixture {
    let data = tempfile::tempdir().expect("tempdir");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let registry = http.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(data.path().to_owned());
    config.insecure_plaintext = true;
    tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    let token = data.path().join("admin.token");
    let admin = tokio::time::timeout(agent_support::TEST_TIMEOUT, async {
        loop {
            if let Ok(t) = tokio::fs::read_to_string(&token).await
                && !t.trim().is_empty()
            {
                return t.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("admin token");
    Fixture { data, registry, admin, _stop: stop, key: SigningKey::generate().expect("key") }
}

impl Fixture {
    fn remote(&self) -> Remote {
        Remote::with_token(self.registry.clone(), "acme/tiny".into(), Some(self.admin.clone()), true)
    }

    async fn push(&self, tag: &str, seed: u64) -> Digest {
        alki_e2e::tiny_bundle::push_tiny_bundle(&self.registry, "acme/tiny", &self.admin, tag, seed)
            .await
            .expect("push the tiny bundle")
    }

    async fn manifest(&self, digest: &Digest) -> Vec<u8> {
        let remote = self.remote();
        remote.manifest(&remote.client(), digest.as_str()).await.expect("read").expect("present").0
    }

    async fn put_manifest(&self, reference: &str, bytes: Vec<u8>, media_type: &'static str) -> Digest {
        let remote = self.remote();
        let digest = Digest::of(&bytes);
        let client = remote.client();
        client
            .auth(&remote.reference(reference), &remote.auth(), oci_client::RegistryOperation::Push)
            .await
            .expect("auth");
        client
            .push_manifest_raw(&remote.reference(reference), bytes, http::HeaderValue::from_static(media_type))
            .await
            .expect("push manifest");
        digest
    }

    /// The index of `bundle` and its only variant manifest, parsed.
    async fn parts(&self, bundle: &Digest) -> (ImageIndex, ImageManifest) {
        let index: ImageIndex = serde_json::from_slice(&self.manifest(bundle).await).expect("index");
        let variant: ImageManifest =
            serde_json::from_slice(&self.manifest(&index.manifests[0].digest).await).expect("variant");
        (index, variant)
    }

    /// Pushes `variant` and an index listing it (with the annotations of `index`'s entry); returns the index.
    async fn republish(&self, mut index: ImageIndex, variant: &ImageManifest, tag: &str) -> Digest {
        let bytes = serde_json::to_vec(variant).expect("json");
        let size = bytes.len() as u64;
        let digest = self.put_manifest(Digest::of(&bytes).as_str(), bytes, MEDIA_TYPE_IMAGE_MANIFEST).await;
        index.manifests[0].digest = digest;
        index.manifests[0].size = size;
        self.put_manifest(tag, serde_json::to_vec(&index).expect("json"), MEDIA_TYPE_IMAGE_INDEX).await
    }

    /// A blob's file in the controller's registry, for tampering with it at rest.
    fn blob_file(&self, digest: &Digest) -> PathBuf {
        find_file(self.data.path(), digest.hex()).expect("blob on the controller's disk")
    }

    fn trusted(&self) -> RepositoryTrust {
        RepositoryTrust::require(vec![self.key.public_key().clone()], "test policy")
    }
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

struct Device {
    dir: tempfile::TempDir,
    store: ContentStore,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(&dir.path().join("content")).expect("store");
        Device { dir, store }
    }

    fn bundles(&self) -> PathBuf {
        self.dir.path().join("bundles")
    }

    async fn pull(&self, f: &Fixture, bundle: &Digest, trust: RepositoryTrust) -> Result<PulledBundle, PullError> {
        let access = RegistryAccess::new(vec![f.registry.clone()], f.registry.clone(), Some(f.admin.clone()));
        let location = BundleLocation {
            registry: String::new(),
            repository: "acme/tiny".into(),
            digest: bundle.clone(),
            tag: String::new(),
        };
        let options = PullOptions { trust, disk_reserve: 0, ..PullOptions::default() };
        tokio::time::timeout(
            agent_support::TEST_TIMEOUT,
            pull_bundle_with(&access, &self.store, &self.bundles(), &location, 1 << 30, &options, &mut |_| {}),
        )
        .await
        .expect("pull bounded")
    }

    /// Refused with `code`, and no GGUF file was materialised for llama-server.
    async fn refused(&self, f: &Fixture, bundle: &Digest, code: ErrorCode, says: &str) -> PullError {
        let err = self.pull(f, bundle, f.trusted()).await.expect_err("refused");
        assert_eq!(err.code(), code, "{err}");
        assert!(err.to_string().contains(says), "{err}");
        assert!(
            self.served_files().is_empty(),
            "nothing may be served from a refused bundle: {:?}",
            self.served_files()
        );
        err
    }

    fn served_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(self.bundles()).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                if file.path().extension().is_some_and(|e| e == "gguf") {
                    out.push(file.path());
                }
            }
        }
        out
    }
}

#[tokio::test]
async fn a_signed_bundle_is_verified_before_its_layers_and_the_record_says_so() {
    let f = start().await;
    let bundle = f.push("v1", 1).await;
    sign(&f.remote(), "v1", &f.key).await.expect("sign");
    let device = Device::new();
    let pulled = device.pull(&f, &bundle, f.trusted()).await.expect("pull");
    let verified = pulled.verified.expect("verified");
    assert_eq!(verified.key_fingerprint, f.key.public_key().fingerprint());
    assert_eq!(verified.digest, bundle);
    let record = std::fs::read_to_string(pulled.dir.join(VERIFICATION_RECORD)).expect("record");
    assert!(record.contains(f.key.public_key().fingerprint()), "{record}");
    assert_eq!(device.served_files().len(), 1);
}

#[tokio::test]
async fn unsigned_untrusted_and_copied_signatures_are_refused_before_any_layer_is_fetched() {
    let f = start().await;
    let signed = f.push("v1", 1).await;
    sign(&f.remote(), "v1", &f.key).await.expect("sign");
    let unsigned = f.push("v2", 2).await;

    let device = Device::new();
    device.refused(&f, &unsigned, ErrorCode::SignatureMissing, "not signed").await;
    // Refused before the large layers: no GGUF blob reached the content store.
    let (_, variant) = f.parts(&unsigned).await;
    let gguf = &variant.layers.iter().find(|l| l.media_type == MEDIA_TYPE_WEIGHT_RAW).expect("gguf").digest;
    assert!(device.store.size(gguf).await.is_none(), "the GGUF layer was not downloaded");

    // Signed by a key the policy does not list.
    let stranger = f.push("v3", 3).await;
    sign(&f.remote(), "v3", &SigningKey::generate().expect("key")).await.expect("sign");
    device.refused(&f, &stranger, ErrorCode::SignatureUntrusted, "no trusted key").await;

    // v1's valid signature copied to v2's tag: made by a trusted key, for another digest.
    let copy = f.manifest_at(&signature_tag(&signed)).await;
    f.put_manifest(&signature_tag(&unsigned), copy, MEDIA_TYPE_IMAGE_MANIFEST).await;
    device.refused(&f, &unsigned, ErrorCode::SignatureInvalid, "not for").await;

    // A policy without the key (nothing configured) trusts nothing, with a message saying how to fix it.
    let none = TrustStore::new(None).for_repository("acme/tiny");
    let err = device.pull(&f, &signed, none).await.expect_err("no policy");
    assert_eq!(err.code(), ErrorCode::SignatureUntrusted);
    assert!(err.to_string().contains("trust_policy"), "{err}");
}

impl Fixture {
    async fn manifest_at(&self, tag: &str) -> Vec<u8> {
        let remote = self.remote();
        remote.manifest(&remote.client(), tag).await.expect("read").expect("present").0
    }
}

#[tokio::test]
async fn a_manifest_edited_after_signing_is_refused() {
    let f = start().await;
    let bundle = f.push("v1", 1).await;
    sign(&f.remote(), "v1", &f.key).await.expect("sign");
    let (index, mut variant) = f.parts(&bundle).await;
    variant.annotations.insert("org.opencontainers.image.description".into(), "edited".into());
    let edited = f.republish(index, &variant, "v1-edited").await;
    let device = Device::new();
    // Unsigned under its new digest ...
    device.refused(&f, &edited, ErrorCode::SignatureMissing, "not signed").await;
    // ... and the old signature, carried over, names the old digest.
    let old = f.manifest_at(&signature_tag(&bundle)).await;
    f.put_manifest(&signature_tag(&edited), old, MEDIA_TYPE_IMAGE_MANIFEST).await;
    device.refused(&f, &edited, ErrorCode::SignatureInvalid, "not for").await;
}

#[tokio::test]
async fn tampered_layers_at_rest_are_refused_by_digest() {
    let f = start().await;
    let one = f.push("v1", 1).await;
    let two = f.push("v2", 2).await;
    sign(&f.remote(), "v1", &f.key).await.expect("sign");
    let (_, variant) = f.parts(&one).await;
    let gguf = variant.layers.iter().find(|l| l.media_type == MEDIA_TYPE_WEIGHT_RAW).expect("gguf").clone();
    let file = f.blob_file(&gguf.digest);
    let original = std::fs::read(&file).expect("read blob");

    // One flipped byte in the GGUF layer.
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&file, &flipped).expect("tamper");
    Device::new().refused(&f, &one, ErrorCode::DigestMismatch, "does not match its digest").await;

    // The layer swapped for another valid blob (v2's GGUF, same size).
    let (_, other) = f.parts(&two).await;
    let other_gguf = other.layers.iter().find(|l| l.media_type == MEDIA_TYPE_WEIGHT_RAW).expect("gguf");
    std::fs::write(&file, std::fs::read(f.blob_file(&other_gguf.digest)).expect("read")).expect("swap");
    Device::new().refused(&f, &one, ErrorCode::DigestMismatch, "does not match its digest").await;

    // A truncated download: the registry has only part of the layer.
    std::fs::write(&file, &original[..original.len() / 3]).expect("truncate");
    Device::new().refused(&f, &one, ErrorCode::DigestMismatch, "bytes").await;

    // Put back, it pulls.
    std::fs::write(&file, &original).expect("restore");
    assert!(Device::new().pull(&f, &one, f.trusted()).await.is_ok());
}

#[tokio::test]
async fn signed_bundles_that_lie_about_sizes_or_paths_are_refused() {
    let f = start().await;
    let bundle = f.push("v1", 1).await;
    let (index, variant) = f.parts(&bundle).await;

    // A variant that claims fewer bytes than its layers hold (so a small device would choose it).
    let mut lying = index.clone();
    lying.manifests[0].annotations.insert(ANNOTATION_WEIGHTS_BYTES.into(), "1024".into());
    let small = f.republish(lying, &variant, "small").await;
    sign(&f.remote(), "small", &f.key).await.expect("sign");
    Device::new().refused(&f, &small, ErrorCode::BundleInvalid, "claims 1024 bytes").await;

    // A file name in an annotation that leaves the bundle directory.
    let mut escaping = variant.clone();
    for layer in escaping.layers.iter_mut().filter(|l| l.media_type == MEDIA_TYPE_WEIGHT_RAW) {
        layer.annotations.insert(ANNOTATION_TITLE.into(), "../../escaped.gguf".into());
    }
    let escape = f.republish(index, &escaping, "escape").await;
    sign(&f.remote(), "escape", &f.key).await.expect("sign");
    let device = Device::new();
    device.refused(&f, &escape, ErrorCode::BundleInvalid, "no safe file name").await;
    assert!(find_file(device.dir.path(), "escaped.gguf").is_none());
    assert!(!device.dir.path().parent().expect("parent").join("escaped.gguf").exists());
}
