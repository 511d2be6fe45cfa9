//! Events as an operator meets them, with the real binaries over TLS: `alkictl webhooks add` points the fleet's
//! events at a receiver, a real agent (on the fake llama-server) enrolls and is decommissioned, and the receiver
//! gets each event signed while `alkictl events list --follow` prints them as they happen.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alki_e2e::harness::{self, binary, start_controller, wait_for};
use alki_shared::webhook;

/// Receives deliveries on a thread of its own; keeps the types of those whose signature verifies.
fn receiver(key: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let kept = got.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (key, kept) = (key.clone(), kept.clone());
                    async move {
                        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .expect("clock")
                            .as_secs() as i64;
                        let (id, ts, sig) =
                            (h(webhook::ID_HEADER), h(webhook::TIMESTAMP_HEADER), h(webhook::SIGNATURE_HEADER));
                        if webhook::verify(&key, &id, &ts, &sig, &body, now).is_err() {
                            return axum::http::StatusCode::UNAUTHORIZED;
                        }
                        let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        kept.lock().expect("lock").push(event["type"].as_str().unwrap_or_default().to_owned());
                        axum::http::StatusCode::OK
                    }
                }),
            );
            let _ = axum::serve(listener, app).await;
        });
    });
    (url, got)
}

#[test]
fn operators_route_events_to_a_webhook_and_follow_them_live() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let controller = start_controller(root.path(), &[])?;
    let key = [5u8; 32];
    let secret_file = root.path().join("hook.secret");
    std::fs::write(&secret_file, webhook::secret_from_key(&key))?;
    let (url, got) = receiver(key.to_vec());

    // Plain http must be asked for by name.
    let refused = controller.alkictl()?.args(["webhooks", "add", &url]).output()?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("https"), "{}", String::from_utf8_lossy(&refused.stderr));
    let secret_arg = secret_file.display().to_string();
    let added = controller.alkictl_json(&["webhooks", "add", &url, "--insecure-http", "--secret-file", &secret_arg])?;
    let id = added["webhook"]["id"].as_str().expect("id").to_owned();
    assert_eq!(added["secret"], webhook::secret_from_key(&key));

    let mut follow = controller
        .alkictl()?
        .args(["events", "list", "--follow", "--type", "device.", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let key_pair = harness::generate_key(root.path(), "ci")?;
    let trust = harness::write_trust_policy(root.path(), &key_pair.public_key)?;
    let fake = binary("fake-llama-server")?;
    let (mut agent, _front) = controller.start_agent(root.path(), "pi-events", "lab", &fake, &trust, "")?;
    let online: serde_json::Value = serde_json::from_str(&lines.recv_timeout(Duration::from_secs(60))?)?;
    assert_eq!((online["type"].as_str(), online["device_id"].as_str()), (Some("device.online"), Some("pi-events")));

    controller.alkictl_json(&["devices", "decommission", "pi-events"])?;
    wait_for("the receiver to get the decommission", Duration::from_secs(30), &[&controller.proc], || {
        Ok(got.lock().expect("lock").contains(&"ai.alki.device.decommissioned".to_owned()).then_some(()))
    })?;
    let types = got.lock().expect("lock").clone();
    let online_at = types.iter().position(|t| t == "ai.alki.device.online").expect("online delivered");
    let gone_at = types.iter().position(|t| t == "ai.alki.device.decommissioned").expect("decommission delivered");
    assert!(online_at < gone_at, "{types:?}");
    let followed: serde_json::Value = serde_json::from_str(&lines.recv_timeout(Duration::from_secs(30))?)?;
    assert!(followed["type"].as_str().is_some_and(|t| t.starts_with("device.")), "{followed}");

    let hooks = controller.alkictl_json(&["webhooks", "list"])?;
    let hook = hooks.as_array().and_then(|h| h.iter().find(|w| w["id"] == id.as_str())).expect("listed").clone();
    assert_eq!(hook["last_error"], "", "{hook}");
    let tested = controller.alkictl_json(&["webhooks", "test", &id])?;
    assert_eq!((tested["ok"].as_bool(), tested["status"].as_u64()), (Some(true), Some(200)));
    let events = controller.alkictl_json(&["events", "list", "--device", "pi-events"])?;
    assert!(events.as_array().is_some_and(|e| e.len() >= 2), "{events}");
    controller.alkictl_json(&["webhooks", "remove", &id])?;
    assert_eq!(controller.alkictl_json(&["webhooks", "list"])?, serde_json::json!([]));

    follow.kill()?;
    follow.wait()?;
    agent.stop(Duration::from_secs(10))?;
    Ok(())
}
