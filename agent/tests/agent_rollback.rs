//! The whole agent swapping back by itself: a new model that crashes or wedges within its watch window, a
//! crash loop outside a swap, and a bundle that no longer loads at boot; each is reported with its cause
//! while the previous bundle serves again.

mod common;

use std::path::Path;

use alki_agent::state::StateFile;
use alki_shared::ids::Generation;
use alki_shared::proto::{ErrorCode, Phase};
use common::TEST_TIMEOUT;
use common::controller::{next_where, status_with};
use common::running::{Running, completion, until_served_by};
use common::staged::{deployment, save_state, stage_bundle};

const TOKEN: &str = "agent-secret";

async fn start_agent(dir: &Path, data_dir: &Path, runtime_extra: &str) -> Running {
    common::running::start_configured(dir, data_dir, TOKEN, runtime_extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_that_crashes_within_the_watch_window_is_rolled_back_and_reported() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let a = deployment(&data_dir, "model-a", &[], 3);
        save_state(&data_dir, a.clone(), None);
        // The smoke completion passes, one client request passes, the next crashes B.
        let b = stage_bundle(&data_dir, "crashy-b", &["FAKE_LLAMA_CRASH_AFTER=2"]).await;
        let mut agent =
            start_agent(dir.path(), &data_dir, "watch_window_secs = 30\nswap_strategy = \"blue_green\"").await;
        until_served_by(agent.front, "model-a.gguf").await;

        agent.desire(4, &b).await;
        next_where(&mut agent.up, status_with(Phase::Active, 4)).await;
        until_served_by(agent.front, "crashy-b.gguf").await;
        let _ = completion(agent.front).await; // B crashes on this one.
        let failed = agent.failed(4).await;
        let error = failed.error.expect("error set");
        assert_eq!(error.code, ErrorCode::StartFailed as i32);
        assert!(error.message.contains("rolled back to"), "{}", error.message);
        assert!(error.message.contains("exited") && error.message.contains("watch window"), "{}", error.message);
        assert_eq!(failed.serving, Some(a.bundle.to_proto()), "A serves again");
        until_served_by(agent.front, "model-a.gguf").await;

        agent.stop().await;
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        assert_eq!(state.active.map(|d| d.bundle), Some(a.bundle), "A is active after a restart too");
        assert_eq!(state.last_applied_generation, Generation(4), "the failed generation is not retried");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_that_wedges_is_rolled_back_after_a_stop_then_start_swap() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let a = deployment(&data_dir, "model-a", &[], 3);
        save_state(&data_dir, a.clone(), None);
        // After the smoke completion, the first client request wedges B: /health answers, /slots hangs.
        let b = stage_bundle(&data_dir, "wedging-b", &["FAKE_LLAMA_WEDGE_AFTER=1"]).await;
        let mut agent =
            start_agent(dir.path(), &data_dir, "watch_window_secs = 30\nswap_strategy = \"stop_then_start\"").await;
        until_served_by(agent.front, "model-a.gguf").await;

        agent.desire(4, &b).await;
        next_where(&mut agent.up, status_with(Phase::Active, 4)).await;
        let front = agent.front;
        let stuck = tokio::spawn(async move { completion(front).await });
        let failed = agent.failed(4).await;
        let message = failed.error.map(|e| e.message).unwrap_or_default();
        assert!(message.contains("liveness checks") && message.contains("/slots"), "{message}");
        assert!(message.contains("rolled back to"), "{message}");
        assert_eq!(failed.serving, Some(a.bundle.to_proto()));
        until_served_by(agent.front, "model-a.gguf").await;
        assert_eq!(stuck.await.expect("task"), None, "the wedged request failed rather than hanging forever");
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_outside_a_swap_falls_back_to_the_previous_bundle_and_is_reported() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let a = deployment(&data_dir, "model-a", &[], 3);
        // B crashes on every first client request after each (re)start.
        let b = deployment(&data_dir, "crashy-b", &["FAKE_LLAMA_CRASH_AFTER=1"], 4);
        save_state(&data_dir, b.clone(), Some(a.clone()));
        let mut agent = start_agent(dir.path(), &data_dir, "").await;

        let front = agent.front;
        let load = tokio::spawn(async move { until_served_by(front, "model-a.gguf").await });
        let failed = agent.failed(4).await;
        let message = failed.error.map(|e| e.message).unwrap_or_default();
        assert!(message.contains("crash loop") && message.contains("rolled back to"), "{message}");
        assert_eq!(failed.bundle, Some(b.bundle.to_proto()));
        assert_eq!(failed.serving, Some(a.bundle.to_proto()));
        load.await.expect("A serves after the crash loop");

        agent.stop().await;
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        assert_eq!(state.active.map(|d| d.bundle), Some(a.bundle));
        assert_eq!(state.previous, None, "the crash-looping bundle is not kept as a rollback target");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_no_longer_loads_at_boot_falls_back_to_the_previous_one() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let a = deployment(&data_dir, "model-a", &[], 3);
        let b = deployment(&data_dir, "broken-b", &["FAKE_LLAMA_EXIT_AT_LOAD=1"], 4);
        save_state(&data_dir, b.clone(), Some(a.clone()));
        let mut agent = start_agent(dir.path(), &data_dir, "").await;

        let failed = agent.failed(4).await;
        let message = failed.error.map(|e| e.message).unwrap_or_default();
        assert!(message.contains("cannot be loaded") && message.contains("rolled back to"), "{message}");
        assert_eq!(failed.serving, Some(a.bundle.to_proto()));
        until_served_by(agent.front, "model-a.gguf").await;
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}
