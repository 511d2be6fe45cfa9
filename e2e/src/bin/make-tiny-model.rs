//! `make-tiny-model`: writes the tiny llama GGUF used by tests (see `alki_e2e::tiny_model`).

use std::path::PathBuf;

use alki_e2e::tiny_model::{self, TinyModelOptions};
use anyhow::Context;
use clap::Parser;

/// Writes a tiny llama-architecture GGUF (2 layers, n_embd 64, F16, random weights) that llama-server loads.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// GGUF to copy the tokenizer.* keys from, e.g. llama.cpp's models/ggml-vocab-llama-spm.gguf
    /// (default: the copy cached by e2e/scripts/build-llama-server.sh).
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Where to write the model (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// general.name of the model.
    #[arg(long, default_value = "alki-tiny")]
    name: String,
    /// Seed of the random weights: same seed, same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Writes a chat template into tokenizer.chat_template: `chatml`, or `mismatched` (another family's
    /// markers, which breaks golden prompts recorded under ChatML). The weights stay those of --seed.
    #[arg(long, value_enum, conflicts_with = "chat_template_file")]
    chat_template: Option<Template>,
    /// Writes this file's Jinja source into tokenizer.chat_template.
    #[arg(long)]
    chat_template_file: Option<PathBuf>,
    /// A fault knob for the fake llama-server, KEY=VALUE (e.g. FAKE_LLAMA_TOKEN_MS=150 for a slow model),
    /// written into the model so a bundle packed from it carries it; repeatable. llama.cpp ignores it.
    #[arg(long = "fake-knob", value_name = "KEY=VALUE")]
    fake_knobs: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Template {
    Chatml,
    Mismatched,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vocab = match args.vocab {
        Some(path) => path,
        None => tiny_model::cached_vocab_path().context(
            "no --vocab given and no cached ggml-vocab-llama-spm.gguf; run e2e/scripts/build-llama-server.sh",
        )?,
    };
    let mut tokenizer = tiny_model::read_tokenizer(&vocab)?;
    let template = match (args.chat_template, &args.chat_template_file) {
        (Some(Template::Chatml), _) => Some(tiny_model::CHATML_TEMPLATE.to_owned()),
        (Some(Template::Mismatched), _) => Some(tiny_model::MISMATCHED_TEMPLATE.to_owned()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file).with_context(|| format!("reading the chat template {}", file.display()))?,
        ),
        (None, None) => None,
    };
    if let Some(template) = template {
        tokenizer = tiny_model::with_chat_template(&tokenizer, &template);
    }
    let options = TinyModelOptions { name: args.name, seed: args.seed };
    if let Some(bad) = args.fake_knobs.iter().find(|k| !k.contains('=')) {
        anyhow::bail!("--fake-knob {bad:?} is not KEY=VALUE (e.g. FAKE_LLAMA_TOKEN_MS=150)");
    }
    let size = tiny_model::write_tiny_model_with_knobs(&args.out, &options, &tokenizer, &args.fake_knobs)?;
    println!("{} {size}", args.out.display());
    Ok(())
}
