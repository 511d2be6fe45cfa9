//! Helpers for the quality end-to-end tests: the tiny models A (F16 under ChatML), B1 (A quantized to Q8_0
//! by the real `llama-quantize`), B2 (the same architecture with other weights) and B3 (A's weights under a
//! mismatched chat template), and eval suites: a corpus for perplexity and KL divergence, and golden prompts
//! whose `exact` checks are recorded from A's real replies on llama-server at temperature 0.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use alki_e2e::harness::{Proc, free_port, run, wait_for};
use alki_e2e::tiny_model::{self, CHATML_TEMPLATE, MISMATCHED_TEMPLATE, TinyModelOptions};
use alki_shared::eval::prompts::{GoldenPrompt, parse_prompts};
use alki_shared::eval::suite::{DEFAULT_SEED, SUITE_FILE};
use anyhow::{Context as _, bail, ensure};

/// The four models of the quality tests.
pub struct Models {
    /// F16, ChatML: what devices run before a rollout.
    pub a: PathBuf,
    /// A quantized to Q8_0: close to A.
    pub b1: PathBuf,
    /// Seed 2: the same architecture, other weights, far from A.
    pub b2: PathBuf,
    /// A's weights under a chat template of another family: breaks golden chat prompts only.
    pub b3: PathBuf,
}

/// Writes A, B2 and B3 with the tiny-model writer (the vocabulary cached by the llama-server build) and
/// quantizes A into B1 with `llama-quantize` from `llama_bin`.
pub fn make_models(dir: &Path, llama_bin: &Path) -> anyhow::Result<Models> {
    let vocab = tiny_model::cached_vocab_path()
        .context("no cached ggml-vocab-llama-spm.gguf; run e2e/scripts/build-llama-server.sh")?;
    let tokenizer = tiny_model::read_tokenizer(&vocab)?;
    let write = |name: &str, seed: u64, template: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("{name}.gguf"));
        let options = TinyModelOptions { name: "alki-tiny".into(), seed };
        tiny_model::write_tiny_model(&path, &options, &tiny_model::with_chat_template(&tokenizer, template))?;
        Ok(path)
    };
    let a = write("a-f16", 1, CHATML_TEMPLATE)?;
    let b2 = write("b2-other-seed", 2, CHATML_TEMPLATE)?;
    let b3 = write("b3-mismatched-template", 1, MISMATCHED_TEMPLATE)?;
    let b1 = dir.join("b1-q8_0.gguf");
    let out = run(Command::new(llama_bin.join("llama-quantize"))
        .arg(&a)
        .arg(&b1)
        .arg("Q8_0")
        .env("LD_LIBRARY_PATH", llama_bin))?;
    ensure!(b1.is_file(), "llama-quantize wrote no {}: {out}", b1.display());
    Ok(Models { a, b1, b2, b3 })
}

/// Chat prompts (id, user message) whose replies on A and on B1 are the same at temperature 0 (B1 agrees
/// with A on about 98% of tokens, so a long or unlucky prompt can differ), and that B3's template changes.
pub const CHAT_PROMPTS: [(&str, &str); 3] =
    [("capital", "What is the capital of France?"), ("hello", "Say hello."), ("sum", "What is 2 + 2?")];
/// A plain completion prompt (no template: B3 answers it as A does).
pub const PLAIN_PROMPT: (&str, &str) = ("count", "1, 2, 3,");
/// Tokens per golden reply.
pub const REPLY_TOKENS: u32 = 6;

/// The golden prompts as `prompts.jsonl` objects, without their checks.
fn prompt_values() -> Vec<serde_json::Value> {
    let chat = CHAT_PROMPTS.iter().map(|(id, text)| {
        serde_json::json!({"id": id, "messages": [{"role": "user", "content": text}], "max_tokens": REPLY_TOKENS})
    });
    let (id, prompt) = PLAIN_PROMPT;
    chat.chain([serde_json::json!({"id": id, "prompt": prompt, "max_tokens": REPLY_TOKENS})]).collect()
}

fn with_check(mut prompt: serde_json::Value, check: serde_json::Value) -> String {
    prompt["checks"] = serde_json::json!([check]);
    prompt.to_string()
}

/// `prompts.jsonl` whose only check every reply passes (`regex "^"`): for tests about suites, not replies.
pub fn lenient_prompts() -> String {
    prompt_values().into_iter().map(|p| with_check(p, serde_json::json!({"regex": "^"})) + "\n").collect()
}

/// Asks a real llama-server on `model` every golden prompt as a device does (the suite's request: temperature
/// 0, the default seed, no prompt cache) and returns `prompts.jsonl` with each reply recorded as an `exact`
/// check.
pub fn record_golden_prompts(llama_bin: &Path, model: &Path, logs: &Path) -> anyhow::Result<String> {
    let server = LlamaServer::start(llama_bin, model, logs)?;
    let mut out = String::new();
    for value in prompt_values() {
        let line = with_check(value.clone(), serde_json::json!({"regex": "^"}));
        let prompt = parse_prompts(line.as_bytes(), 1 << 20)?.into_iter().next().context("one prompt")?;
        let reply = server.ask(&prompt)?;
        let exact = reply.trim();
        ensure!(!exact.is_empty(), "A's reply to {} is blank; pick another prompt", prompt.id);
        out.push_str(&with_check(value, serde_json::json!({"exact": exact})));
        out.push('\n');
    }
    Ok(out)
}

/// A real llama-server on loopback, stopped when dropped.
pub struct LlamaServer {
    proc: Proc,
    port: u16,
    client: reqwest::blocking::Client,
}

impl LlamaServer {
    /// Starts llama-server on `model` with the settings an agent gives a tiny bundle (its 2048-token training
    /// context, one slot) and waits until it is healthy.
    pub fn start(llama_bin: &Path, model: &Path, logs: &Path) -> anyhow::Result<LlamaServer> {
        let port = free_port()?;
        let mut cmd = Command::new(llama_bin.join("llama-server"));
        cmd.arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-c", "2048", "-ngl", "0", "-np", "1"])
            .arg("--no-webui")
            .env("LD_LIBRARY_PATH", llama_bin);
        let name = format!("llama-server-{}", model.file_stem().and_then(|s| s.to_str()).unwrap_or("model"));
        let proc = Proc::spawn(&name, cmd, logs)?;
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let health = format!("http://127.0.0.1:{port}/health");
        wait_for("llama-server to be healthy", Duration::from_secs(60), &[&proc], || {
            Ok(client.get(&health).send().ok().filter(|r| r.status().is_success()).map(|_| ()))
        })?;
        Ok(LlamaServer { proc, port, client })
    }

    /// The reply text to `prompt`, asked as a device asks it.
    pub fn ask(&self, prompt: &GoldenPrompt) -> anyhow::Result<String> {
        let request = prompt.request(DEFAULT_SEED);
        let url = format!("http://127.0.0.1:{}{}", self.port, request.path);
        let response = self.client.post(&url).json(&request.body).send()?;
        if !response.status().is_success() {
            bail!("llama-server answered {} to {}: {}", response.status(), prompt.id, response.text()?);
        }
        Ok(prompt.read_reply(&response.bytes()?)?.text)
    }
}

/// The shape of a suite's `suite.toml`.
pub struct SuiteShape {
    pub name: &'static str,
    pub context_size: u32,
    pub chunks: u32,
    pub time_budget_seconds: u32,
}

/// What the quality tests run: 128-token chunks (16 at most: about 2,000 tokens of the corpus), within
/// five minutes.
pub const SMOKE: SuiteShape = SuiteShape { name: "smoke", context_size: 128, chunks: 16, time_budget_seconds: 300 };

/// The corpus: the repository's Apache-2.0 license text (about 9.7 kB, over 2,000 tokens), which does not
/// change.
pub fn corpus() -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../LICENSE");
    std::fs::read_to_string(&path).with_context(|| format!("reading the corpus {}", path.display()))
}

/// Writes a suite directory `dir` (created) with `shape`, the corpus and `prompts` (`prompts.jsonl`).
pub fn write_suite(dir: &Path, shape: &SuiteShape, prompts: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let toml = format!(
        "name = \"{}\"\nversion = \"1\"\ncorpus = \"corpus.txt\"\nprompts = \"prompts.jsonl\"\ncontext_size = {}\n\
         chunks = {}\ntime_budget_seconds = {}\n",
        shape.name, shape.context_size, shape.chunks, shape.time_budget_seconds
    );
    std::fs::write(dir.join(SUITE_FILE), toml)?;
    std::fs::write(dir.join("corpus.txt"), corpus()?)?;
    std::fs::write(dir.join("prompts.jsonl"), prompts)?;
    Ok(dir.to_owned())
}
