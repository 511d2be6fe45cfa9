//! Eval suites and evaluation refusals against a real registry (CNCF distribution on loopback), without the
//! llama.cpp tools: a signed suite is acquired and parsed; an unsigned, wrongly signed, tampered or oversized
//! one is refused with its reason (the unsigned, wrongly signed and oversized ones before any layer is
//! downloaded); a candidate that does not fit gives DoesNotFit with the numbers; a llama.cpp build without
//! llama-perplexity gives ToolMissing. The real tools are in tests/eval_real_llama.rs.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alki_agent::eval::logits::BaseLogits;
use alki_agent::eval::suite::{self, SuiteRefused};
use alki_agent::eval::{Env, Request};
use alki_agent::metrics::AgentMetrics;
use alki_agent::pull::{Acquirer, PullOptions};
use alki_agent::runtime::priority::Priority;
use alki_agent::runtime::{InstanceOptions, StopPolicy, http_client};
use alki_shared::digest::Digest;
use alki_shared::eval::quality::{CouldNotRun, Outcome};
use alki_shared::eval::suite::{MAX_CORPUS_BYTES, Suite};
use alki_shared::signing::SigningKey;
use common::registry::{Registry, SuiteBytes, corpus, suite_files, trusted_key};

const TIMEOUT: Duration = Duration::from_secs(120);
const PROMPTS: &str = r#"{"id":"p1","prompt":"Hello","max_tokens":4,"checks":[{"contains":"x"}]}"#;

struct Setup {
    dir: tempfile::TempDir,
    registry: Registry,
    key: SigningKey,
    acquirer: Acquirer,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path());
    let (key, policy) = trusted_key(dir.path());
    let acquirer = registry.acquirer(&dir.path().join("data"), &policy);
    Setup { dir, registry, key, acquirer }
}

/// A valid suite whose corpus ends with `tag` (so each case has blobs of its own).
fn suite(tag: &str) -> (SuiteBytes, Suite) {
    let files = suite_files(&format!("{}\n{tag}\n", corpus()), PROMPTS, 300);
    let parsed = Suite::parse(files.files()).expect("a valid suite");
    (files, parsed)
}

fn options() -> PullOptions {
    PullOptions { disk_reserve: 0, ..PullOptions::default() }
}

async fn refusal(setup: &Setup, digest: &Digest) -> String {
    let location = setup.registry.location("acme/suites", digest);
    match suite::acquire(&setup.acquirer, &location, &options()).await {
        Ok(_) => panic!("suite {digest} was accepted"),
        Err(e @ (SuiteRefused::Pull { .. } | SuiteRefused::Invalid { .. })) => {
            eprintln!("refused: {e}");
            e.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_suite_is_acquired_and_unsigned_wrongly_signed_tampered_or_oversized_ones_are_refused() {
    tokio::time::timeout(TIMEOUT, async {
        let s = setup();
        let store = &s.acquirer.store;

        let (files, parsed) = suite("good");
        let good = s.registry.push_suite("acme/suites", "good", &files, &parsed).await;
        s.registry.sign("acme/suites", &good, &s.key).await;
        let acquired = suite::acquire(&s.acquirer, &s.registry.location("acme/suites", &good), &options())
            .await
            .expect("a signed suite");
        assert_eq!((acquired.suite.manifest.name.as_str(), acquired.suite.prompts.len()), ("smoke", 1));
        assert_eq!(std::fs::read(&acquired.corpus).expect("corpus blob"), files.corpus);
        let (removed, _) = store.evict(&Default::default(), 0).await.expect("evict");
        assert!(!removed.contains(&Digest::of(&files.corpus)), "the held suite's corpus is leased");
        drop(acquired);

        let (files, parsed) = suite("unsigned");
        let unsigned = s.registry.push_suite("acme/suites", "unsigned", &files, &parsed).await;
        let why = refusal(&s, &unsigned).await;
        assert!(why.contains("it is not signed"), "{why}");
        assert!(!store.contains(&Digest::of(&files.corpus)).await, "refused before any layer was fetched");

        let (files, parsed) = suite("other-key");
        let other = s.registry.push_suite("acme/suites", "other-key", &files, &parsed).await;
        s.registry.sign("acme/suites", &other, &SigningKey::generate().expect("key")).await;
        let why = refusal(&s, &other).await;
        assert!(why.contains("by no trusted key"), "{why}");
        assert!(!store.contains(&Digest::of(&files.corpus)).await, "refused before any layer was fetched");

        // A signature copied from another suite onto this one's signature tag.
        let (files, parsed) = suite("copied-signature");
        let copied = s.registry.push_suite("acme/suites", "copied", &files, &parsed).await;
        s.registry.sign_as("acme/suites", &copied, &good, &s.key).await;
        let why = refusal(&s, &copied).await;
        assert!(why.starts_with(&format!("eval suite {}", s.registry.location("acme/suites", &copied))), "{why}");
        assert!(why.contains("signature"), "{why}");

        // The registry's copy of a signed suite's corpus damaged at rest.
        let (files, parsed) = suite("tampered");
        let tampered = s.registry.push_suite("acme/suites", "tampered", &files, &parsed).await;
        s.registry.sign("acme/suites", &tampered, &s.key).await;
        let at_rest = s.registry.blob_file(&Digest::of(&files.corpus));
        let mut bytes = std::fs::read(&at_rest).expect("blob at rest");
        bytes[100] ^= 0x20;
        std::fs::write(&at_rest, bytes).expect("damage");
        let why = refusal(&s, &tampered).await;
        assert!(why.contains("does not match its digest"), "{why}");
        assert!(why.starts_with("eval suite "), "{why}");
        assert!(why.ends_with("the registry copy is corrupt — push the suite again with alkictl eval push"), "{why}");
        assert!(!why.contains("bundle"), "a suite is not a bundle: {why}");
        assert!(!store.contains(&Digest::of(&files.corpus)).await, "damaged bytes never become a blob");

        // A signed suite whose corpus is over the cap: refused by its declared size, never downloaded.
        let (files, parsed) = suite("oversized");
        let big = vec![b'a'; MAX_CORPUS_BYTES + 1];
        let oversized = s.registry.push_oversized_suite("acme/suites", &files, &parsed, &big).await;
        s.registry.sign("acme/suites", &oversized, &s.key).await;
        let why = refusal(&s, &oversized).await;
        assert!(why.contains("over the limit of 4194304"), "{why}");
        assert!(!store.contains(&Digest::of(&big)).await, "refused before the download");
    })
    .await
    .expect("bounded");
}

/// A llama-server that is not run here, in a directory without llama-perplexity.
fn server_without_tools(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let server = bin.join("llama-server");
    std::fs::write(&server, "#!/bin/sh\nexit 1\n").expect("server");
    std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    server
}

fn env(s: &Setup, llama_server: PathBuf, memory_reserve: u64) -> Env {
    let data_dir = s.dir.path().join("data");
    Env {
        acquirer: s.acquirer.clone(),
        work_dir: data_dir.join("evaluation"),
        instance: InstanceOptions {
            llama_server,
            extra_args: Vec::new(),
            launcher: Vec::new(),
            log_dir: data_dir.join("logs"),
            health_timeout: Duration::from_secs(10),
            stop: StopPolicy::default(),
        },
        http: http_client(),
        logits: BaseLogits::new(s.acquirer.store.clone(), &data_dir.join("content")),
        priority: Priority::Normal,
        threads: 0,
        memory_reserve,
        disk_reserve: 0,
        bandwidth: None,
        metrics: Arc::new(AgentMetrics::default()),
        data_dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_does_not_fit_or_a_build_without_llama_perplexity_says_why() {
    tokio::time::timeout(TIMEOUT, async {
        let s = setup();
        let model = s.dir.path().join("model.gguf");
        std::fs::write(&model, vec![7u8; 4096]).expect("model bytes");
        let bundle = s.registry.push_bundle("acme/models", &[("Q8_0", &model)]).await;
        s.registry.sign("acme/models", &bundle.location.digest, &s.key).await;
        let (files, parsed) = suite("refusals");
        let suite_digest = s.registry.push_suite("acme/suites", "refusals", &files, &parsed).await;
        s.registry.sign("acme/suites", &suite_digest, &s.key).await;
        let request = Request {
            candidate: bundle.location.clone(),
            variant: None,
            suite: s.registry.location("acme/suites", &suite_digest),
            baseline: None,
        };
        let server = server_without_tools(s.dir.path());

        let huge_reserve = 1 << 50;
        let result = env(&s, server.clone(), huge_reserve).evaluate(&request).await;
        let Outcome::CouldNotRun(CouldNotRun::DoesNotFit { needed_bytes, available_bytes }) = result.outcome else {
            panic!("expected DoesNotFit, got {:?}", result.outcome);
        };
        assert_eq!(needed_bytes, 2 * 4096 + huge_reserve, "the variant's need and the reserve");
        assert!(available_bytes > 0 && available_bytes < huge_reserve);
        assert_eq!(result.suite, suite_digest);
        assert!(!s.acquirer.store.contains(&Digest::of(&vec![7u8; 4096])).await, "nothing pulled that cannot run");

        let result = env(&s, server, 0).evaluate(&request).await;
        assert_eq!(result.outcome, Outcome::CouldNotRun(CouldNotRun::ToolMissing { tool: "llama-perplexity".into() }));
        assert_eq!(result.candidate, bundle.variants[0], "the variant evaluated is named, not the bundle");
    })
    .await
    .expect("bounded");
}
