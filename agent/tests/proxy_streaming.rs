//! The front proxy streams responses as they come (SSE), and keeps a streaming request in flight until its
//! body ends.

mod common;

use std::sync::{Arc, Mutex};

use alki_agent::runtime::{Proxy, http_client};
use axum::body::{Body, Bytes};
use common::TEST_TIMEOUT;
use tokio::sync::{Notify, mpsc};

/// An upstream whose one endpoint sends "one", waits for `release`, sends "two", and ends.
async fn gated_upstream(release: Arc<Notify>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let release = Arc::new(Mutex::new(Some(release)));
    let app = axum::Router::new().fallback(move || {
        let release = release.lock().expect("lock").take();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"data: one\n\n"))).await;
                if let Some(release) = release {
                    release.notified().await;
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: two\n\n"))).await;
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
            ([("content-type", "text/event-stream")], Body::from_stream(stream))
        }
    });
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("upstream server");
    });
    addr
}

#[tokio::test]
async fn server_sent_events_pass_through_as_they_come() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let release = Arc::new(Notify::new());
        let upstream_addr = gated_upstream(release.clone()).await;
        let proxy = Proxy::new(http_client());
        let upstream = proxy.upstream(upstream_addr, "sha256:s");
        proxy.switch(Some(upstream.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let front = listener.local_addr().expect("front addr");
        let router = proxy.router();
        tokio::spawn(async move {
            axum::serve(listener, router).await.expect("front server");
        });

        let mut response = reqwest::Client::new()
            .post(format!("http://{front}/v1/chat/completions"))
            .body(r#"{"stream":true}"#)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        // The upstream holds "two" back until the client has seen "one": a buffering proxy would hang here.
        let first = response.chunk().await.expect("first chunk").expect("not the end");
        assert_eq!(&first[..], b"data: one\n\n");
        assert_eq!(upstream.in_flight(), 1, "a stream in progress counts as in flight");
        release.notify_one();
        let mut rest = Vec::new();
        while let Some(chunk) = response.chunk().await.expect("chunk") {
            rest.extend_from_slice(&chunk);
        }
        assert_eq!(rest, b"data: two\n\n");
        common::until(|| upstream.in_flight() == 0).await;
        assert_eq!(proxy.stats().expect("stats").requests_total, 1);
    })
    .await
    .expect("test timed out");
}
