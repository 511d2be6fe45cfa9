//! Swaps that cannot keep both models loaded, and swapping back: stop-then-start holds requests through the
//! gap (or answers 503 with Retry-After, never a reset), a failed candidate puts the old model back, and a
//! watched swap rolls back to the previous model after a crash or a wedged engine.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use alki_agent::runtime::{StartError, StopPolicy, SwapStrategy};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_then_start_under_load_holds_requests_through_the_gap_and_fails_none() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_a = fake_model(dir.path(), "model-a.gguf", &["FAKE_LLAMA_TOKEN_MS=3"]);
        let model_b = fake_model(dir.path(), "model-b.gguf", &["FAKE_LLAMA_TOKEN_MS=3", "FAKE_LLAMA_LOAD_MS=700"]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(10)).await;
        front.supervisor.swap(spec(&model_a, "sha256:a")).await.expect("A starts");
        let pid_a = front.supervisor.active_pid().expect("A has a pid");

        let stop = Arc::new(AtomicBool::new(false));
        let (from_a, from_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (stop, from_a, from_b) = (stop.clone(), from_a.clone(), from_b.clone());
            let addr = front.addr;
            clients.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match complete(&client, addr, 4).await {
                        Ok((200, c)) if c.contains("model-a.gguf") => _ = from_a.fetch_add(1, Ordering::SeqCst),
                        Ok((200, c)) if c.contains("model-b.gguf") => _ = from_b.fetch_add(1, Ordering::SeqCst),
                        other => failures.push(format!("{other:?}")),
                    }
                }
                failures
            }));
        }
        until(|| from_a.load(Ordering::SeqCst) >= 10).await;
        front.supervisor.swap_watched(spec(&model_b, "sha256:b"), SwapStrategy::StopThenStart).await.expect("B starts");
        assert!(!process_exists(pid_a), "A was stopped before B started (stop-then-start)");
        assert!(front.supervisor.can_roll_back(), "A's spec is kept for a rollback");
        until(|| from_b.load(Ordering::SeqCst) >= 20).await;
        stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for client in clients {
            failures.extend(client.await.expect("client task"));
        }
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        assert!(front.proxy.waited_total() > 0, "requests arrived in the gap and waited for B");
        assert_eq!(front.proxy.unserved_total(), 0);
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_longer_than_the_wait_answers_503_with_retry_after() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_a = fake_model(dir.path(), "model-a.gguf", &[]);
        let slow_b = fake_model(dir.path(), "slow-b.gguf", &["FAKE_LLAMA_LOAD_MS=3000"]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(5)).await;
        front.supervisor.set_gap_wait(Duration::from_millis(200));
        front.supervisor.swap(spec(&model_a, "sha256:a")).await.expect("A starts");

        let proxy = front.proxy.clone();
        let mut supervisor = front.supervisor;
        let swapping = tokio::spawn(async move {
            let result = supervisor.swap_watched(spec(&slow_b, "sha256:b"), SwapStrategy::StopThenStart).await;
            (supervisor, result)
        });
        until(|| proxy.current().is_none()).await;
        let response = reqwest::get(format!("http://{}/v1/models", front.addr)).await.expect("an answer, not a reset");
        assert_eq!(response.status().as_u16(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let body: serde_json::Value = response.json().await.expect("json");
        assert!(body["error"]["message"].as_str().unwrap_or_default().contains("being swapped"), "{body}");

        let (mut supervisor, result) = swapping.await.expect("swap task");
        result.expect("B starts");
        let (status, content) = complete(&reqwest::Client::new(), front.addr, 2).await.expect("B answers");
        assert_eq!((status, content.contains("slow-b.gguf")), (200, true), "{content}");
        supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_cannot_load_after_stop_then_start_puts_the_old_model_back() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_a = fake_model(dir.path(), "model-a.gguf", &[]);
        let broken = fake_model(dir.path(), "broken.gguf", &["FAKE_LLAMA_EXIT_AT_LOAD=1"]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(5)).await;
        front.supervisor.swap(spec(&model_a, "sha256:a")).await.expect("A starts");
        let pid_a = front.supervisor.active_pid();

        let err = front
            .supervisor
            .swap_watched(spec(&broken, "sha256:broken"), SwapStrategy::StopThenStart)
            .await
            .expect_err("the broken model fails");
        assert!(matches!(err, StartError::Exited { .. }), "{err}");
        assert_ne!(front.supervisor.active_pid(), pid_a, "A was stopped, then started again");
        assert_eq!(front.supervisor.serving().map(|s| s.bundle_digest.as_str()), Some("sha256:a"));
        assert!(!front.supervisor.can_roll_back(), "nothing was swapped, nothing to roll back");
        let (status, content) = complete(&reqwest::Client::new(), front.addr, 2).await.expect("A answers");
        assert_eq!((status, content.contains("model-a.gguf")), (200, true), "{content}");
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_blue_green_swap_rolls_back_to_the_still_loaded_previous_instance() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_a = fake_model(dir.path(), "model-a.gguf", &[]);
        // The smoke completion is the first; the second client request crashes B.
        let crashy = fake_model(dir.path(), "crashy-b.gguf", &["FAKE_LLAMA_CRASH_AFTER=2"]);
        let mut front = front(&dir.path().join("logs"), StopPolicy::default(), Duration::from_secs(5)).await;
        front.supervisor.swap(spec(&model_a, "sha256:a")).await.expect("A starts");
        let pid_a = front.supervisor.active_pid().expect("pid");

        front.supervisor.swap_watched(spec(&crashy, "sha256:b"), SwapStrategy::BlueGreen).await.expect("B starts");
        assert_eq!(front.supervisor.standby_pid(), Some(pid_a), "A stays loaded during the watch window");
        let client = reqwest::Client::new();
        let (status, content) = complete(&client, front.addr, 2).await.expect("B answers once");
        assert_eq!((status, content.contains("crashy-b.gguf")), (200, true), "{content}");
        let _ = complete(&client, front.addr, 2).await; // B crashes on this one.
        let status = front.supervisor.active_exited().await;
        assert!(status.contains("139"), "{status}");

        front.supervisor.roll_back().await.expect("rollback");
        assert_eq!(front.supervisor.active_pid(), Some(pid_a), "the same A process serves again, no reload");
        assert!(!front.supervisor.can_roll_back());
        let (status, content) = complete(&client, front.addr, 2).await.expect("A answers");
        assert_eq!((status, content.contains("model-a.gguf")), (200, true), "{content}");
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_candidate_fails_the_liveness_check_and_a_cold_rollback_restarts_the_previous_model() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model_a = fake_model(dir.path(), "model-a.gguf", &[]);
        let wedging = fake_model(dir.path(), "wedging-b.gguf", &["FAKE_LLAMA_WEDGE_AFTER=1"]);
        let stop = StopPolicy { term_grace: Duration::from_millis(500), kill_grace: Duration::from_secs(3) };
        let mut front = front(&dir.path().join("logs"), stop, Duration::from_secs(1)).await;
        front.supervisor.swap(spec(&model_a, "sha256:a")).await.expect("A starts");
        let pid_a = front.supervisor.active_pid().expect("pid");

        front.supervisor.swap_watched(spec(&wedging, "sha256:b"), SwapStrategy::StopThenStart).await.expect("B starts");
        assert!(!process_exists(pid_a));
        front.supervisor.check_active().await.expect("B is live before any client request");
        let addr = front.addr;
        let stuck = tokio::spawn(async move { complete(&reqwest::Client::new(), addr, 2).await });
        let error = loop {
            match front.supervisor.check_active().await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => break e,
            }
        };
        assert!(error.contains("/slots"), "/health still answers; /slots does not: {error}");

        front.supervisor.roll_back().await.expect("rollback");
        assert_eq!(front.supervisor.serving().map(|s| s.bundle_digest.as_str()), Some("sha256:a"));
        let (status, content) = complete(&reqwest::Client::new(), front.addr, 2).await.expect("A answers");
        assert_eq!((status, content.contains("model-a.gguf")), (200, true), "{content}");
        stuck.abort();
        front.supervisor.shutdown().await;
    })
    .await
    .expect("test timed out");
}
