//! Integration tests of the embedded OCI registry: the real router served on 127.0.0.1:0, driven with
//! reqwest the way registry clients (skopeo, oras, oci-client) drive it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_controller::registry::{Registry, RegistryConfig};
use alki_controller::store::Store;
use alki_shared::digest::{Digest, Hasher};
use alki_shared::oci::{MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST};
use bytes::Bytes;
use futures::StreamExt as _;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

mod common;

use common::{Harness, bounded, start, start_with};

impl Harness {
    fn uploads_dir(&self) -> PathBuf {
        self.dir.path().join("uploads")
    }

    /// Pushes an empty config and the given layers, then an image manifest tagged `tag`.
    async fn push_image(&self, repo: &str, tag: &str, layers: &[&[u8]]) -> (Digest, Vec<u8>) {
        let config = self.push_blob(repo, b"{}").await;
        let mut descriptors = Vec::new();
        for layer in layers {
            let digest = self.push_blob(repo, layer).await;
            descriptors.push((digest, layer.len() as u64));
        }
        let bytes = image_manifest(&config, &descriptors, None, None);
        let resp = self.put_manifest(repo, tag, MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "pushing a manifest to {repo}:{tag}");
        (Digest::of(&bytes), bytes)
    }
}

fn image_manifest(
    config: &Digest,
    layers: &[(Digest, u64)],
    subject: Option<(&Digest, u64)>,
    artifact_type: Option<&str>,
) -> Vec<u8> {
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": config, "size": 2},
        "layers": layers.iter().map(|(d, size)| json!({
            "mediaType": "application/vnd.cncf.model.weight.v1.raw", "digest": d, "size": size
        })).collect::<Vec<_>>(),
    });
    if let Some((digest, size)) = subject {
        manifest["subject"] = json!({"mediaType": MEDIA_TYPE_IMAGE_MANIFEST, "digest": digest, "size": size});
    }
    if let Some(artifact_type) = artifact_type {
        manifest["artifactType"] = artifact_type.into();
    }
    serde_json::to_vec_pretty(&manifest).expect("json")
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

async fn error_code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("error body is JSON");
    body["errors"][0]["code"].as_str().expect("errors[0].code").to_owned()
}

fn dir_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).expect("list dir").count()
}

/// Waits (bounded by the test's timeout) until `dir` is empty: background deletions are asynchronous.
async fn until_empty(dir: &Path) {
    while dir_entries(dir) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn v2_root_needs_credentials_and_names_the_api_version() {
    bounded(async {
        let h = start().await;
        let resp = h.client.get(format!("{}/v2/", h.base)).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&resp, "www-authenticate"), "Basic realm=\"alki\"");
        assert_eq!(error_code(resp).await, "UNAUTHORIZED");

        let resp = h.req(Method::GET, "/v2/").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "docker-distribution-api-version"), "registry/2.0");

        // Registry clients retry with Basic, the token as the password.
        let resp = h.client.get(format!("{}/v2/", h.base)).basic_auth("ci", Some(&h.push)).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);

        let resp = h.client.get(format!("{}/v2/", h.base)).bearer_auth("alki_not_a_token").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

        let digest = Digest::of(b"x");
        let resp = h.client.get(format!("{}/v2/acme/blobs/{digest}", h.base)).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&resp, "www-authenticate"), "Basic realm=\"alki\"");
    })
    .await;
}

#[tokio::test]
async fn agent_token_may_read_but_not_write() {
    bounded(async {
        let h = start().await;
        let digest = h.push_blob("acme/models", b"weights").await;
        let agent =
            |method: Method, path: &str| h.client.request(method, format!("{}{path}", h.base)).bearer_auth(&h.agent);
        let resp = agent(Method::GET, &format!("/v2/acme/models/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = agent(Method::POST, "/v2/acme/models/blobs/uploads/").send().await.expect("post");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(resp).await, "DENIED");
        let resp = agent(Method::DELETE, &format!("/v2/acme/models/blobs/{digest}")).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    })
    .await;
}

#[tokio::test]
async fn monolithic_push_then_get_and_head() {
    bounded(async {
        let h = start().await;
        let content = b"a small GGUF stand-in".to_vec();
        let digest = Digest::of(&content);
        let resp = h
            .req(Method::POST, &format!("/v2/acme/models/qwen/blobs/uploads/?digest={digest}"))
            .body(content.clone())
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(header(&resp, "location"), format!("/v2/acme/models/qwen/blobs/{digest}"));
        assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());

        let resp = h.req(Method::GET, &format!("/v2/acme/models/qwen/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
        assert_eq!(header(&resp, "content-length"), content.len().to_string());
        assert_eq!(header(&resp, "accept-ranges"), "bytes");
        assert_eq!(resp.bytes().await.expect("body"), content);

        let resp = h.req(Method::HEAD, &format!("/v2/acme/models/qwen/blobs/{digest}")).send().await.expect("head");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-length"), content.len().to_string());
        assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
        assert!(resp.bytes().await.expect("body").is_empty());

        // Blobs are visible per repository.
        let resp = h.req(Method::GET, &format!("/v2/acme/other/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
        assert_eq!(h.registry.blob_path(&digest), Some(h.dir.path().join("blobs").join(digest.storage_path())));
        assert_eq!(dir_entries(&h.uploads_dir()), 0);
    })
    .await;
}

#[tokio::test]
async fn chunked_push_with_two_patches_then_put() {
    bounded(async {
        let h = start().await;
        let (one, two, three) = (vec![1u8; 1000], vec![2u8; 3000], vec![3u8; 10]);
        let whole: Vec<u8> = [one.as_slice(), &two, &three].concat();
        let digest = Digest::of(&whole);

        let resp = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(header(&resp, "range"), "0-0");
        let uuid = header(&resp, "docker-upload-uuid");
        let location = header(&resp, "location");
        assert_eq!(location, format!("/v2/acme/qwen/blobs/uploads/{uuid}"));

        let resp = h
            .req(Method::PATCH, &location)
            .header("content-range", "0-999")
            .header("content-type", "application/octet-stream")
            .body(one)
            .send()
            .await
            .expect("patch 1");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(header(&resp, "range"), "0-999");
        let location = header(&resp, "location");

        let resp = h.req(Method::GET, &location).send().await.expect("status");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&resp, "range"), "0-999");

        let resp = h
            .req(Method::PATCH, &location)
            .header("content-range", "1000-3999")
            .body(two)
            .send()
            .await
            .expect("patch 2");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(header(&resp, "range"), "0-3999");

        // The closing PUT carries the last chunk.
        let resp = h
            .req(Method::PUT, &format!("{}?digest={digest}", header(&resp, "location")))
            .header("content-range", "4000-4009")
            .body(three)
            .send()
            .await
            .expect("put");
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(header(&resp, "location"), format!("/v2/acme/qwen/blobs/{digest}"));
        assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());

        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.bytes().await.expect("body"), whole);
        // The session is gone once closed.
        let resp = h.req(Method::GET, &location).send().await.expect("status");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "BLOB_UPLOAD_UNKNOWN");
        assert_eq!(dir_entries(&h.uploads_dir()), 0);
    })
    .await;
}

#[tokio::test]
async fn out_of_order_chunk_is_refused_with_416_and_the_upload_survives() {
    bounded(async {
        let h = start().await;
        let resp = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        let location = header(&resp, "location");
        let resp =
            h.req(Method::PATCH, &location).header("content-range", "0-4").body("hello").send().await.expect("patch");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);

        // Skips bytes 5..10.
        let resp =
            h.req(Method::PATCH, &location).header("content-range", "10-14").body("world").send().await.expect("patch");
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&resp, "range"), "0-4");
        assert_eq!(error_code(resp).await, "BLOB_UPLOAD_INVALID");
        // Restarts from zero.
        let resp =
            h.req(Method::PATCH, &location).header("content-range", "0-4").body("again").send().await.expect("patch");
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);

        let resp =
            h.req(Method::PATCH, &location).header("content-range", "5-10").body(" world").send().await.expect("patch");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let digest = Digest::of(b"hello world");
        let resp = h.req(Method::PUT, &format!("{location}?digest={digest}")).send().await.expect("put");
        assert_eq!(resp.status(), StatusCode::CREATED);
        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.bytes().await.expect("body").as_ref(), b"hello world");
    })
    .await;
}

#[tokio::test]
async fn a_patch_while_another_is_writing_the_same_upload_gets_416() {
    bounded(async {
        const PIECE: usize = 1 << 20;
        // More than loopback socket buffers hold: once the client has sent this much, the server is
        // reading the body, which it only does while holding the upload.
        const PIECES_BEFORE_PROBE: u64 = 24;
        let h = start().await;
        let resp = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        let location = header(&resp, "location");

        // The first PATCH streams from a channel, so it stays in flight until the test closes it.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let slow = tokio::spawn(h.req(Method::PATCH, &location).body(reqwest::Body::wrap_stream(stream)).send());
        let mut hasher = Hasher::new();
        for i in 0..PIECES_BEFORE_PROBE {
            let piece = chunk(i, PIECE);
            hasher.update(&piece);
            tx.send(Ok(piece)).await.expect("send");
        }

        let resp = h.req(Method::PATCH, &location).body("intruder").send().await.expect("patch");
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(error_code(resp).await, "BLOB_UPLOAD_INVALID");

        let last = chunk(PIECES_BEFORE_PROBE, 10);
        hasher.update(&last);
        tx.send(Ok(last)).await.expect("send");
        drop(tx);
        let resp = slow.await.expect("join").expect("slow patch");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(header(&resp, "range"), format!("0-{}", hasher.len() - 1));
        let digest = hasher.finish();
        let resp = h.req(Method::PUT, &format!("{location}?digest={digest}")).send().await.expect("put");
        assert_eq!(resp.status(), StatusCode::CREATED, "the intruding PATCH changed nothing");
    })
    .await;
}

#[tokio::test]
async fn a_patch_cut_off_midway_ends_the_upload_and_deletes_its_data() {
    bounded(async {
        let h = start().await;
        let resp = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        let location = header(&resp, "location");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let cut = tokio::spawn(
            h.req(Method::PATCH, &location)
                .header("content-length", (64u64 << 20).to_string())
                .body(reqwest::Body::wrap_stream(stream))
                .send(),
        );
        for i in 0..24 {
            tx.send(Ok(chunk(i, 1 << 20))).await.expect("send");
        }
        cut.abort();
        let _ = cut.await;
        until_empty(&h.uploads_dir()).await;
        let resp = h.req(Method::GET, &location).send().await.expect("status");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    })
    .await;
}

#[tokio::test]
async fn open_deletes_upload_files_left_by_a_crash() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        std::fs::create_dir_all(dir.path().join("uploads")).expect("mkdir");
        std::fs::write(dir.path().join("uploads/3f1c-leftover"), b"half a blob").expect("write");
        let _registry = Registry::open(dir.path(), store.database(), RegistryConfig::default()).expect("open");
        assert_eq!(dir_entries(&dir.path().join("uploads")), 0);
    })
    .await;
}

#[tokio::test]
async fn wrong_digest_on_close_is_refused_and_leaves_nothing() {
    bounded(async {
        let h = start().await;
        let claimed = Digest::of(b"what the client meant");
        let actual = Digest::of(b"what the client sent");

        let resp = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        let location = header(&resp, "location");
        let resp = h.req(Method::PATCH, &location).body("what the client sent").send().await.expect("patch");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = h.req(Method::PUT, &format!("{location}?digest={claimed}")).send().await.expect("put");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "DIGEST_INVALID");

        for digest in [&claimed, &actual] {
            let resp = h.req(Method::HEAD, &format!("/v2/acme/qwen/blobs/{digest}")).send().await.expect("head");
            assert_eq!(resp.status(), StatusCode::NOT_FOUND);
            assert!(h.registry.blob_path(digest).is_none());
        }
        assert_eq!(dir_entries(&h.uploads_dir()), 0);
        let resp = h.req(Method::GET, &location).send().await.expect("status");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);

        // The same for a monolithic push.
        let resp = h
            .req(Method::POST, &format!("/v2/acme/qwen/blobs/uploads/?digest={claimed}"))
            .body("what the client sent")
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "DIGEST_INVALID");
        assert_eq!(dir_entries(&h.uploads_dir()), 0);
        assert!(h.registry.blob_path(&actual).is_none());
    })
    .await;
}

#[tokio::test]
async fn range_requests_answer_206_or_416() {
    bounded(async {
        let h = start().await;
        let content = b"0123456789".to_vec();
        let digest = h.push_blob("acme/qwen", &content).await;
        let path = format!("/v2/acme/qwen/blobs/{digest}");
        for (range, expected, content_range) in [
            ("bytes=2-5", &b"2345"[..], "bytes 2-5/10"),
            ("bytes=-3", &b"789"[..], "bytes 7-9/10"),
            ("bytes=7-", &b"789"[..], "bytes 7-9/10"),
            ("bytes=8-100", &b"89"[..], "bytes 8-9/10"),
        ] {
            let resp = h.req(Method::GET, &path).header("range", range).send().await.expect("get");
            assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(header(&resp, "content-range"), content_range, "{range}");
            assert_eq!(header(&resp, "content-length"), expected.len().to_string(), "{range}");
            assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
            assert_eq!(resp.bytes().await.expect("body").as_ref(), expected, "{range}");
        }
        let resp = h.req(Method::GET, &path).header("range", "bytes=10-").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&resp, "content-range"), "bytes */10");
        let resp = h.req(Method::HEAD, &path).header("range", "bytes=4-5").send().await.expect("head");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(header(&resp, "content-length"), "2");
    })
    .await;
}

#[tokio::test]
async fn manifest_referencing_a_missing_blob_is_refused() {
    bounded(async {
        let h = start().await;
        let config = h.push_blob("acme/qwen", b"{}").await;
        let missing = Digest::of(b"never pushed");
        let bytes = image_manifest(&config, &[(missing.clone(), 12)], None, None);
        let resp = h.put_manifest("acme/qwen", "v1", MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
        assert_eq!(body["errors"][0]["detail"]["missing"][0], missing.as_str());
        let resp = h.req(Method::GET, "/v2/acme/qwen/manifests/v1").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
        // A blob pushed to another repository does not count.
        let layer = h.push_blob("acme/other", b"layer").await;
        let bytes = image_manifest(&config, &[(layer, 5)], None, None);
        let resp = h.put_manifest("acme/qwen", "v1", MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(error_code(resp).await, "MANIFEST_BLOB_UNKNOWN");
        assert!(h.registry.resolve("acme/qwen", "v1").expect("resolve").is_none());
    })
    .await;
}

#[tokio::test]
async fn manifests_by_tag_and_by_digest_are_byte_exact() {
    bounded(async {
        let h = start().await;
        let config = h.push_blob("acme/qwen", b"{}").await;
        let layer = h.push_blob("acme/qwen", b"weights").await;
        // Odd formatting on purpose: the registry must not re-serialize.
        let bytes = format!(
            "{{ \"schemaVersion\":2,\n  \"mediaType\": \"{MEDIA_TYPE_IMAGE_MANIFEST}\",\n\"config\":{{\"mediaType\":\"{MEDIA_TYPE_EMPTY}\",\"digest\":\"{config}\",\"size\":2}},\n\"layers\":[{{\"mediaType\":\"application/octet-stream\",\"size\":7,\"digest\":\"{layer}\"}}]   }}\n"
        )
        .into_bytes();
        let digest = Digest::of(&bytes);
        let resp = h.put_manifest("acme/qwen", "v1", MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
        assert_eq!(header(&resp, "location"), format!("/v2/acme/qwen/manifests/{digest}"));
        assert!(resp.headers().get("oci-subject").is_none());

        for reference in ["v1", digest.as_str()] {
            let resp =
                h.req(Method::GET, &format!("/v2/acme/qwen/manifests/{reference}")).send().await.expect("get");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header(&resp, "content-type"), MEDIA_TYPE_IMAGE_MANIFEST);
            assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
            assert_eq!(resp.bytes().await.expect("body"), bytes);
            let resp =
                h.req(Method::HEAD, &format!("/v2/acme/qwen/manifests/{reference}")).send().await.expect("head");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(header(&resp, "content-length"), bytes.len().to_string());
            assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
        }
        // The manifest's bytes are a blob of the repository too.
        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.bytes().await.expect("body"), bytes);

        // Pushing by digest: must match the content.
        let resp = h.put_manifest("acme/mirror", digest.as_str(), MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(error_code(resp).await, "MANIFEST_BLOB_UNKNOWN", "the mirror holds no blobs yet");
        let resp = h.put_manifest("acme/qwen", Digest::of(b"other").as_str(), MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "DIGEST_INVALID");
        let resp = h.put_manifest("acme/qwen", digest.as_str(), MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(resp.status(), StatusCode::CREATED);

        let resp = h.req(Method::GET, "/v2/acme/qwen/manifests/v2").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
        let resp = h.put_manifest("acme/qwen", "v3", MEDIA_TYPE_IMAGE_MANIFEST, b"{not json").await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "MANIFEST_INVALID");
        let resp = h.put_manifest("acme/qwen", "v3", MEDIA_TYPE_IMAGE_INDEX, &bytes).await;
        assert_eq!(error_code(resp).await, "MANIFEST_INVALID", "mediaType disagrees with Content-Type");
    })
    .await;
}

#[tokio::test]
async fn index_referencing_a_missing_manifest_is_refused() {
    bounded(async {
        let h = start().await;
        let config = h.push_blob("acme/qwen", b"{}").await;
        let variant = image_manifest(&config, &[], None, None);
        let variant_digest = Digest::of(&variant);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_IMAGE_INDEX,
            "manifests": [{"mediaType": MEDIA_TYPE_IMAGE_MANIFEST, "digest": variant_digest, "size": variant.len()}],
        }))
        .expect("json");
        let resp = h.put_manifest("acme/qwen", "bundle", MEDIA_TYPE_IMAGE_INDEX, &index).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "MANIFEST_BLOB_UNKNOWN");

        // A blob with the variant's bytes is not a manifest.
        h.push_blob("acme/qwen", &variant).await;
        let resp = h.put_manifest("acme/qwen", "bundle", MEDIA_TYPE_IMAGE_INDEX, &index).await;
        assert_eq!(error_code(resp).await, "MANIFEST_BLOB_UNKNOWN");

        let resp = h.put_manifest("acme/qwen", variant_digest.as_str(), MEDIA_TYPE_IMAGE_MANIFEST, &variant).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let resp = h.put_manifest("acme/qwen", "bundle", MEDIA_TYPE_IMAGE_INDEX, &index).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let resp = h.req(Method::GET, "/v2/acme/qwen/manifests/bundle").send().await.expect("get");
        assert_eq!(header(&resp, "content-type"), MEDIA_TYPE_IMAGE_INDEX);
        assert_eq!(resp.bytes().await.expect("body"), index);
    })
    .await;
}

#[tokio::test]
async fn tags_list_paginates_in_lexical_order_with_link() {
    bounded(async {
        let h = start().await;
        let (_, bytes) = h.push_image("acme/models/qwen", "e", &[b"w"]).await;
        for tag in ["c", "a", "d", "b"] {
            let resp = h.put_manifest("acme/models/qwen", tag, MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
            assert_eq!(resp.status(), StatusCode::CREATED);
        }
        let resp = h.req(Method::GET, "/v2/acme/models/qwen/tags/list").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("link").is_none());
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body, json!({"name": "acme/models/qwen", "tags": ["a", "b", "c", "d", "e"]}));

        let mut pages = Vec::new();
        let mut next = Some("/v2/acme/models/qwen/tags/list?n=2".to_owned());
        while let Some(path) = next.take() {
            let resp = h.req(Method::GET, &path).send().await.expect("get");
            assert_eq!(resp.status(), StatusCode::OK);
            let link = header(&resp, "link");
            if !link.is_empty() {
                assert!(link.ends_with(">; rel=\"next\""), "{link}");
                next = link.strip_prefix('<').and_then(|l| l.split_once('>')).map(|(url, _)| url.to_owned());
            }
            let body: Value = resp.json().await.expect("json");
            pages.push(body["tags"].clone());
        }
        assert_eq!(pages, vec![json!(["a", "b"]), json!(["c", "d"]), json!(["e"])]);

        let resp = h.req(Method::GET, "/v2/acme/models/qwen/tags/list?last=c").send().await.expect("get");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["tags"], json!(["d", "e"]));
        let resp = h.req(Method::GET, "/v2/acme/models/qwen/tags/list?n=0").send().await.expect("get");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["tags"], json!([]));

        let resp = h.req(Method::GET, "/v2/acme/nothing/tags/list").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "NAME_UNKNOWN");
    })
    .await;
}

#[tokio::test]
async fn invalid_names_and_tags_are_refused() {
    bounded(async {
        let h = start().await;
        for path in
            ["/v2/Acme/tags/list", "/v2/acme//qwen/tags/list", "/v2/acme/-qwen/blobs/uploads/", "/v2/a..b/manifests/v1"]
        {
            let resp = h.req(Method::GET, path).send().await.expect("get");
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
            assert_eq!(error_code(resp).await, "NAME_INVALID", "{path}");
        }
        let resp = h.req(Method::POST, "/v2/UPPER/blobs/uploads/").send().await.expect("post");
        assert_eq!(error_code(resp).await, "NAME_INVALID");
        let resp = h.put_manifest("acme/qwen", "-bad-tag", MEDIA_TYPE_IMAGE_MANIFEST, b"{}").await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "TAG_INVALID");
        let resp = h.req(Method::GET, "/v2/acme/qwen/blobs/sha256:nothex").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "DIGEST_INVALID");
    })
    .await;
}

#[tokio::test]
async fn referrers_list_manifests_by_subject_and_filter_by_artifact_type() {
    bounded(async {
        let h = start().await;
        let (subject, subject_bytes) = h.push_image("acme/qwen", "v1", &[b"weights"]).await;
        let config = Digest::of(b"{}");
        let mut pushed = Vec::new();
        for (artifact_type, payload) in
            [("application/vnd.dev.cosign.artifact.sig.v1+json", &b"sig"[..]), ("application/spdx+json", b"sbom")]
        {
            let layer = h.push_blob("acme/qwen", payload).await;
            let bytes = image_manifest(
                &config,
                &[(layer, payload.len() as u64)],
                Some((&subject, subject_bytes.len() as u64)),
                Some(artifact_type),
            );
            let digest = Digest::of(&bytes);
            let resp = h.put_manifest("acme/qwen", digest.as_str(), MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
            assert_eq!(resp.status(), StatusCode::CREATED);
            assert_eq!(header(&resp, "oci-subject"), subject.as_str());
            pushed.push((artifact_type, digest, bytes.len()));
        }

        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/referrers/{subject}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-type"), MEDIA_TYPE_IMAGE_INDEX);
        assert!(resp.headers().get("oci-filters-applied").is_none());
        let index: Value = resp.json().await.expect("json");
        assert_eq!(index["schemaVersion"], 2);
        let mut found: Vec<(String, String, u64)> = index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .map(|d| {
                (
                    d["artifactType"].as_str().unwrap_or_default().to_owned(),
                    d["digest"].as_str().unwrap_or_default().to_owned(),
                    d["size"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        found.sort();
        let mut expected: Vec<(String, String, u64)> =
            pushed.iter().map(|(t, d, s)| ((*t).to_owned(), d.to_string(), *s as u64)).collect();
        expected.sort();
        assert_eq!(found, expected);

        let resp = h
            .req(Method::GET, &format!("/v2/acme/qwen/referrers/{subject}?artifactType=application/spdx%2Bjson"))
            .send()
            .await
            .expect("get");
        assert_eq!(header(&resp, "oci-filters-applied"), "artifactType");
        let index: Value = resp.json().await.expect("json");
        let manifests = index["manifests"].as_array().expect("manifests");
        assert_eq!(manifests.len(), 1);
        assert_eq!(manifests[0]["digest"], pushed[1].1.as_str());

        let unknown = Digest::of(b"nobody refers to me");
        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/referrers/{unknown}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        let index: Value = resp.json().await.expect("json");
        assert_eq!(index["manifests"], json!([]));
    })
    .await;
}

#[tokio::test]
async fn deleting_a_referenced_blob_is_refused_until_its_manifest_is_gone() {
    bounded(async {
        let h = start().await;
        let (manifest, _) = h.push_image("acme/qwen", "v1", &[b"weights"]).await;
        let layer = Digest::of(b"weights");
        let blob_path = format!("/v2/acme/qwen/blobs/{layer}");

        let resp = h.req(Method::DELETE, &blob_path).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(error_code(resp).await, "DENIED");

        // Deleting by tag only untags.
        let resp = h.req(Method::DELETE, "/v2/acme/qwen/manifests/v1").send().await.expect("untag");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = h.req(Method::GET, "/v2/acme/qwen/manifests/v1").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/manifests/{manifest}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = h.req(Method::DELETE, &blob_path).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::CONFLICT);

        let resp = h.req(Method::DELETE, &format!("/v2/acme/qwen/manifests/{manifest}")).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/manifests/{manifest}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(h.registry.blob_path(&manifest).is_none(), "the manifest's file goes with it");

        let resp = h.req(Method::DELETE, &blob_path).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = h.req(Method::GET, &blob_path).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(h.registry.blob_path(&layer).is_none());
        let resp = h.req(Method::DELETE, &blob_path).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
        let resp = h.req(Method::DELETE, "/v2/acme/qwen/manifests/nope").send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    })
    .await;
}

#[tokio::test]
async fn blobs_shared_by_repositories_keep_their_file_until_the_last_goes() {
    bounded(async {
        let h = start().await;
        let digest = h.push_blob("acme/a", b"shared").await;
        let resp = h
            .req(Method::POST, &format!("/v2/acme/b/blobs/uploads/?mount={digest}&from=acme/a"))
            .send()
            .await
            .expect("mount");
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(header(&resp, "location"), format!("/v2/acme/b/blobs/{digest}"));
        let resp = h.req(Method::GET, &format!("/v2/acme/b/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.bytes().await.expect("body").as_ref(), b"shared");

        // Pushing content that is already stored links it without keeping a second copy.
        assert_eq!(h.push_blob("acme/c", b"shared").await, digest);
        assert_eq!(dir_entries(&h.uploads_dir()), 0);
        let resp = h.req(Method::DELETE, &format!("/v2/acme/c/blobs/{digest}")).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);

        // Mounting what the source does not hold starts an ordinary upload.
        let missing = Digest::of(b"absent");
        let resp = h
            .req(Method::POST, &format!("/v2/acme/b/blobs/uploads/?mount={missing}&from=acme/a"))
            .send()
            .await
            .expect("mount");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert!(header(&resp, "location").starts_with("/v2/acme/b/blobs/uploads/"));
        let resp = h.req(Method::DELETE, &header(&resp, "location")).send().await.expect("cancel");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);

        let resp = h.req(Method::DELETE, &format!("/v2/acme/a/blobs/{digest}")).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert!(h.registry.blob_path(&digest).is_some(), "acme/b still links it");
        let resp = h.req(Method::DELETE, &format!("/v2/acme/b/blobs/{digest}")).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert!(h.registry.blob_path(&digest).is_none());
        assert_eq!(dir_entries(&h.uploads_dir()), 0);
    })
    .await;
}

#[tokio::test]
async fn resolve_and_manifests_return_what_was_pushed() {
    bounded(async {
        let h = start().await;
        let (digest, bytes) = h.push_image("acme/models/qwen", "v1", &[b"q4"]).await;
        let resp = h.put_manifest("acme/models/qwen", "latest", MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let (other, _) = h.push_image("acme/llama", "v9", &[b"q8"]).await;
        let sig_layer = h.push_blob("acme/models/qwen", b"sig").await;
        let sig =
            image_manifest(&Digest::of(b"{}"), &[(sig_layer, 3)], Some((&digest, bytes.len() as u64)), Some("x/sig"));
        let sig_digest = Digest::of(&sig);
        let resp = h.put_manifest("acme/models/qwen", &digest.signature_tag(), MEDIA_TYPE_IMAGE_MANIFEST, &sig).await;
        assert_eq!(resp.status(), StatusCode::CREATED);

        for reference in ["v1", "latest", digest.as_str()] {
            let stored = h.registry.resolve("acme/models/qwen", reference).expect("resolve").expect("present");
            assert_eq!(stored.repository, "acme/models/qwen");
            assert_eq!(stored.digest, digest);
            assert_eq!(stored.media_type, MEDIA_TYPE_IMAGE_MANIFEST);
            assert_eq!(stored.bytes, bytes);
        }
        assert!(h.registry.resolve("acme/models/qwen", "v2").expect("resolve").is_none());
        assert!(h.registry.resolve("acme/llama", "v1").expect("resolve").is_none());
        assert!(h.registry.resolve("acme/models/qwen", "not a ref!").expect("resolve").is_none());

        let entries = h.registry.manifests(Some("acme/models/qwen")).expect("manifests");
        assert_eq!(entries.len(), 2);
        let main = entries.iter().find(|e| e.digest == digest).expect("the image");
        assert_eq!(main.tags, vec!["latest".to_owned(), "v1".to_owned()]);
        assert_eq!(main.media_type, MEDIA_TYPE_IMAGE_MANIFEST);
        assert_eq!(main.artifact_type.as_deref(), Some(MEDIA_TYPE_EMPTY));
        assert_eq!(main.size, bytes.len() as u64);
        assert!(main.pushed_unix_ms > 0);
        assert_eq!(main.subject, None);
        let signature = entries.iter().find(|e| e.digest == sig_digest).expect("the signature");
        assert_eq!(signature.subject.as_ref(), Some(&digest));
        assert_eq!(signature.artifact_type.as_deref(), Some("x/sig"));
        assert_eq!(signature.tags, vec![digest.signature_tag()]);

        let all = h.registry.manifests(None).expect("manifests");
        assert_eq!(all.len(), 3);
        assert!(all.iter().any(|e| e.repository == "acme/llama" && e.digest == other && e.tags == ["v9"]));
        assert!(h.registry.manifests(Some("acme/none")).expect("manifests").is_empty());
    })
    .await;
}

#[tokio::test]
async fn upload_limits_are_enforced() {
    bounded(async {
        let config = RegistryConfig { max_blob_bytes: 1000, max_open_uploads: 2, ..RegistryConfig::default() };
        let h = start_with(config).await;

        let big = vec![7u8; 2000];
        let digest = Digest::of(&big);
        let resp = h
            .req(Method::POST, &format!("/v2/acme/qwen/blobs/uploads/?digest={digest}"))
            .body(big.clone())
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error_code(resp).await, "SIZE_INVALID");

        // Without a Content-Length the limit is found while streaming.
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..4).map(|_| Ok(Bytes::from(vec![7u8; 500]))).collect();
        let resp = h
            .req(Method::POST, &format!("/v2/acme/qwen/blobs/uploads/?digest={digest}"))
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        until_empty(&h.uploads_dir()).await;
        assert!(h.registry.blob_path(&digest).is_none());

        let first = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        assert_eq!(first.status(), StatusCode::ACCEPTED);
        let second = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        assert_eq!(second.status(), StatusCode::ACCEPTED);
        let third = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error_code(third).await, "TOOMANYREQUESTS");
        let resp = h.req(Method::DELETE, &header(&first, "location")).send().await.expect("cancel");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let fourth = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        assert_eq!(fourth.status(), StatusCode::ACCEPTED);
    })
    .await;
}

#[tokio::test]
async fn abandoned_uploads_expire_and_their_files_are_deleted() {
    bounded(async {
        let config = RegistryConfig { upload_ttl: Duration::from_millis(200), ..RegistryConfig::default() };
        let h = start_with(config).await;
        let resp = h.req(Method::POST, "/v2/acme/qwen/blobs/uploads/").send().await.expect("post");
        let location = header(&resp, "location");
        let resp = h.req(Method::PATCH, &location).body("partial data").send().await.expect("patch");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(dir_entries(&h.uploads_dir()), 1);
        until_empty(&h.uploads_dir()).await;
        let resp = h.req(Method::GET, &location).send().await.expect("status");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "BLOB_UPLOAD_UNKNOWN");
    })
    .await;
}

/// Deterministic pseudo-random content, generated chunk by chunk so the test never holds the whole blob.
fn chunk(index: u64, len: usize) -> Bytes {
    let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

#[tokio::test]
async fn a_blob_of_tens_of_mib_streams_through_in_chunks() {
    bounded(async {
        const CHUNK: usize = 1 << 20;
        const CHUNKS_PER_PATCH: u64 = 24;
        let h = start().await;
        let mut hasher = Hasher::new();
        for i in 0..2 * CHUNKS_PER_PATCH {
            hasher.update(&chunk(i, CHUNK));
        }
        let total = hasher.len();
        let digest = hasher.finish();

        let resp = h.req(Method::POST, "/v2/acme/big/blobs/uploads/").send().await.expect("post");
        let mut location = header(&resp, "location");
        for patch in 0..2u64 {
            let first = patch * CHUNKS_PER_PATCH;
            let stream = futures::stream::iter(
                (first..first + CHUNKS_PER_PATCH).map(|i| Ok::<_, std::io::Error>(chunk(i, CHUNK))),
            );
            let start = first * CHUNK as u64;
            let end = start + CHUNKS_PER_PATCH * CHUNK as u64 - 1;
            let resp = h
                .req(Method::PATCH, &location)
                .header("content-range", format!("{start}-{end}"))
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .expect("patch");
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
            assert_eq!(header(&resp, "range"), format!("0-{end}"));
            location = header(&resp, "location");
        }
        let resp = h.req(Method::PUT, &format!("{location}?digest={digest}")).send().await.expect("put");
        assert_eq!(resp.status(), StatusCode::CREATED);

        let resp = h.req(Method::GET, &format!("/v2/acme/big/blobs/{digest}")).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-length"), total.to_string());
        let mut body = resp.bytes_stream();
        let mut read = Hasher::new();
        while let Some(piece) = body.next().await {
            read.update(&piece.expect("body chunk"));
        }
        assert_eq!(read.len(), total);
        assert_eq!(read.finish(), digest);

        // A resumed download: the last chunk and a half.
        let from = total - (CHUNK as u64 * 3 / 2);
        let resp = h
            .req(Method::GET, &format!("/v2/acme/big/blobs/{digest}"))
            .header("range", format!("bytes={from}-"))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        let tail = resp.bytes().await.expect("body");
        let last = 2 * CHUNKS_PER_PATCH - 1;
        let expected: Vec<u8> = [&chunk(last - 1, CHUNK)[CHUNK / 2..], &chunk(last, CHUNK)[..]].concat();
        assert_eq!(tail.len(), expected.len());
        assert!(tail == expected, "the tail read by range matches what was pushed");
    })
    .await;
}

fn index_of(children: &[(&Digest, usize)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_IMAGE_INDEX,
        "manifests": children.iter().map(|(digest, size)| json!({
            "mediaType": MEDIA_TYPE_IMAGE_MANIFEST, "digest": digest, "size": size
        })).collect::<Vec<_>>(),
    }))
    .expect("json")
}

#[tokio::test]
async fn deleting_a_manifest_an_index_lists_is_refused_until_the_index_is_gone() {
    bounded(async {
        let h = start().await;
        let (variant, variant_bytes) = h.push_image("acme/qwen", "q4", &[b"q4 weights"]).await;
        let index = index_of(&[(&variant, variant_bytes.len())]);
        let index_digest = Digest::of(&index);
        let resp = h.put_manifest("acme/qwen", "bundle", MEDIA_TYPE_IMAGE_INDEX, &index).await;
        assert_eq!(resp.status(), StatusCode::CREATED);

        let variant_path = format!("/v2/acme/qwen/manifests/{variant}");
        let resp = h.req(Method::DELETE, &variant_path).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        let body: Value = resp.json().await.expect("error body");
        assert_eq!(body["errors"][0]["code"], "DENIED");
        let message = body["errors"][0]["message"].as_str().expect("message");
        assert!(message.contains(index_digest.as_str()), "the message names the index: {message}");
        assert_eq!(body["errors"][0]["detail"]["indexes"], json!([index_digest]));
        let resp = h.req(Method::GET, &variant_path).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK, "the refused delete left the manifest alone");
        assert_eq!(resp.bytes().await.expect("body"), variant_bytes);
        let resp = h.req(Method::GET, "/v2/acme/qwen/manifests/q4").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK, "and its tag");

        // The same manifest in another repository is not listed by this index.
        let (other, _) = h.push_image("acme/other", "q4", &[b"q4 weights"]).await;
        assert_eq!(other, variant);
        let resp = h.req(Method::DELETE, &format!("/v2/acme/other/manifests/{other}")).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);

        // Untagging is always allowed; deleting the index first frees the variant.
        let resp = h.req(Method::DELETE, "/v2/acme/qwen/manifests/q4").send().await.expect("untag");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = h.req(Method::DELETE, &format!("/v2/acme/qwen/manifests/{index_digest}")).send().await.expect("del");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = h.req(Method::DELETE, &variant_path).send().await.expect("delete");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = h.req(Method::GET, &variant_path).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    })
    .await;
}

#[tokio::test]
async fn percent_encoded_path_segments_are_decoded() {
    bounded(async {
        let h = start().await;
        let (manifest, bytes) = h.push_image("acme/qwen", "v1", &[b"weights"]).await;
        let layer = Digest::of(b"weights");
        let encoded = |d: &Digest| d.as_str().replace(':', "%3A");

        let resp = h.req(Method::GET, &format!("/v2/acme/qwen/blobs/{}", encoded(&layer))).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "docker-content-digest"), layer.as_str());
        assert_eq!(resp.bytes().await.expect("body").as_ref(), b"weights");

        let path = format!("/v2/acme/q%77en/manifests/{}", encoded(&manifest).replace("%3A", "%3a"));
        let resp = h.req(Method::GET, &path).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.bytes().await.expect("body"), bytes);

        // Pushing by an encoded digest reference, and starting an upload under an encoded name.
        let resp = h.put_manifest("acme/qwen", &encoded(&manifest), MEDIA_TYPE_IMAGE_MANIFEST, &bytes).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(header(&resp, "location"), format!("/v2/acme/qwen/manifests/{manifest}"));
        let resp = h.req(Method::POST, "/v2/acme/q%77en/blobs/uploads/").send().await.expect("post");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert!(header(&resp, "location").starts_with("/v2/acme/qwen/blobs/uploads/"));

        // An encoded slash is data, not a separator; a broken escape is refused.
        let resp = h.req(Method::GET, "/v2/acme%2Fqwen/tags/list").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "NAME_INVALID");
        let resp = h.req(Method::GET, "/v2/acme/q%7/tags/list").send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(resp).await, "NAME_INVALID");
    })
    .await;
}
