//! Garbage collection of the embedded registry: what is swept and what never is (referenced blobs,
//! young blobs, uploads in flight), the admin route and `alkictl registry gc`, the schedule in `serve`,
//! and the invariant under concurrent pushes: a stored manifest never loses a blob.

use std::sync::Arc;
use std::time::Duration;

use alki_controller::config::ControllerConfig;
use alki_controller::registry::{self, GcReport};
use alki_shared::clock::{ManualClock, UnixMs};
use alki_shared::digest::Digest;
use alki_shared::oci::{MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST};
use reqwest::{Method, StatusCode};
use serde_json::json;

mod common;

use common::{Harness, bounded, start, start_with_clock};

impl Harness {
    /// Pushes an empty config, one layer, and an image manifest referencing them under `reference`.
    async fn push_image(&self, repo: &str, reference: &str, layer: &[u8]) -> (Digest, Vec<u8>) {
        let config = self.push_blob(repo, b"{}").await;
        let layer_digest = self.push_blob(repo, layer).await;
        let bytes = image_manifest(&config, &layer_digest, layer.len());
        let status = self.put_manifest(repo, reference, MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await.status();
        assert_eq!(status, StatusCode::CREATED, "pushing a manifest to {repo}:{reference}");
        (Digest::of(&bytes), bytes)
    }

    async fn blob_status(&self, repo: &str, digest: &Digest) -> StatusCode {
        self.req(Method::GET, &format!("/v2/{repo}/blobs/{digest}")).send().await.expect("get blob").status()
    }

    async fn manifest_status(&self, repo: &str, reference: &str) -> StatusCode {
        self.req(Method::GET, &format!("/v2/{repo}/manifests/{reference}")).send().await.expect("get").status()
    }

    /// Collects garbage through the admin route.
    async fn gc(&self, grace_secs: u64) -> GcReport {
        let resp = self
            .client
            .post(format!("http://{}/api/v1/registry/gc?grace_secs={grace_secs}", self.addr))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("gc");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.expect("GC report")
    }

    /// Collects garbage by calling the registry directly.
    async fn gc_direct(&self, grace: Duration) -> GcReport {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.gc(grace)).await.expect("join").expect("gc")
    }
}

fn image_manifest(config: &Digest, layer: &Digest, layer_size: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw", "digest": layer, "size": layer_size}],
    }))
    .expect("json")
}

#[tokio::test]
async fn gc_sweeps_unreferenced_blobs_and_keeps_everything_a_manifest_references() {
    bounded(async {
        let h = start().await;
        let (tagged, _) = h.push_image("acme/qwen", "v1", b"tagged layer").await;
        // An untagged manifest (pushed by digest) and a variant listed only by an index keep their blobs.
        let config = Digest::of(b"{}");
        let untagged_layer = h.push_blob("acme/qwen", b"untagged layer").await;
        let untagged = image_manifest(&config, &untagged_layer, 14);
        let untagged_digest = Digest::of(&untagged);
        assert_eq!(
            h.put_manifest("acme/qwen", untagged_digest.as_str(), MEDIA_TYPE_IMAGE_MANIFEST, &untagged).await.status(),
            StatusCode::CREATED
        );
        let (variant, variant_bytes) = h.push_image("acme/bundle", untagged_digest.as_str(), b"untagged layer").await;
        assert_eq!(variant, untagged_digest);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_IMAGE_INDEX,
            "manifests": [{"mediaType": MEDIA_TYPE_IMAGE_MANIFEST, "digest": variant, "size": variant_bytes.len()}],
        }))
        .expect("json");
        assert_eq!(
            h.put_manifest("acme/bundle", "latest", MEDIA_TYPE_IMAGE_INDEX, &index).await.status(),
            StatusCode::CREATED
        );

        // Garbage: a blob never referenced, and one shared by two repositories and referenced by neither.
        let stray = h.push_blob("acme/qwen", b"stray, never referenced").await;
        let shared = h.push_blob("acme/qwen", b"shared stray").await;
        assert_eq!(h.push_blob("acme/other", b"shared stray").await, shared);

        let report = h.gc(0).await;
        assert_eq!(report.grace_secs, 0);
        assert_eq!(report.unreferenced, 2);
        assert_eq!(report.blobs_deleted, 2);
        assert_eq!(report.links_removed, 3);
        assert_eq!(report.bytes_freed, (b"stray, never referenced".len() + b"shared stray".len()) as u64);
        assert_eq!(report.kept_recent, 0);
        assert_eq!(h.blob_status("acme/qwen", &stray).await, StatusCode::NOT_FOUND);
        assert_eq!(h.blob_status("acme/qwen", &shared).await, StatusCode::NOT_FOUND);
        assert_eq!(h.blob_status("acme/other", &shared).await, StatusCode::NOT_FOUND);
        assert!(h.registry.blob_path(&stray).is_none() && h.registry.blob_path(&shared).is_none(), "files deleted");

        for (repo, reference) in [
            ("acme/qwen", "v1"),
            ("acme/qwen", tagged.as_str()),
            ("acme/qwen", untagged_digest.as_str()),
            ("acme/bundle", "latest"),
            ("acme/bundle", variant.as_str()),
        ] {
            assert_eq!(h.manifest_status(repo, reference).await, StatusCode::OK, "{repo}@{reference}");
        }
        let tagged_layer = Digest::of(b"tagged layer");
        for (repo, digest) in [
            ("acme/qwen", &config),
            ("acme/qwen", &tagged_layer),
            ("acme/qwen", &untagged_layer),
            ("acme/bundle", &config),
        ] {
            assert_eq!(h.blob_status(repo, digest).await, StatusCode::OK, "{repo} {digest}");
        }

        // Nothing left to collect; a second run is harmless.
        let again = h.gc(0).await;
        assert_eq!((again.unreferenced, again.blobs_deleted), (0, 0));
    })
    .await;
}

#[tokio::test]
async fn gc_keeps_unreferenced_blobs_younger_than_the_grace_period() {
    bounded(async {
        // The registry's clock moves only when the test says: no waiting out the grace period.
        let clock = ManualClock::starting_at(UnixMs::now());
        let h = start_with_clock(registry::RegistryConfig::default(), clock.clone()).await;
        let stray = h.push_blob("acme/qwen", b"pushed a moment ago").await;
        let report = h.gc(3600).await;
        assert_eq!((report.unreferenced, report.kept_recent, report.blobs_deleted), (1, 1, 0));
        assert_eq!(h.blob_status("acme/qwen", &stray).await, StatusCode::OK);

        // A client that just found the blob present may reference it next: reading it makes it young again.
        let grace = Duration::from_secs(2);
        clock.advance(grace + Duration::from_millis(100));
        assert_eq!(h.blob_status("acme/qwen", &stray).await, StatusCode::OK);
        let report = h.gc_direct(grace).await;
        assert_eq!((report.kept_recent, report.blobs_deleted), (1, 0), "read within the grace period");

        clock.advance(grace + Duration::from_millis(100));
        let report = h.gc_direct(grace).await;
        assert_eq!((report.kept_recent, report.blobs_deleted), (0, 1), "older than the grace period");
        assert_eq!(h.blob_status("acme/qwen", &stray).await, StatusCode::NOT_FOUND);
    })
    .await;
}

#[tokio::test]
async fn gc_never_touches_an_upload_in_flight_or_the_blobs_of_its_repository() {
    bounded(async {
        let h = start().await;
        let earlier = h.push_blob("acme/qwen", b"first layer of a push still running").await;
        let elsewhere = h.push_blob("acme/idle", b"garbage in an idle repository").await;
        let resp = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("start");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let location = resp.headers()["location"].to_str().expect("location").to_owned();
        let resp = h
            .req(Method::PATCH, &location)
            .header("content-range", "0-9")
            .body(&b"0123456789"[..])
            .send()
            .await
            .expect("patch");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);

        let report = h.gc(0).await;
        assert_eq!((report.unreferenced, report.kept_recent, report.blobs_deleted), (2, 1, 1));
        assert_eq!(h.blob_status("acme/idle", &elsewhere).await, StatusCode::NOT_FOUND);
        assert_eq!(h.blob_status("acme/qwen", &earlier).await, StatusCode::OK, "its push is still running");

        let resp = h.req(Method::GET, &location).send().await.expect("status");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "the upload survived");
        assert_eq!(resp.headers()["range"], "0-9");
        let whole = Digest::of(b"0123456789abc");
        let resp =
            h.req(Method::PUT, &format!("{location}?digest={whole}")).body(&b"abc"[..]).send().await.expect("put");
        assert_eq!(resp.status(), StatusCode::CREATED);

        // The push ends with its manifest: both blobs are referenced and stay.
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
            "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": earlier, "size": 36},
            "layers": [{"mediaType": "application/octet-stream", "digest": whole, "size": 13}],
        }))
        .expect("json");
        assert_eq!(
            h.put_manifest("acme/qwen", "v1", MEDIA_TYPE_IMAGE_MANIFEST, &manifest).await.status(),
            StatusCode::CREATED
        );
        let report = h.gc(0).await;
        assert_eq!((report.unreferenced, report.blobs_deleted), (0, 0));
        assert_eq!(h.blob_status("acme/qwen", &whole).await, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn gc_deletes_blob_files_no_repository_links() {
    bounded(async {
        let h = start().await;
        // What a crash between a file's rename and its index link leaves behind.
        let content = b"renamed into place, never linked";
        let digest = Digest::of(content);
        let path = h.dir.path().join("blobs").join(digest.storage_path());
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write");
        let (manifest, _) = h.push_image("acme/qwen", "v1", b"kept").await;

        let report = h.gc(3600).await;
        assert_eq!(report.blobs_deleted, 0, "a young file is kept");
        let report = h.gc(0).await;
        assert_eq!((report.blobs_deleted, report.bytes_freed), (1, content.len() as u64));
        assert!(!path.exists());
        assert!(h.registry.blob_path(&manifest).is_some(), "linked files stay");
    })
    .await;
}

#[tokio::test]
async fn gc_route_needs_an_admin_token() {
    bounded(async {
        let h = start().await;
        let url = format!("http://{}/api/v1/registry/gc", h.addr);
        let resp = h.client.post(&url).send().await.expect("post");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let resp = h.client.post(&url).bearer_auth(&h.push).send().await.expect("post");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let body: serde_json::Value = resp.json().await.expect("error body");
        assert_eq!(body["errors"][0]["code"], "DENIED");
        let resp = h.client.post(format!("{url}?grace_secs=soon")).bearer_auth(&h.admin).send().await.expect("post");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let resp = h.client.get(&url).bearer_auth(&h.admin).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);

        // Without grace_secs the configured grace period (an hour) applies.
        h.push_blob("acme/qwen", b"young").await;
        let resp = h.client.post(&url).bearer_auth(&h.admin).send().await.expect("post");
        assert_eq!(resp.status(), StatusCode::OK);
        let report: GcReport = resp.json().await.expect("report");
        assert_eq!((report.grace_secs, report.kept_recent, report.blobs_deleted), (3600, 1, 0));
    })
    .await;
}

#[tokio::test]
async fn alkictl_registry_gc_runs_a_collection() {
    bounded(async {
        let h = start().await;
        let stray = h.push_blob("acme/qwen", b"stray").await;
        let run = |token: &str| {
            let args = ["alkictl", "--registry", h.addr.as_str(), "--token", token, "-o", "json", "registry", "gc"];
            let args = args.into_iter().chain(["--grace-secs", "0", "--insecure-plain-http"]);
            alkictl::run(alkictl::parse_from(args).expect("arguments parse"))
        };
        let refused = run(&h.push).await.expect_err("a push token may not collect garbage");
        assert!(format!("{refused:#}").contains("admin token"), "{refused:#}");
        assert_eq!(h.blob_status("acme/qwen", &stray).await, StatusCode::OK);
        run(&h.admin).await.expect("alkictl registry gc");
        assert_eq!(h.blob_status("acme/qwen", &stray).await, StatusCode::NOT_FOUND);

        let report =
            alkictl::registry::request_gc(&format!("http://{}", h.addr), Some(&h.admin), None, &[]).await.expect("gc");
        assert_eq!(report.grace_secs, 3600);
    })
    .await;
}

#[tokio::test]
async fn a_stored_manifest_never_loses_a_blob_to_a_concurrent_collection() {
    bounded(async {
        let h = Arc::new(start().await);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let collector = {
            let (h, stop) = (h.clone(), stop.clone());
            tokio::spawn(async move {
                let mut runs = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    h.gc_direct(Duration::ZERO).await;
                    runs += 1;
                    tokio::task::yield_now().await;
                }
                runs
            })
        };
        // Pushers race the collector with a zero grace period: a manifest PUT may be refused because its
        // blob was collected first (MANIFEST_BLOB_UNKNOWN), but one that is stored keeps all its blobs.
        let mut pushers = Vec::new();
        for p in 0..3u32 {
            let h = h.clone();
            pushers.push(tokio::spawn(async move {
                let mut stored = Vec::new();
                for i in 0..15u32 {
                    let repo = format!("acme/p{p}");
                    let layer = format!("layer {p}/{i}").into_bytes();
                    let config = h.push_blob(&repo, b"{}").await;
                    let layer_digest = h.push_blob(&repo, &layer).await;
                    let bytes = image_manifest(&config, &layer_digest, layer.len());
                    let tag = format!("t{i}");
                    match h.put_manifest(&repo, &tag, MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await.status() {
                        StatusCode::CREATED => stored.push((repo, tag, config, layer_digest)),
                        StatusCode::BAD_REQUEST => {}
                        other => panic!("unexpected manifest PUT status {other}"),
                    }
                }
                stored
            }));
        }
        let mut stored = Vec::new();
        for pusher in pushers {
            stored.extend(pusher.await.expect("pusher"));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let runs = collector.await.expect("collector");
        assert!(runs > 0, "the collector ran during the pushes");
        assert!(!stored.is_empty(), "some pushes got through");
        // A refused push may leave a blob behind; one more run collects it, and then nothing is left.
        let report = h.gc_direct(Duration::ZERO).await;
        assert_eq!(report.kept_recent, 0, "no upload is in flight any more");
        let report = h.gc_direct(Duration::ZERO).await;
        assert_eq!(report.unreferenced, 0, "only referenced blobs remain");
        for (repo, tag, config, layer) in &stored {
            assert_eq!(h.manifest_status(repo, tag).await, StatusCode::OK);
            assert_eq!(h.blob_status(repo, config).await, StatusCode::OK, "{repo}:{tag} config");
            assert_eq!(h.blob_status(repo, layer).await, StatusCode::OK, "{repo}:{tag} layer");
        }
    })
    .await;
}

#[tokio::test]
async fn serve_collects_garbage_on_its_schedule() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let addr = http.local_addr().expect("addr");
        let mut config = ControllerConfig::new(dir.path().to_owned());
        // A scripted agent over plaintext with a token of role agent: the TLS and enrollment paths are
        // covered by tests/enroll.rs and e2e/tests/enrollment.rs.
        config.insecure_plaintext = true;
        config.insecure_agent_tokens = true;
        config.registry.gc_interval = Duration::from_millis(200);
        config.registry.gc_grace = Duration::ZERO;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
            let _ = stopped.await;
        }));
        let token_path = dir.path().join("admin.token");
        let admin = loop {
            if let Ok(t) = tokio::fs::read_to_string(&token_path).await
                && !t.trim().is_empty()
            {
                break t.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let client = reqwest::Client::new();
        let digest = Digest::of(b"scheduled garbage");
        let resp = client
            .post(format!("http://{addr}/v2/acme/qwen/blobs/uploads/?digest={digest}"))
            .bearer_auth(&admin)
            .body(&b"scheduled garbage"[..])
            .send()
            .await
            .expect("push");
        assert_eq!(resp.status(), StatusCode::CREATED);
        let blob_url = format!("http://{addr}/v2/acme/qwen/blobs/{digest}");
        // Polling with GET would keep the blob young; HEAD-free polling of the file instead.
        let path = dir.path().join("blobs").join(digest.storage_path());
        while path.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let resp = client.get(&blob_url).bearer_auth(&admin).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let _ = stop.send(());
        server.await.expect("join").expect("serve stops cleanly");
    })
    .await;
}
