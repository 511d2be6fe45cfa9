//! Blue/green swaps through the real front proxy with the fake llama-server: no request lost, the candidate
//! serves after the flip, a candidate that cannot load changes nothing, and stopping escalates to SIGKILL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use alki_agent::runtime::{StartError, StopPolicy};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swap_under_load_loses_no_request_and_serves_b_after_the_flip() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_a = fake_model(dir.path(), "model-a.gguf", &["FAKE_LLAMA_TOKEN_MS=3"]);
        let model_b = fake_model(dir.path(), "model-b.gguf", &["FAKE_LLAMA_TOKEN_MS=3", "FAKE_LLAMA_LOAD_MS=500"]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(10)).await;
        front.supervisor.swap(spec(&model_a, "sha256:a")).await.expect("A starts");
        let pid_a = front.supervisor.active_pid().expect("A has a pid");

        let flipped = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (from_a, after_flip) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (flipped, stop, from_a, after_flip) =
                (flipped.clone(), stop.clone(), from_a.clone(), after_flip.clone());
            let (addr, a, b) = (front.addr, model_a.display().to_string(), model_b.display().to_string());
            clients.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let started_after_flip = flipped.load(Ordering::SeqCst);
                    match complete(&client, addr, 4).await {
                        Ok((200, content)) if content.contains(&b) => {
                            if started_after_flip {
                                after_flip.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Ok((200, content)) if content.contains(&a) => {
                            from_a.fetch_add(1, Ordering::SeqCst);
                            if started_after_flip {
                                failures.push(format!("a request started after the flip was served by A: {content}"));
                            }
                        }
                        other => failures.push(format!("{other:?}")),
                    }
                }
                failures
            }));
        }
        until(|| from_a.load(Ordering::SeqCst) >= 10).await;
        front.supervisor.swap(spec(&model_b, "sha256:b")).await.expect("B starts");
        flipped.store(true, Ordering::SeqCst);
        until(|| after_flip.load(Ordering::SeqCst) >= 20).await;
        stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for client in clients {
            failures.extend(client.await.expect("client task"));
        }
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        assert_eq!(front.proxy.stats().expect("stats").bundle_digest, "sha256:b");

        front.supervisor.wait_retired().await;
        assert!(!process_exists(pid_a), "A was stopped after draining");
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_cannot_load_leaves_a_serving() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_a = fake_model(dir.path(), "model-a.gguf", &[]);
        let broken = fake_model(dir.path(), "broken.gguf", &["FAKE_LLAMA_EXIT_AT_LOAD=1", "FAKE_LLAMA_LOAD_MS=200"]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(5)).await;
        front.supervisor.swap(spec(&model_a, "sha256:a")).await.expect("A starts");
        let pid_a = front.supervisor.active_pid();

        let err = front.supervisor.swap(spec(&broken, "sha256:broken")).await.expect_err("broken model fails");
        match &err {
            StartError::Exited { status, log_tail, .. } => {
                assert!(status.contains('1'), "exit code 1: {status}");
                assert!(log_tail.contains("error loading model"), "log tail quoted: {log_tail}");
            }
            other => panic!("expected Exited, got {other}"),
        }
        assert!(err.to_string().contains("cannot be loaded"), "{err}");
        assert_eq!(front.supervisor.active_pid(), pid_a, "A is untouched");
        let client = reqwest::Client::new();
        let (status, content) = complete(&client, front.addr, 2).await.expect("A answers");
        assert_eq!(status, 200);
        assert!(content.contains("model-a.gguf"), "{content}");

        // A missing model file fails the same way.
        let missing = dir.path().join("missing.gguf");
        let err = front.supervisor.swap(spec(&missing, "sha256:missing")).await.expect_err("missing model fails");
        assert!(matches!(err, StartError::Exited { .. }), "{err}");
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_a_long_request_on_the_old_instance() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let slow_a = fake_model(dir.path(), "slow-a.gguf", &["FAKE_LLAMA_TOKEN_MS=150"]);
        let model_b = fake_model(dir.path(), "model-b.gguf", &[]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(20)).await;
        front.supervisor.swap(spec(&slow_a, "sha256:a")).await.expect("A starts");
        let upstream_a = front.proxy.current().expect("A is current");

        let addr = front.addr;
        let long = tokio::spawn(async move { complete(&reqwest::Client::new(), addr, 16).await });
        until(|| upstream_a.in_flight() == 1).await;
        front.supervisor.swap(spec(&model_b, "sha256:b")).await.expect("B starts");
        assert_eq!(upstream_a.in_flight(), 1, "the long request is still on A after the flip");

        let (status, content) = long.await.expect("task").expect("long request completes");
        assert_eq!(status, 200);
        assert!(content.contains("slow-a.gguf"), "served by A to the end: {content}");
        front.supervisor.wait_retired().await;
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_ignores_sigterm_is_killed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let stubborn = fake_model(dir.path(), "stubborn.gguf", &["FAKE_LLAMA_IGNORE_SIGTERM=1"]);
        let model_b = fake_model(dir.path(), "model-b.gguf", &[]);
        let stop = StopPolicy { term_grace: Duration::from_millis(300), kill_grace: Duration::from_secs(3) };
        let mut front = front(&dir.path().join("logs"), stop, Duration::from_secs(2)).await;
        front.supervisor.swap(spec(&stubborn, "sha256:a")).await.expect("A starts");
        let pid_a = front.supervisor.active_pid().expect("pid");
        front.supervisor.swap(spec(&model_b, "sha256:b")).await.expect("B starts");
        front.supervisor.wait_retired().await;
        assert!(!process_exists(pid_a), "SIGKILL ended the instance that ignored SIGTERM");

        let logs: String = std::fs::read_dir(dir.path().join("logs"))
            .expect("logs")
            .map(|e| std::fs::read_to_string(e.expect("entry").path()).unwrap_or_default())
            .collect();
        assert_eq!(logs.matches("SIGTERM ignored").count(), 2, "two SIGTERMs before SIGKILL: {logs}");
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn without_a_model_the_front_answers_503_with_retry_after() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let front = front(dir.path(), StopPolicy::default(), Duration::from_secs(1)).await;
        let response = reqwest::get(format!("http://{}/v1/models", front.addr)).await.expect("request");
        assert_eq!(response.status().as_u16(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], 503);
        assert_eq!(body["error"]["message"], "no model is active on this device yet");
        assert_eq!(body["error"]["type"], "unavailable");
        assert_eq!(front.proxy.unserved_total(), 1);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_in_flight_finishes_on_the_old_instance_after_the_flip() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        // 20 tokens at 100 ms: the SSE events of A's answer arrive over two seconds.
        let slow_a = fake_model(dir.path(), "slow-a.gguf", &["FAKE_LLAMA_TOKEN_MS=100"]);
        let model_b = fake_model(dir.path(), "model-b.gguf", &[]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(20)).await;
        front.supervisor.swap(spec(&slow_a, "sha256:a")).await.expect("A starts");
        let upstream_a = front.proxy.current().expect("A is current");

        let mut response = reqwest::Client::new()
            .post(format!("http://{}/completion", front.addr))
            .json(&serde_json::json!({"prompt": "Hi", "n_predict": 20, "stream": true}))
            .send()
            .await
            .expect("stream starts");
        assert_eq!(response.status().as_u16(), 200);
        let first = response.chunk().await.expect("read").expect("a first event");
        assert!(String::from_utf8_lossy(&first).starts_with("data: "), "SSE");

        front.supervisor.swap(spec(&model_b, "sha256:b")).await.expect("B starts");
        assert_eq!(upstream_a.in_flight(), 1, "the stream is still on A after the flip");
        let (_, content) = complete(&reqwest::Client::new(), front.addr, 2).await.expect("B answers");
        assert!(content.contains("model-b.gguf"), "new requests go to B: {content}");

        let mut rest = Vec::new();
        while let Some(chunk) = response.chunk().await.expect("the stream is not cut") {
            rest.extend_from_slice(&chunk);
        }
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.contains("\"stop\":true") && rest.contains("slow-a.gguf"), "A finished the stream: {rest}");
        front.supervisor.wait_retired().await;
        assert_eq!(upstream_a.in_flight(), 0);
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}
