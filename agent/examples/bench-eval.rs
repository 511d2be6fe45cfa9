//! Evaluation benchmark: time and peak memory of a full evaluation as the agent runs it (the baseline's
//! logits computed, the candidate's KL-divergence run against them, 20 golden prompts on a loopback
//! llama-server), over a 2,048-token corpus (16 chunks of 128 tokens), against `llama-perplexity` run by hand
//! with the same arguments (baseline run, then KL-divergence run); and the size of the cached base logits per
//! 1,000 tokens. N rounds, the three runs interleaved in each (so a neighbour's load falls on all alike),
//! median and minimum; the agent's runs at normal priority so both compete alike.
//!
//!   cargo run --release -p alki-agent --example bench-eval -- [--rounds 3] [--large | --model B.gguf --baseline A.gguf]
//!
//! Without files it makes the tiny model A (llama-spm vocabulary, F16) and B1 = A in Q8_0 with the real
//! `llama-quantize`; `--large` makes A a llama of 12 layers, n_embd 768 (134 M parameters, 268 MB in F16)
//! with random weights the same way. The llama.cpp build is `ALKI_LLAMA_BIN_DIR` (or the cached one). A command, not a test:
//! it prints figures for the note.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use alki_agent::eval::logits::BaseLogits;
use alki_agent::eval::measure::{Baseline, Meter, Model, SuiteRef};
use alki_agent::runtime::priority::Priority;
use alki_agent::runtime::{InstanceOptions, StopPolicy, http_client};
use alki_agent::store::ContentStore;
use alki_e2e::tiny_model::{self, CHATML_TEMPLATE, TinyModelOptions};
use alki_shared::digest::Digest;
use alki_shared::eval::perplexity::PerplexitySettings;
use alki_shared::eval::suite::{Suite, SuiteFiles};
use anyhow::{Context as _, bail};

const CONTEXT: u32 = 128;
const CHUNKS: u32 = 16;
const GOLDEN_PROMPTS: usize = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mut rounds, mut files) = (3usize, None::<(PathBuf, PathBuf)>);
    let mut args = std::env::args().skip(1);
    let (mut model, mut baseline, mut large) = (None, None, false);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rounds" => rounds = value()?.parse().context("--rounds takes a number")?,
            "--model" => model = Some(PathBuf::from(value()?)),
            "--baseline" => baseline = Some(PathBuf::from(value()?)),
            "--large" => large = true,
            other => bail!("unknown argument {other:?}; use --rounds N, --model FILE --baseline FILE"),
        }
    }
    if let (Some(m), Some(b)) = (model, baseline) {
        files = Some((m, b));
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let bin = alki_e2e::harness::llama_bin_dir()?;
    let work = tempfile::tempdir()?;
    let (candidate, base) = match files {
        Some(pair) => pair,
        None => models(work.path(), &bin, large)?,
    };
    let suite = suite(work.path())?;
    let corpus = work.path().join("corpus.txt");
    println!(
        "candidate {} ({} bytes), baseline {} ({} bytes)",
        candidate.display(),
        size(&candidate),
        base.display(),
        size(&base)
    );
    println!(
        "corpus: {CHUNKS} chunks of {CONTEXT} tokens; {GOLDEN_PROMPTS} golden prompts; {rounds} rounds, medians\n"
    );

    let settings = PerplexitySettings { context_size: CONTEXT, chunks: CHUNKS, threads: 0, gpu_layers: 0 };
    let bench = Bench::new(&bin, &candidate, &base, suite, work.path()).await?;
    let (mut hand, mut ppl, mut full, mut hand_rss, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), 0u64, 0u64);
    // A warm-up, untimed, so no run pays for reading the models from disk.
    by_hand(&bin, &candidate, &base, &corpus, &settings, work.path())?;
    // Interleaved, so a neighbour's load on the machine falls on all three alike.
    for round in 0..rounds {
        let (took, rss) = by_hand(&bin, &candidate, &base, &corpus, &settings, work.path())?;
        hand.push(took);
        hand_rss = hand_rss.max(rss);
        ppl.push(bench.agent(round, false).await?.0);
        let (took, b) = bench.agent(round, true).await?;
        full.push(took);
        bytes = b;
        eprintln!("round {} done", round + 1);
    }
    let tokens = u64::from(CONTEXT * CHUNKS);
    let (hand, ppl, full) = (stats(hand), stats(ppl), stats(full));
    println!("                                                  median      min");
    println!(
        "llama-perplexity by hand (baseline + KLD run):   {:>6.2} s {:>6.2} s   peak RSS {:>6.1} MiB",
        hand.0,
        hand.1,
        mib(hand_rss)
    );
    println!(
        "agent, perplexity + KLD (no golden prompts):     {:>6.2} s {:>6.2} s   overhead {:+.1} % (median), {:+.1} % (min)",
        ppl.0,
        ppl.1,
        (ppl.0 / hand.0 - 1.0) * 100.0,
        (ppl.1 / hand.1 - 1.0) * 100.0
    );
    println!(
        "agent, full evaluation ({GOLDEN_PROMPTS} golden prompts):      {:>6.2} s {:>6.2} s   peak RSS of its processes {:>6.1} MiB",
        full.0,
        full.1,
        mib(children_max_rss())
    );
    println!(
        "this process (the agent's code, and the model generator with --large): peak RSS {:.1} MiB",
        mib(own_hwm())
    );
    println!(
        "cached base logits: {bytes} bytes for {tokens} tokens = {:.1} MiB per 1,000 tokens",
        bytes as f64 / (1 << 20) as f64 / tokens as f64 * 1000.0
    );
    Ok(())
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Median and minimum, in seconds.
fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    (secs(v[v.len() / 2]), secs(v[0]))
}

/// A (seed 1, ChatML; tiny, or `large`) and B1 = A quantized to Q8_0.
fn models(dir: &Path, bin: &Path, large: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    let vocab = tiny_model::cached_vocab_path().context("the llama.cpp build caches the vocab file")?;
    let tokenizer = tiny_model::with_chat_template(&tiny_model::read_tokenizer(&vocab)?, CHATML_TEMPLATE);
    let a = dir.join("a.gguf");
    if large {
        write_large_model(&a, &tokenizer)?;
    } else {
        tiny_model::write_tiny_model(&a, &TinyModelOptions { name: "a".into(), seed: 1 }, &tokenizer)?;
    }
    let b1 = dir.join("b1.gguf");
    let out = Command::new(bin.join("llama-quantize")).arg(&a).arg(&b1).arg("Q8_0").output()?;
    anyhow::ensure!(out.status.success(), "llama-quantize: {}", String::from_utf8_lossy(&out.stderr));
    Ok((b1, a))
}

/// A llama of 12 layers, n_embd 768, 12 heads, n_ff 2048 with `tokenizer`, random F16 weights.
fn write_large_model(path: &Path, tokenizer: &[alki_shared::gguf::MetadataEntry]) -> anyhow::Result<()> {
    use alki_shared::gguf::{MetadataEntry, Value};
    use tiny_model::Tensor;
    const EMBD: u64 = 768;
    const LAYERS: u64 = 12;
    const HEADS: u64 = 12;
    const FF: u64 = 2048;
    let n_vocab = tiny_model::vocab_size(tokenizer)?;
    let u = |v: u64| Value::U32(v as u32);
    let mut metadata: Vec<MetadataEntry> = [
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("alki-bench-large".into())),
        ("general.file_type", Value::U32(tiny_model::FILE_TYPE_F16)),
        ("llama.vocab_size", u(n_vocab)),
        ("llama.context_length", u(2048)),
        ("llama.embedding_length", u(EMBD)),
        ("llama.block_count", u(LAYERS)),
        ("llama.feed_forward_length", u(FF)),
        ("llama.attention.head_count", u(HEADS)),
        ("llama.attention.head_count_kv", u(HEADS)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.dimension_count", u(EMBD / HEADS)),
    ]
    .into_iter()
    .map(|(key, value)| MetadataEntry { key: key.to_owned(), value })
    .collect();
    metadata.extend(tokenizer.iter().filter(|e| e.key.starts_with("tokenizer.")).cloned());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut matrix = |name: &str, ne0: u64, ne1: u64| {
        let mut data = Vec::with_capacity((2 * ne0 * ne1) as usize);
        for _ in 0..ne0 * ne1 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let w = ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.02;
            data.extend_from_slice(&tiny_model::f32_to_f16_bits(w).to_le_bytes());
        }
        Tensor { name: name.to_owned(), dims: vec![ne0, ne1], ggml_type: 1, data }
    };
    let norm = |name: &str| Tensor {
        name: name.to_owned(),
        dims: vec![EMBD],
        ggml_type: 0,
        data: (0..EMBD).flat_map(|_| 1.0f32.to_le_bytes()).collect(),
    };
    let mut tensors = vec![matrix("token_embd.weight", EMBD, n_vocab), norm("output_norm.weight")];
    tensors.push(matrix("output.weight", EMBD, n_vocab));
    for layer in 0..LAYERS {
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        tensors.push(norm(&name("attn_norm")));
        for t in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            tensors.push(matrix(&name(t), EMBD, EMBD));
        }
        tensors.push(norm(&name("ffn_norm")));
        tensors.push(matrix(&name("ffn_gate"), EMBD, FF));
        tensors.push(matrix(&name("ffn_up"), EMBD, FF));
        tensors.push(matrix(&name("ffn_down"), FF, EMBD));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    tiny_model::write_gguf(&mut out, &metadata, &tensors)?;
    Ok(())
}

/// The suite: this repository's architecture notes as the corpus, 20 plain golden prompts; written to `dir`.
fn suite(dir: &Path) -> anyhow::Result<Suite> {
    let text = include_str!("../../ARCHITECTURE.md");
    let mut end = 12_000.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let corpus = &text[..end];
    std::fs::write(dir.join("corpus.txt"), corpus)?;
    let prompts: String = (0..GOLDEN_PROMPTS)
        .map(|i| {
            format!(
                "{{\"id\":\"p{i}\",\"prompt\":\"Item {i}: the\",\"max_tokens\":16,\"checks\":[{{\"regex\":\".\"}}]}}\n"
            )
        })
        .collect();
    let manifest = format!(
        "name = \"bench\"\nversion = \"1\"\ncorpus = \"corpus.txt\"\nprompts = \"prompts.jsonl\"\n\
         context_size = {CONTEXT}\nchunks = {CHUNKS}\ntime_budget_seconds = 3600\n"
    );
    let files = SuiteFiles { manifest: manifest.as_bytes(), corpus: corpus.as_bytes(), prompts: prompts.as_bytes() };
    Ok(Suite::parse(files)?)
}

async fn model(bin: &Path, path: &Path) -> anyhow::Result<Model> {
    let (_, model) = alki_agent::eval::cli::file_model(&bin.join("llama-server"), path).await?;
    model.map_err(|e| anyhow::anyhow!("{e}"))
}

/// The agent's side: the two models, the suite with and without golden prompts, how instances run.
struct Bench {
    candidate: Model,
    base: Model,
    suite: Suite,
    no_prompts: Suite,
    instance: InstanceOptions,
    http: alki_agent::runtime::HttpClient,
    work: PathBuf,
}

impl Bench {
    async fn new(bin: &Path, candidate: &Path, base: &Path, suite: Suite, work: &Path) -> anyhow::Result<Bench> {
        let instance = InstanceOptions {
            llama_server: bin.join("llama-server"),
            extra_args: Vec::new(),
            launcher: Vec::new(),
            log_dir: work.join("logs"),
            health_timeout: Duration::from_secs(300),
            stop: StopPolicy::default(),
        };
        Ok(Bench {
            candidate: model(bin, candidate).await?,
            base: model(bin, base).await?,
            no_prompts: Suite { prompts: Vec::new(), ..suite.clone() },
            suite,
            instance,
            http: http_client(),
            work: work.to_owned(),
        })
    }

    /// One measurement with a fresh cache (the baseline's logits computed): its time and the logits' size.
    async fn agent(&self, round: usize, with_prompts: bool) -> anyhow::Result<(Duration, u64)> {
        let content = self.work.join(format!("content-{round}-{with_prompts}"));
        let logits = BaseLogits::new(ContentStore::open(&content)?, &content);
        let meter = Meter {
            instance: &self.instance,
            http: &self.http,
            priority: Priority::Normal,
            threads: 0,
            logits: &logits,
            disk_reserve: 0,
            speeds: None,
        };
        let suite = if with_prompts { &self.suite } else { &self.no_prompts };
        let (digest, corpus) = (Digest::of(b"bench suite"), self.work.join("corpus.txt"));
        let started = Instant::now();
        let baseline = Some(Baseline::Model(Box::new(self.base.clone())));
        let measured = meter
            .measure(&self.candidate, baseline, SuiteRef { digest: &digest, suite, corpus: &corpus })
            .await
            .map_err(|e| anyhow::anyhow!("the evaluation could not run: {e}"))?;
        let took = started.elapsed();
        anyhow::ensure!(measured.golden.prompts == suite.prompts.len() as u32, "every prompt ran");
        let bytes = logits.bytes().await;
        let _ = std::fs::remove_dir_all(&content);
        Ok((took, bytes))
    }
}

/// `llama-perplexity` by hand: the baseline run writing its logits, then the KL-divergence run, with the
/// same arguments as the agent's; the time and the larger peak RSS (each process waited with wait4).
fn by_hand(
    bin: &Path,
    candidate: &Path,
    base: &Path,
    corpus: &Path,
    settings: &PerplexitySettings,
    work: &Path,
) -> anyhow::Result<(Duration, u64)> {
    let logits = work.join("by-hand.kld");
    let started = Instant::now();
    let base_rss = run_waited(&bin.join("llama-perplexity"), &settings.perplexity_args(base, corpus, Some(&logits)))?;
    let kld_rss = run_waited(&bin.join("llama-perplexity"), &settings.kl_divergence_args(candidate, &logits))?;
    Ok((started.elapsed(), base_rss.max(kld_rss)))
}

/// Runs `program` to its end (output discarded) and returns its peak RSS in bytes.
fn run_waited(program: &Path, args: &[std::ffi::OsString]) -> anyhow::Result<u64> {
    let child = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", program.display()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our unwaited child; status and usage point to live values.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    anyhow::ensure!(waited == pid && status == 0, "{} failed (status {status})", program.display());
    Ok(usage.ru_maxrss as u64 * 1024)
}

/// The largest peak RSS of any child process waited for so far.
fn children_max_rss() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: usage points to a live value.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}

/// This process's peak RSS (`VmHWM`).
fn own_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}
