//! Pulling bundles from a small scripted OCI registry: variant choice, materialisation, the content store's
//! reuse, digest and size checks, and where the token is (not) sent.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use alki_agent::pull::{PullError, PullOptions, PullProgress, PulledBundle, RegistryAccess, pull_bundle_with};
use alki_agent::reference::BundleLocation;
use alki_agent::store::ContentStore;
use alki_agent::trust::RepositoryTrust;
use alki_shared::bundle::{MEDIA_TYPE_RUNTIME, MEDIA_TYPE_WEIGHT_RAW, variant_annotations};
use alki_shared::digest::Digest;
use alki_shared::oci::{
    ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
};
use alki_shared::proto::ErrorCode;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::TEST_TIMEOUT;
use futures::StreamExt;

const TOKEN: &str = "agent-token-123";

#[derive(Default)]
struct Registry {
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    blob_gets: Mutex<HashMap<String, usize>>,
    authorizations: Mutex<Vec<String>>,
    /// Each response for a blob over 1000 bytes serves at most the next of these many bytes, then breaks
    /// the connection.
    cuts: Mutex<std::collections::VecDeque<usize>>,
    /// `Range` headers of blob requests, in order.
    ranges: Mutex<Vec<String>>,
    /// Answers every blob request with the whole blob (200), as a registry without range support does.
    ignores_ranges: std::sync::atomic::AtomicBool,
    /// Blob body bytes sent.
    bytes_sent: std::sync::atomic::AtomicUsize,
}

impl Registry {
    fn manifest(&self, media_type: &str, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        self.manifests.lock().expect("lock").insert(digest.to_string(), (media_type.to_owned(), bytes.into()));
        digest
    }

    fn blob(&self, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        self.blobs.lock().expect("lock").insert(digest.to_string(), Bytes::copy_from_slice(bytes));
        digest
    }

    fn gets(&self, digest: &Digest) -> usize {
        self.blob_gets.lock().expect("lock").get(digest.as_str()).copied().unwrap_or(0)
    }

    /// The ranges that resumed a download (the agent asks for every blob with a range, from 0 at first).
    fn resumed_ranges(&self) -> Vec<String> {
        self.ranges.lock().expect("lock").iter().filter(|r| *r != "bytes=0-").cloned().collect()
    }
}

fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn authorized(registry: &Registry, headers: &HeaderMap) -> bool {
    let expected = format!("Basic {}", base64(format!("alki-agent:{TOKEN}").as_bytes()));
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(value) => {
            registry.authorizations.lock().expect("lock").push(value.to_owned());
            value == expected
        }
        None => false,
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", r#"Basic realm="alki""#)],
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
    )
        .into_response()
}

async fn v2_root(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    if authorized(&registry, &headers) { "{}".into_response() } else { unauthorized() }
}

async fn v2(State(registry): State<Arc<Registry>>, UrlPath(rest): UrlPath<String>, headers: HeaderMap) -> Response {
    if !authorized(&registry, &headers) {
        return unauthorized();
    }
    let not_found = |code: &str| {
        (StatusCode::NOT_FOUND, format!(r#"{{"errors":[{{"code":"{code}","message":"unknown"}}]}}"#)).into_response()
    };
    if let Some((_, reference)) = rest.split_once("/manifests/") {
        let found = registry.manifests.lock().expect("lock").get(reference).cloned();
        return match found {
            Some((media_type, bytes)) => {
                ([("content-type", media_type), ("docker-content-digest", reference.to_owned())], bytes).into_response()
            }
            None => not_found("MANIFEST_UNKNOWN"),
        };
    }
    if let Some((_, digest)) = rest.split_once("/blobs/") {
        *registry.blob_gets.lock().expect("lock").entry(digest.to_owned()).or_default() += 1;
        let Some(bytes) = registry.blobs.lock().expect("lock").get(digest).cloned() else {
            return not_found("BLOB_UNKNOWN");
        };
        let range = headers.get("range").and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let Some(r) = &range {
            registry.ranges.lock().expect("lock").push(r.clone());
        }
        let range = range.filter(|_| !registry.ignores_ranges.load(std::sync::atomic::Ordering::SeqCst));
        let start = match &range {
            Some(r) => {
                r.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).and_then(|n| n.parse().ok()).unwrap_or(0)
            }
            None => 0,
        };
        let body = bytes.slice(start.min(bytes.len())..);
        let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
        let content_range = format!("bytes {start}-{}/{}", bytes.len().saturating_sub(1), bytes.len());
        let cut = if bytes.len() > 1000 { registry.cuts.lock().expect("lock").pop_front() } else { None };
        let sent = cut.unwrap_or(body.len()).min(body.len());
        registry.bytes_sent.fetch_add(sent, std::sync::atomic::Ordering::SeqCst);
        let first = futures::stream::iter([Ok::<_, std::io::Error>(body.slice(..sent))]);
        // After the bytes sent, a cut: the stream is pending once (so the server flushes what it has) and
        // then fails, which makes the server close the connection before the announced length.
        let cut_off = futures::stream::iter(cut).then(|_| async {
            tokio::task::yield_now().await;
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut by the test"))
        });
        let chunks = first.chain(cut_off);
        return (
            status,
            [
                ("content-type", "application/octet-stream".to_owned()),
                ("content-length", body.len().to_string()),
                ("content-range", content_range),
            ],
            axum::body::Body::from_stream(chunks),
        )
            .into_response();
    }
    not_found("NAME_UNKNOWN")
}

async fn serve(registry: Arc<Registry>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind registry");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(v2_root))
        .route("/v2/{*rest}", axum::routing::get(v2))
        .with_state(registry);
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("registry server");
    });
    addr
}

struct Variant {
    manifest: Digest,
    gguf: Digest,
    runtime: Digest,
}

fn push_variant(registry: &Registry, name: &str, weights: &[u8]) -> (Variant, Vec<u8>) {
    let gguf = registry.blob(weights);
    let runtime_json = br#"{"context_size":1024,"parallel_slots":2}"#;
    let runtime = registry.blob(runtime_json);
    let config = registry.blob(b"{}");
    let mut weight = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, gguf.clone(), weights.len() as u64);
    weight.annotations.insert(ANNOTATION_TITLE.to_owned(), format!("{name}.gguf"));
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        artifact_type: Some(alki_shared::bundle::ARTIFACT_TYPE_MODEL.to_owned()),
        config: Descriptor::new(MEDIA_TYPE_EMPTY, config, 2),
        layers: vec![weight, Descriptor::new(MEDIA_TYPE_RUNTIME, runtime.clone(), runtime_json.len() as u64)],
        subject: None,
        annotations: Default::default(),
    };
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let digest = registry.manifest(MEDIA_TYPE_IMAGE_MANIFEST, bytes.clone());
    (Variant { manifest: digest, gguf, runtime }, bytes)
}

/// A two-variant bundle: q4 needs 1000 bytes of memory, q8 needs 5000.
fn push_bundle(registry: &Registry) -> (Digest, Variant, Variant) {
    let (q4_weights, q8_weights): (&[u8], &[u8]) = (b"GGUF q4 weights", b"GGUF q8 weights, larger");
    let (q4, q4_bytes) = push_variant(registry, "model-q4", q4_weights);
    let (q8, q8_bytes) = push_variant(registry, "model-q8", q8_weights);
    let entry = |digest: &Digest, bytes: &[u8], quant: &str, weights: u64, memory: u64| {
        let mut d = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, digest.clone(), bytes.len() as u64);
        d.annotations = variant_annotations(quant, "llama", "tiny", 1, 1024, weights, memory);
        d
    };
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_INDEX.to_owned()),
        artifact_type: None,
        manifests: vec![
            // Weights as the layers really are: the agent refuses a variant that claims otherwise.
            entry(&q4.manifest, &q4_bytes, "Q4_K_M", q4_weights.len() as u64, 1000),
            entry(&q8.manifest, &q8_bytes, "Q8_0", q8_weights.len() as u64, 5000),
        ],
        subject: None,
        annotations: Default::default(),
    };
    let digest = registry.manifest(MEDIA_TYPE_IMAGE_INDEX, serde_json::to_vec(&index).expect("json"));
    (digest, q4, q8)
}

fn location(registry: &str, digest: &Digest) -> BundleLocation {
    BundleLocation {
        registry: registry.to_owned(),
        repository: "acme/tiny".to_owned(),
        digest: digest.clone(),
        tag: String::new(),
    }
}

/// These tests are about moving bytes: the scripted registry holds no signatures, so the trust policy
/// says so explicitly (signatures are covered by trust.rs and the end-to-end tests).
async fn pull_unsigned(
    registry: &RegistryAccess,
    store: &ContentStore,
    bundles_dir: &Path,
    bundle: &BundleLocation,
    memory_available: u64,
    progress: &mut (dyn FnMut(PullProgress) + Send),
) -> Result<PulledBundle, PullError> {
    let options = PullOptions {
        trust: RepositoryTrust::allow_unsigned("test: the scripted registry holds no signatures"),
        ..PullOptions::default()
    };
    pull_bundle_with(registry, store, bundles_dir, bundle, memory_available, &options, progress).await
}

fn access(addr: SocketAddr) -> RegistryAccess {
    RegistryAccess::new(vec![addr.to_string()], addr.to_string(), Some(TOKEN.to_owned()))
}

fn store(dir: &Path) -> ContentStore {
    ContentStore::open(&dir.join("content")).expect("store")
}

#[tokio::test]
async fn pulls_the_variant_that_fits_and_materialises_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (bundle, q4, q8) = push_bundle(&registry);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let mut seen: Vec<PullProgress> = Vec::new();
        let pulled =
            pull_unsigned(&access(addr), &store, &dir.path().join("bundles"), &location("", &bundle), 2000, &mut |p| {
                seen.push(p)
            })
            .await
            .expect("pull");

        assert_eq!(pulled.variant_digest, q4.manifest, "Q8 needs more memory than available");
        assert_eq!(pulled.variant.as_ref().map(|v| v.quantization.as_str()), Some("Q4_K_M"));
        assert_eq!(pulled.dir, dir.path().join("bundles").join(q4.manifest.hex()));
        assert_eq!(pulled.model_files, vec![pulled.dir.join("model-q4.gguf")]);
        assert_eq!(std::fs::read(&pulled.model_files[0]).expect("model"), b"GGUF q4 weights");
        let defaults = pulled.runtime_defaults.expect("runtime layer");
        assert_eq!((defaults.context_size, defaults.parallel_slots), (1024, 2));
        assert!(store.contains(&q4.gguf).await && store.contains(&q4.runtime).await);
        assert!(!store.contains(&q8.gguf).await, "the other variant is not fetched");
        assert_eq!(registry.gets(&q8.gguf), 0);
        let last = seen.last().expect("progress reported");
        assert_eq!(last.bytes_done, last.bytes_total);
        assert_eq!(last.bytes_total, pulled.bytes_total);
        let expected = format!("Basic {}", base64(format!("alki-agent:{TOKEN}").as_bytes()));
        assert!(
            registry.authorizations.lock().expect("lock").contains(&expected),
            "token sent to the embedded registry"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_variant_the_controller_prefers_is_pulled_when_it_fits() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (bundle, q4, q8) = push_bundle(&registry);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let options = PullOptions {
            trust: RepositoryTrust::allow_unsigned("test: the scripted registry holds no signatures"),
            preferred_variant: Some(q4.manifest.clone()),
            ..PullOptions::default()
        };
        // Both fit in 10,000 bytes; left to itself the device would take Q8.
        let bundles = dir.path().join("bundles");
        let pulled =
            pull_bundle_with(&access(addr), &store, &bundles, &location("", &bundle), 10_000, &options, &mut |_| {})
                .await
                .expect("pull");
        assert_eq!(pulled.variant_digest, q4.manifest);
        assert_eq!(registry.gets(&q8.gguf), 0, "the other variant is not fetched");

        // A preference that does not fit is only a preference: the device's own choice wins.
        let options = PullOptions { preferred_variant: Some(q8.manifest.clone()), ..options };
        let pulled =
            pull_bundle_with(&access(addr), &store, &bundles, &location("", &bundle), 2000, &options, &mut |_| {})
                .await
                .expect("pull");
        assert_eq!(pulled.variant_digest, q4.manifest);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn blobs_already_stored_are_not_fetched_again() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (bundle, q4, _) = push_bundle(&registry);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let bundles = dir.path().join("bundles");
        let first = pull_unsigned(&access(addr), &store, &bundles, &location("", &bundle), 2000, &mut |_| {})
            .await
            .expect("first pull");
        assert_eq!(first.bytes_fetched, first.bytes_total);
        assert_eq!(registry.gets(&q4.gguf), 1);
        let second = pull_unsigned(&access(addr), &store, &bundles, &location("", &bundle), 2000, &mut |_| {})
            .await
            .expect("second pull");
        assert_eq!(second.bytes_fetched, 0);
        assert_eq!(registry.gets(&q4.gguf), 1, "the layer was not downloaded again");
        assert_eq!(second.model_files, first.model_files);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_corrupt_layer_is_a_digest_mismatch_naming_the_layer() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (bundle, q4, _) = push_bundle(&registry);
        // Same length, different bytes: only the digest can tell.
        registry.blobs.lock().expect("lock").insert(q4.gguf.to_string(), Bytes::from_static(b"GGUF q4 WEIGHTS"));
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let err = pull_unsigned(
            &access(addr),
            &store,
            &dir.path().join("bundles"),
            &location("", &bundle),
            2000,
            &mut |_| {},
        )
        .await
        .expect_err("corrupt layer");
        assert_eq!(err.code(), ErrorCode::DigestMismatch);
        assert_eq!(err.layer_digest(), Some(&q4.gguf));
        let message = err.to_string();
        assert!(message.starts_with("bundle acme/tiny@sha256:"), "{message}");
        assert!(message.contains(&Digest::of(b"GGUF q4 WEIGHTS").to_string()), "names the actual digest: {message}");
        assert!(message.contains("push the bundle again"), "{message}");
        assert!(!store.contains(&q4.gguf).await, "nothing corrupt is kept");
        assert_eq!(registry.gets(&q4.gguf), 1, "a mismatch is not retried");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn every_blob_is_asked_for_with_a_range_and_a_registry_that_ignores_ranges_still_verifies() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // A registry with ranges: every blob request is a range request (from byte 0 at first).
        let registry = Arc::new(Registry::default());
        let (bundle, _, _) = push_bundle(&registry);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        pull_unsigned(
            &access(addr),
            &store(dir.path()),
            &dir.path().join("bundles"),
            &location("", &bundle),
            2000,
            &mut |_| {},
        )
        .await
        .expect("the pull completes");
        let gets: usize = registry.blob_gets.lock().expect("lock").values().sum();
        assert!(gets > 0);
        assert_eq!(registry.ranges.lock().expect("lock").clone(), vec!["bytes=0-".to_owned(); gets]);

        // One that answers 200 with the whole blob: pulled and verified all the same, and a corrupt layer is
        // still a digest mismatch naming it.
        let registry = Arc::new(Registry::default());
        registry.ignores_ranges.store(true, std::sync::atomic::Ordering::SeqCst);
        let (bundle, q4, _) = push_bundle(&registry);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let pulled = pull_unsigned(
            &access(addr),
            &store(dir.path()),
            &dir.path().join("bundles"),
            &location("", &bundle),
            2000,
            &mut |_| {},
        )
        .await
        .expect("the pull completes without ranges");
        assert_eq!(std::fs::read(&pulled.model_files[0]).expect("read"), b"GGUF q4 weights");
        registry.blobs.lock().expect("lock").insert(q4.gguf.to_string(), Bytes::from_static(b"GGUF q4 WEIGHTS"));
        let dir = tempfile::tempdir().expect("tempdir");
        let err = pull_unsigned(
            &access(addr),
            &store(dir.path()),
            &dir.path().join("bundles"),
            &location("", &bundle),
            2000,
            &mut |_| {},
        )
        .await
        .expect_err("corrupt layer");
        assert_eq!(err.code(), ErrorCode::DigestMismatch);
        assert_eq!(err.layer_digest(), Some(&q4.gguf));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_layer_longer_than_its_descriptor_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (bundle, q4, _) = push_bundle(&registry);
        registry.blobs.lock().expect("lock").insert(q4.gguf.to_string(), Bytes::from(vec![b'x'; 4096]));
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let err = pull_unsigned(
            &access(addr),
            &store,
            &dir.path().join("bundles"),
            &location("", &bundle),
            2000,
            &mut |_| {},
        )
        .await
        .expect_err("oversized layer");
        assert_eq!(err.code(), ErrorCode::DigestMismatch);
        assert_eq!(err.layer_digest(), Some(&q4.gguf));
        assert!(err.to_string().contains("its descriptor says 15"), "{err}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_manifest_that_does_not_match_the_asked_digest_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (bundle, _, _) = push_bundle(&registry);
        let forged = Digest::of(b"what the controller asked for");
        let real = registry.manifests.lock().expect("lock").get(bundle.as_str()).cloned().expect("index");
        registry.manifests.lock().expect("lock").insert(forged.to_string(), real);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let err = pull_unsigned(
            &access(addr),
            &store(dir.path()),
            &dir.path().join("bundles"),
            &location("", &forged),
            2000,
            &mut |_| {},
        )
        .await
        .expect_err("forged index");
        assert_eq!(err.code(), ErrorCode::DigestMismatch, "{err}");
        assert_eq!(err.layer_digest(), Some(&forged));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_single_manifest_is_a_one_variant_bundle_and_memory_limits_apply() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (variant, _) = push_variant(&registry, "solo", b"GGUF solo");
        let (index, _, _) = push_bundle(&registry);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let bundles = dir.path().join("bundles");
        let pulled =
            pull_unsigned(&access(addr), &store, &bundles, &location("", &variant.manifest), 2000, &mut |_| {})
                .await
                .expect("single manifest");
        assert_eq!(pulled.variant_digest, variant.manifest);
        assert!(pulled.variant.is_none());
        assert_eq!(pulled.model_files, vec![bundles.join(variant.manifest.hex()).join("solo.gguf")]);

        let err = pull_unsigned(&access(addr), &store, &bundles, &location("", &index), 999, &mut |_| {})
            .await
            .expect_err("nothing fits");
        assert_eq!(err.code(), ErrorCode::NoVariantFits);
        assert!(err.to_string().contains("Q4_K_M"), "lists what the variants need: {err}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_token_goes_to_the_embedded_registry_only() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (bundle, _, _) = push_bundle(&registry);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        // The same registry named explicitly while the embedded one is elsewhere: it is a foreign registry.
        let foreign =
            RegistryAccess::new(vec![addr.to_string()], "controller.invalid:7070".to_owned(), Some(TOKEN.to_owned()));
        let err = pull_unsigned(
            &foreign,
            &store(dir.path()),
            &dir.path().join("bundles"),
            &location(&addr.to_string(), &bundle),
            2000,
            &mut |_| {},
        )
        .await
        .expect_err("anonymous pull refused");
        assert_eq!(err.code(), ErrorCode::PullFailed, "{err}");
        assert!(registry.authorizations.lock().expect("lock").is_empty(), "no credentials were sent");
        assert!(err.to_string().contains("check that the registry is reachable"), "{err}");
    })
    .await
    .expect("test timed out");
}

/// Bytes that do not repeat in any short period (so a misplaced range cannot hash right by chance).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const BIG: usize = 256 << 10;

/// Pulls a 256 KiB layer whose first response breaks off after 100,000 bytes, from a registry that honours
/// ranges or not; checks the resume was asked for and the layer arrived whole. Returns the pull and the
/// bytes the registry sent for it.
async fn pull_through_a_cut(ignores_ranges: bool) -> (PulledBundle, usize) {
    let registry = Arc::new(Registry::default());
    registry.ignores_ranges.store(ignores_ranges, std::sync::atomic::Ordering::SeqCst);
    let weights = noise(BIG);
    let (variant, _) = push_variant(&registry, "big", &weights);
    registry.cuts.lock().expect("lock").push_back(100_000);
    let addr = serve(registry.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let bundle = location("", &variant.manifest);
    let pulled = pull_unsigned(&access(addr), &store, &dir.path().join("bundles"), &bundle, 1 << 30, &mut |_| {})
        .await
        .expect("the pull completes after the cut");
    assert_eq!(registry.resumed_ranges(), vec!["bytes=100000-".to_owned()], "a resume was asked for");
    assert_eq!(registry.gets(&variant.gguf), 2);
    assert_eq!(std::fs::read(&pulled.model_files[0]).expect("read"), weights);
    let sent = registry.bytes_sent.load(std::sync::atomic::Ordering::SeqCst);
    (pulled, sent)
}

#[tokio::test]
async fn a_cut_connection_resumes_with_a_range_and_downloads_each_byte_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (pulled, sent) = pull_through_a_cut(false).await;
        assert_eq!(sent as u64, pulled.bytes_total, "every byte of every blob was sent once");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_cut_connection_with_a_registry_that_ignores_ranges_downloads_again_from_zero() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (pulled, sent) = pull_through_a_cut(true).await;
        assert_eq!(sent as u64, pulled.bytes_total + 100_000, "the layer was sent again whole");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_abandoned_pull_resumes_after_a_restart_from_the_bytes_on_disk() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let weights = noise(BIG);
        let (variant, _) = push_variant(&registry, "big", &weights);
        // Every attempt of the first pull breaks off: 50000 bytes, then 10000 more twice.
        registry.cuts.lock().expect("lock").extend([50_000, 10_000, 10_000]);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let bundles = dir.path().join("bundles");
        let bundle = location("", &variant.manifest);
        let err = pull_unsigned(&access(addr), &store(dir.path()), &bundles, &bundle, 1 << 30, &mut |_| {})
            .await
            .expect_err("the network is too flaky this time");
        assert_eq!(err.code(), ErrorCode::PullFailed, "retryable");
        assert!(err.to_string().contains("broke off with 70000 of 262144 bytes on disk"), "{err}");

        // The agent restarts (the store is opened again) and pulls again: only the rest is downloaded.
        let sent_before = registry.bytes_sent.load(std::sync::atomic::Ordering::SeqCst);
        let pulled = pull_unsigned(&access(addr), &store(dir.path()), &bundles, &bundle, 1 << 30, &mut |_| {})
            .await
            .expect("the pull completes");
        assert_eq!(registry.resumed_ranges().last().map(String::as_str), Some("bytes=70000-"));
        let sent = registry.bytes_sent.load(std::sync::atomic::Ordering::SeqCst) - sent_before;
        // The config blob (2 bytes) was stored by the first pull; the runtime layer comes after the weights.
        assert_eq!(sent as u64, pulled.bytes_total - 2 - 70_000, "only the missing bytes were sent");
        assert_eq!(std::fs::read(&pulled.model_files[0]).expect("read"), weights);
        assert!(std::fs::read_dir(dir.path().join("content/partial")).expect("partial dir").next().is_none());
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_corrupt_partial_download_is_detected_and_downloaded_again_from_zero() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let weights = noise(BIG);
        let (variant, _) = push_variant(&registry, "big", &weights);
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        // What a power cut can leave: a partial file whose end is not what the registry sent.
        std::fs::write(dir.path().join("content/partial").join(variant.gguf.hex()), vec![0u8; 1000]).expect("write");
        let pulled = pull_unsigned(
            &access(addr),
            &store,
            &dir.path().join("bundles"),
            &location("", &variant.manifest),
            1 << 30,
            &mut |_| {},
        )
        .await
        .expect("the pull recovers");
        assert_eq!(registry.resumed_ranges(), vec!["bytes=1000-".to_owned()]);
        assert_eq!(registry.gets(&variant.gguf), 2, "resumed once, then downloaded again from zero");
        assert_eq!(std::fs::read(&pulled.model_files[0]).expect("read"), weights);
        assert_eq!(store.size(&variant.gguf).await, Some(BIG as u64));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_pull_that_would_eat_the_disk_reserve_evicts_unused_blobs_then_refuses_with_the_reason() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Arc::new(Registry::default());
        let (variant, _) = push_variant(&registry, "big", &noise(BIG));
        let addr = serve(registry.clone()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let (kept, unused) = (Digest::of(b"active bundle blob"), Digest::of(b"old bundle blob"));
        store.write_bytes(&kept, b"active bundle blob").await.expect("kept");
        store.write_bytes(&unused, b"old bundle blob").await.expect("unused");
        let bundles = dir.path().join("bundles");
        std::fs::create_dir_all(bundles.join(Digest::of(b"old variant").hex())).expect("old variant dir");
        std::fs::create_dir_all(bundles.join(Digest::of(b"active variant").hex())).expect("active variant dir");
        let options = PullOptions {
            disk_reserve: u64::MAX / 4,
            keep: [kept.clone()].into(),
            keep_variants: vec![Digest::of(b"active variant")],
            bandwidth: None,
            trust: RepositoryTrust::allow_unsigned("test: the scripted registry holds no signatures"),
            preferred_variant: None,
        };
        let err = pull_bundle_with(
            &access(addr),
            &store,
            &bundles,
            &location("", &variant.manifest),
            1 << 30,
            &options,
            &mut |_| {},
        )
        .await
        .expect_err("no disk holds the reserve");
        assert_eq!(err.code(), ErrorCode::DiskFull);
        let message = err.to_string();
        assert!(message.contains("plus a reserve of") && message.contains("disk_reserve_mib"), "{message}");
        assert_eq!(registry.gets(&variant.gguf), 0, "nothing was downloaded");
        assert!(!store.contains(&unused).await, "the unused blob was evicted first");
        assert!(store.contains(&kept).await, "the active bundle's blob stays");
        assert!(!bundles.join(Digest::of(b"old variant").hex()).exists());
        assert!(bundles.join(Digest::of(b"active variant").hex()).exists());
    })
    .await
    .expect("test timed out");
}
