//! Fuzzes the registry's upload path over real HTTP against an in-process registry (stable Rust, proptest):
//! random content split into random chunks, each PATCHed with a right, wrong or missing Content-Range, then
//! closed with a right, wrong or malformed digest (sometimes with a last chunk on the PUT). Whatever the
//! script, the registry never answers 5xx, a blob it accepts always hashes to its name and holds exactly the
//! bytes it acknowledged, a wrong digest never creates a blob, and a well-behaved script always succeeds.
//!
//! `ALKI_FUZZ_CASES` sets the number of cases (default 64 here: each case is a handful of HTTP requests).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use alki_shared::digest::Digest;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::{Method, StatusCode};

fn cases() -> u32 {
    std::env::var("ALKI_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

#[derive(Clone, Debug)]
enum RangeMode {
    Right,
    /// Claims to start this many bytes off the real offset (never zero).
    Off(i64),
    Missing,
}

#[derive(Clone, Debug)]
enum DigestMode {
    Right,
    OfOtherBytes,
    Malformed(String),
}

#[derive(Clone, Debug)]
struct Script {
    chunks: Vec<(Vec<u8>, RangeMode)>,
    last: Vec<u8>,
    digest: DigestMode,
}

fn script() -> impl Strategy<Value = Script> {
    let range = prop_oneof![
        6 => Just(RangeMode::Right),
        2 => prop_oneof![-50i64..0, 1i64..50].prop_map(RangeMode::Off),
        2 => Just(RangeMode::Missing),
    ];
    let chunk = (prop::collection::vec(any::<u8>(), 0..600), range);
    let digest = prop_oneof![
        6 => Just(DigestMode::Right),
        2 => Just(DigestMode::OfOtherBytes),
        2 => prop_oneof![
            Just("sha256:xyz".to_owned()),
            Just("md5:d41d8cd98f00b204e9800998ecf8427e".to_owned()),
            Just(String::new()),
            Just(format!("sha256:{}", "A".repeat(64))),
            Just("sha256:..%2F..%2Fescape".to_owned()),
            "[ -~]{0,80}",
        ]
        .prop_map(DigestMode::Malformed),
    ];
    (prop::collection::vec(chunk, 0..6), prop::collection::vec(any::<u8>(), 0..300), digest)
        .prop_map(|(chunks, last, digest)| Script { chunks, last, digest })
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// Runs one script; returns an error message for a broken invariant.
async fn run(h: &common::Harness, case: u64, script: Script) -> Result<(), String> {
    let repo = format!("fuzz/case{}", case % 8);
    let start = h.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/")).send().await.map_err(|e| e.to_string())?;
    if start.status() != StatusCode::ACCEPTED {
        return Err(format!("starting an upload answered {}", start.status()));
    }
    let mut url = location(&start);
    // What the registry acknowledged, in order: the model of the upload.
    let mut accepted: Vec<u8> = Vec::new();
    // A refused chunk may end the upload (the registry drops a failed session): after one, refusals are allowed.
    let mut tainted = false;
    for (bytes, mode) in script.chunks {
        let offset = accepted.len() as i64;
        let mut request = h.req(Method::PATCH, &url).body(bytes.clone());
        let claimed = match mode {
            // An empty chunk has no honest range to claim.
            RangeMode::Right if bytes.is_empty() => None,
            RangeMode::Right => Some(offset),
            RangeMode::Off(delta) => Some((offset + delta).max(0)),
            RangeMode::Missing => None,
        };
        if let Some(from) = claimed {
            let to = from + bytes.len() as i64 - 1;
            request = request.header("content-range", format!("{from}-{}", to.max(from)));
        }
        let resp = request.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(format!("PATCH answered {status}"));
        }
        let in_order = claimed.is_none_or(|from| from == offset);
        if status == StatusCode::ACCEPTED {
            accepted.extend_from_slice(&bytes);
            url = location(&resp);
            let range = resp.headers().get("range").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let reported_end = range.rsplit('-').next().and_then(|n| n.parse::<i64>().ok());
            if !accepted.is_empty() && reported_end != Some(accepted.len() as i64 - 1) {
                return Err(format!("after {} bytes the upload reports Range {range:?}", accepted.len()));
            }
        } else if in_order && !bytes.is_empty() && !tainted {
            return Err(format!("an in-order chunk of {} bytes was refused: {status}", bytes.len()));
        } else {
            tainted = true;
        }
    }
    let mut whole = accepted.clone();
    whole.extend_from_slice(&script.last);
    let (digest, honest) = match &script.digest {
        DigestMode::Right => (Digest::of(&whole).to_string(), true),
        DigestMode::OfOtherBytes => (Digest::of(format!("other {case} {}", whole.len()).as_bytes()).to_string(), false),
        DigestMode::Malformed(s) => (s.clone(), false),
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let put = h
        .req(Method::PUT, &format!("{url}{sep}digest={}", urlencode(&digest)))
        .body(script.last.clone())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = put.status();
    if status.is_server_error() {
        return Err(format!("PUT answered {status}"));
    }
    let real = Digest::of(&whole);
    if honest && !tainted && status != StatusCode::CREATED {
        return Err(format!("an honest upload of {} bytes was refused: {status}", whole.len()));
    }
    if !honest && status == StatusCode::CREATED {
        return Err(format!("a dishonest digest {digest:?} was accepted for {real}"));
    }
    if let Ok(claimed) = digest.parse::<Digest>()
        && claimed != real
        && h.registry.blob_path(&claimed).is_some()
    {
        return Err(format!("a blob named {claimed} exists with other content"));
    }
    if status == StatusCode::CREATED {
        let got = h.req(Method::GET, &format!("/v2/{repo}/blobs/{real}")).send().await.map_err(|e| e.to_string())?;
        let body = got.bytes().await.map_err(|e| e.to_string())?;
        if body.as_ref() != whole.as_slice() {
            return Err(format!("blob {real} serves {} bytes, not the {} acknowledged", body.len(), whole.len()));
        }
    } else {
        // A failed upload is gone: its session answers "unknown", or it is still open for the client to fix.
        let after = h.req(Method::GET, &url).send().await.map_err(|e| e.to_string())?;
        if after.status().is_server_error() {
            return Err(format!("upload status after a failed PUT answered {}", after.status()));
        }
        let _ = h.req(Method::DELETE, &url).send().await;
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn random_upload_scripts_keep_the_registry_consistent() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let h = rt.block_on(common::start());
    let executed = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    runner
        .run(&script(), |script| {
            let case = executed.fetch_add(1, Ordering::Relaxed);
            let outcome = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(30), run(&h, case, script)).await
            });
            match outcome {
                Ok(Ok(())) => Ok(()),
                Ok(Err(broken)) => Err(TestCaseError::fail(broken)),
                Err(_) => Err(TestCaseError::fail("the script did not finish in 30 s")),
            }
        })
        .expect("no failing case");
    eprintln!("fuzz_registry_upload: {} executions, 0 crashes", executed.load(Ordering::Relaxed));
    drop(h);
}
