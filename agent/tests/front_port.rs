//! The front port as a hostile client meets it: llama-server's admin paths refused, oversize bodies refused
//! with 413, API keys required when configured (and read again when their file changes), and a flood of
//! idle sockets that leaves completions and the controller session working. Refusals never count in the
//! serving counters the rollout gates read.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use alki_shared::proto::Phase;
use common::TEST_TIMEOUT;
use common::controller::{next_where, status_with};
use common::running::{Running, completion, config, start_agent, until_served_by};
use common::staged::{deployment, save_state, stage_bundle};
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "agent-secret";
const KEY: &str = "sk-front-0123456789abcdef";

/// An agent serving model A from its data dir, with its metrics port and `runtime_extra` in `[runtime]`.
async fn serving(dir: &std::path::Path, runtime_extra: &str) -> Running {
    let data_dir = dir.join("data");
    save_state(&data_dir, deployment(&data_dir, "model-a", &[], 3), None);
    start_agent(TOKEN, |controller| {
        let mut config = config(dir, &data_dir, controller, TOKEN, runtime_extra);
        config.metrics_addr = Some("127.0.0.1:0".to_owned());
        config
    })
    .await
}

async fn metrics(agent: &Running) -> String {
    let addr = agent.metrics.expect("metrics port configured");
    reqwest::get(format!("http://{addr}/metrics")).await.expect("metrics").text().await.expect("text")
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The requests the serving counters saw, summed over bundles.
fn served_requests(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("alki_agent_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get(front: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{front}{path}")).await.expect("answer");
    (response.status().as_u16(), response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_servers_admin_paths_are_refused_and_do_not_count_as_served_requests() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = serving(dir.path(), "").await;
        until_served_by(agent.front, "model-a.gguf").await;
        let served = served_requests(&metrics(&agent).await);
        for path in ["/slots", "/props", "/metrics", "/slots/0?action=save", "/lora-adapters", "/"] {
            let (status, body) = get(agent.front, path).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert!(body.contains("not served on this port"), "{path}: {body}");
        }
        let (status, _) = get(agent.front, "/health").await;
        assert_eq!(status, 200);
        let text = metrics(&agent).await;
        assert_eq!(metric(&text, "alki_agent_front_refused_total{reason=\"path\"}"), Some(6.0), "{text}");
        assert_eq!(served_requests(&text), served + 1.0, "only /health was forwarded: {text}");
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_body_is_refused_with_413_whether_it_declares_its_length_or_not() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = serving(dir.path(), "max_body_mib = 1").await;
        until_served_by(agent.front, "model-a.gguf").await;
        let client = reqwest::Client::new();
        let url = format!("http://{}/v1/completions", agent.front);
        let big = vec![b'x'; 2 << 20];
        let declared = client.post(&url).body(big.clone()).send().await.expect("answer");
        assert_eq!(declared.status(), 413);
        assert!(declared.text().await.unwrap_or_default().contains("runtime.max_body_mib"));
        // Chunked: no length up front, cut when it passes the cap.
        let chunks = futures::stream::iter(
            big.chunks(64 << 10).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
        );
        let streamed = client.post(&url).body(reqwest::Body::wrap_stream(chunks)).send().await;
        // The proxy may answer before the client finished sending; either way it is refused, not forwarded.
        if let Ok(response) = streamed {
            assert_eq!(response.status(), 413);
        }
        let text = metrics(&agent).await;
        assert!(
            metric(&text, "alki_agent_front_refused_total{reason=\"body_too_large\"}").is_some_and(|n| n >= 1.0),
            "{text}"
        );
        let errors: f64 = text
            .lines()
            .filter(|l| l.starts_with("alki_agent_request_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(errors, 0.0, "a client's oversize body is not a model error: {text}");
        assert!(completion(agent.front).await.is_some(), "a normal request still passes");
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_when_configured_and_read_again_when_their_file_changes() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("api-keys");
        std::fs::write(&keys, format!("# the chat app\n{KEY}\n")).expect("keys");
        let agent = serving(dir.path(), &format!("api_keys_file = {keys:?}")).await;
        let client = reqwest::Client::new();
        let ask = |key: Option<&str>| {
            let mut request = client
                .post(format!("http://{}/completion", agent.front))
                .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            async move { request.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        };
        while ask(Some(KEY)).await != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await; // until model A answers
        }
        assert_eq!(ask(None).await, 401, "no key");
        assert_eq!(ask(Some("sk-front-0123456789abcdeX")).await, 401, "a wrong key");
        assert_eq!(get(agent.front, "/health").await.0, 200, "health probes need no key");
        let served = served_requests(&metrics(&agent).await);

        let rotated = "sk-front-rotated-987654321";
        std::fs::write(&keys, format!("{rotated}\n")).expect("rotate keys");
        while ask(Some(rotated)).await != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await; // the file is looked at every 2 s
        }
        assert_eq!(ask(Some(KEY)).await, 401, "the old key is gone");
        let text = metrics(&agent).await;
        assert!(metric(&text, "alki_agent_front_refused_total{reason=\"auth\"}").is_some_and(|n| n >= 3.0), "{text}");
        assert!(served_requests(&text) >= served + 1.0);
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_and_is_not_counted_as_served() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = serving(dir.path(), "requests_per_minute_per_client = 3").await;
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let response = client.get(format!("http://{}/v1/models", agent.front)).send().await.expect("answer");
            statuses.push(response.status().as_u16());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 3, "{statuses:?}");
        let text = metrics(&agent).await;
        assert_eq!(metric(&text, "alki_agent_front_refused_total{reason=\"rate\"}"), Some(3.0), "{text}");
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_sockets_leave_completions_and_the_controller_session_working() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let mut agent = serving(dir.path(), "max_connections = 64\nheader_read_timeout_secs = 600").await;
        until_served_by(agent.front, "model-a.gguf").await;

        // Slowloris: 2,000 connections that send half a request line and then nothing.
        let mut idle = Vec::with_capacity(2000);
        for _ in 0..2000 {
            if let Ok(mut socket) = tokio::net::TcpStream::connect(agent.front).await {
                let _ = socket.write_all(b"POST /completion HTTP/1.1\r\nHost: x\r\n").await;
                idle.push(socket);
            }
        }
        for _ in 0..5 {
            let content = completion(agent.front).await.expect("a completion during the flood");
            assert!(content.contains("model-a.gguf"), "{content}");
        }
        let text = metrics(&agent).await;
        let open = metric(&text, "alki_agent_front_connections").expect("gauge");
        assert!(open <= 64.0, "the cap holds: {open} open");
        assert!(metric(&text, "alki_agent_front_connections_evicted_total").is_some_and(|n| n >= 1900.0), "{text}");

        // The controller session still works: a new model is applied and served.
        let b = stage_bundle(&data_dir, "model-b", &[]).await;
        agent.desire(4, &b).await;
        next_where(&mut agent.up, status_with(Phase::Active, 4)).await;
        until_served_by(agent.front, "model-b.gguf").await;
        drop(idle);
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}
