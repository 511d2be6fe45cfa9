//! The eval suite format: `suite.toml` (what to measure and within what time budget), a text corpus for
//! perplexity and KL divergence, and golden prompts; read strictly (unknown keys refused), bounded in size,
//! with errors that name the field and the fix. Pure: the caller reads the files (at most the caps here).
//!
//! ```toml
//! name = "smoke"                 # 1 to 128 characters from a-z, 0-9, '.', '_' and '-'
//! version = "1"
//! corpus = "corpus.txt"          # plain file names inside the suite directory
//! prompts = "prompts.jsonl"
//! context_size = 128             # llama-perplexity -c: the corpus needs at least 2 × this many tokens
//! chunks = 16                    # llama-perplexity --chunks: at most this many chunks of context_size tokens
//! time_budget_seconds = 300      # a device that cannot finish within this says so instead of starting
//! seed = 42                      # optional (default 42); golden prompts always sample at temperature 0
//! ```

use serde::{Deserialize, Serialize};

use super::prompts::{self, GoldenPrompt, PromptsError};

/// The suite's own description file, at the top of the suite directory.
pub const SUITE_FILE: &str = "suite.toml";
/// Largest `suite.toml`, in bytes.
pub const MAX_SUITE_TOML_BYTES: usize = 64 << 10;
/// Largest corpus, in bytes: about a million tokens, far more than a device can score within a budget.
pub const MAX_CORPUS_BYTES: usize = 4 << 20;
/// Largest `prompts.jsonl`, in bytes.
pub const MAX_PROMPTS_BYTES: usize = 2 << 20;
/// Largest suite, all three files together: what a registry push or a device pull refuses beyond.
pub const MAX_SUITE_BYTES: u64 = (MAX_SUITE_TOML_BYTES + MAX_CORPUS_BYTES + MAX_PROMPTS_BYTES) as u64;
/// The seed golden prompts are sampled with when `suite.toml` names none.
pub const DEFAULT_SEED: u32 = 42;
/// Bounds of `context_size`.
pub const CONTEXT_SIZES: std::ops::RangeInclusive<u32> = 16..=8_192;
/// Bounds of `chunks`.
pub const CHUNKS: std::ops::RangeInclusive<u32> = 1..=1_024;
/// Bounds of `time_budget_seconds`.
pub const TIME_BUDGETS: std::ops::RangeInclusive<u32> = 1..=3_600;
/// llama-perplexity prints its KL-divergence summary only when at least this many tokens were scored.
pub const MIN_SCORED_TOKENS: u64 = 100;

/// `suite.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteManifest {
    pub name: String,
    pub version: String,
    /// The corpus file's name.
    pub corpus: String,
    /// The golden prompts file's name.
    pub prompts: String,
    /// Tokens per perplexity chunk (`llama-perplexity -c`).
    pub context_size: u32,
    /// Most chunks scored (`--chunks`); fewer when the corpus is shorter.
    pub chunks: u32,
    /// Wall-clock seconds a device may spend on the whole evaluation.
    pub time_budget_seconds: u32,
    /// Seed of the golden prompts' sampler.
    #[serde(default = "default_seed")]
    pub seed: u32,
}

fn default_seed() -> u32 {
    DEFAULT_SEED
}

/// Why a suite is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuiteError {
    #[error("{file} is {len} bytes, over the limit of {max}; an eval suite is kilobytes to a few MB")]
    TooLarge { file: String, len: usize, max: usize },
    #[error("{SUITE_FILE} is not valid: {0}; see the format in alki_shared::eval::suite")]
    Toml(String),
    #[error("{SUITE_FILE} field {field}: {problem}; {fix}")]
    Invalid { field: &'static str, problem: String, fix: String },
    #[error("{file} is not UTF-8 text without NUL bytes; save it as plain UTF-8 text")]
    NotText { file: String },
    #[error(transparent)]
    Prompts(#[from] PromptsError),
}

fn invalid(field: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> SuiteError {
    SuiteError::Invalid { field, problem: problem.into(), fix: fix.into() }
}

impl SuiteManifest {
    /// Reads and validates `suite.toml`.
    pub fn parse(bytes: &[u8]) -> Result<SuiteManifest, SuiteError> {
        if bytes.len() > MAX_SUITE_TOML_BYTES {
            return Err(SuiteError::TooLarge { file: SUITE_FILE.into(), len: bytes.len(), max: MAX_SUITE_TOML_BYTES });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| SuiteError::NotText { file: SUITE_FILE.into() })?;
        let manifest: SuiteManifest = toml::from_str(text).map_err(|e| SuiteError::Toml(e.message().to_owned()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks every field against the format's rules (also for a manifest built in code).
    pub fn validate(&self) -> Result<(), SuiteError> {
        let simple = |s: &str, max: usize| {
            (1..=max).contains(&s.len())
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        };
        if !simple(&self.name, 128) {
            return Err(invalid(
                "name",
                format!("{:?} is not a suite name", self.name),
                "use 1 to 128 characters from a-z, 0-9, '.', '_' and '-'",
            ));
        }
        if self.version.is_empty() || self.version.len() > 64 || self.version.chars().any(char::is_whitespace) {
            return Err(invalid(
                "version",
                format!("{:?} is not a version", self.version),
                "use 1 to 64 characters without spaces",
            ));
        }
        check_file_name("corpus", &self.corpus)?;
        check_file_name("prompts", &self.prompts)?;
        if self.corpus == self.prompts {
            return Err(invalid(
                "prompts",
                "names the same file as corpus",
                "keep the corpus and the prompts in two files",
            ));
        }
        check_range("context_size", self.context_size, &CONTEXT_SIZES, "llama-perplexity's -c")?;
        check_range("chunks", self.chunks, &CHUNKS, "how many chunks of context_size tokens to score")?;
        check_range("time_budget_seconds", self.time_budget_seconds, &TIME_BUDGETS, "the seconds a device may spend")?;
        if self.scored_tokens() < MIN_SCORED_TOKENS {
            let problem = format!(
                "{} chunks of {} tokens score {} tokens, fewer than the {MIN_SCORED_TOKENS} llama-perplexity needs to \
                 print its KL-divergence summary",
                self.chunks,
                self.context_size,
                self.scored_tokens()
            );
            return Err(invalid("chunks", problem, "raise chunks or context_size"));
        }
        Ok(())
    }

    /// Tokens scored per perplexity run: llama-perplexity scores the second half of each chunk
    /// (`c − 1 − ⌊c/2⌋` tokens) so every scored token has context.
    pub fn scored_tokens(&self) -> u64 {
        let c = u64::from(self.context_size);
        u64::from(self.chunks) * (c - 1 - c / 2)
    }

    /// Tokens evaluated per perplexity run, at most (fewer when the corpus is shorter).
    pub fn evaluated_tokens(&self) -> u64 {
        u64::from(self.chunks) * u64::from(self.context_size)
    }
}

fn check_file_name(field: &'static str, name: &str) -> Result<(), SuiteError> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name != SUITE_FILE;
    if plain {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a plain file name"),
            format!("name a file at the top of the suite directory, not {SUITE_FILE}"),
        ))
    }
}

fn check_range(
    field: &'static str,
    value: u32,
    range: &std::ops::RangeInclusive<u32>,
    what: &str,
) -> Result<(), SuiteError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} is outside {}..={}", range.start(), range.end()),
            format!("give {what} within that range"),
        ))
    }
}

/// The three files of a suite, as read by the caller (each at most its cap).
#[derive(Clone, Copy, Debug)]
pub struct SuiteFiles<'a> {
    pub manifest: &'a [u8],
    pub corpus: &'a [u8],
    pub prompts: &'a [u8],
}

/// A validated suite.
#[derive(Clone, Debug, PartialEq)]
pub struct Suite {
    pub manifest: SuiteManifest,
    pub corpus: String,
    pub prompts: Vec<GoldenPrompt>,
}

impl Suite {
    /// Reads and validates a whole suite: the manifest, a text corpus long enough to be worth running, and
    /// every golden prompt with its checks compiled.
    pub fn parse(files: SuiteFiles<'_>) -> Result<Suite, SuiteError> {
        let manifest = SuiteManifest::parse(files.manifest)?;
        let corpus = parse_corpus(&manifest, files.corpus)?;
        if files.prompts.len() > MAX_PROMPTS_BYTES {
            let len = files.prompts.len();
            return Err(SuiteError::TooLarge { file: manifest.prompts, len, max: MAX_PROMPTS_BYTES });
        }
        let prompts = prompts::parse_prompts(files.prompts, MAX_PROMPTS_BYTES)?;
        Ok(Suite { manifest, corpus, prompts })
    }

    /// What running this suite costs, for the budget check before starting.
    pub fn workload(&self, perplexity_runs: u32) -> Workload {
        Workload {
            perplexity_runs,
            tokens_per_run: self.manifest.evaluated_tokens(),
            prompts: self.prompts.len() as u64,
            reply_tokens: self.prompts.iter().map(|p| u64::from(p.max_tokens)).sum(),
        }
    }
}

fn parse_corpus(manifest: &SuiteManifest, bytes: &[u8]) -> Result<String, SuiteError> {
    if bytes.len() > MAX_CORPUS_BYTES {
        return Err(SuiteError::TooLarge { file: manifest.corpus.clone(), len: bytes.len(), max: MAX_CORPUS_BYTES });
    }
    let text = std::str::from_utf8(bytes)
        .ok()
        .filter(|t| !t.contains('\0'))
        .ok_or_else(|| SuiteError::NotText { file: manifest.corpus.clone() })?;
    // Every token but BOS covers at least one byte, so fewer bytes than 2 × context_size cannot tokenize to
    // the 2 × context_size tokens llama-perplexity needs (it would print an error and exit 0).
    let needed = 2 * manifest.context_size as usize;
    if text.len() < needed {
        let problem = format!(
            "{} is {} bytes, so fewer than the {needed} tokens (2 × context_size) llama-perplexity needs",
            manifest.corpus,
            text.len()
        );
        return Err(invalid("corpus", problem, "add text to the corpus or lower context_size"));
    }
    Ok(text.to_owned())
}

/// The work of one evaluation, in tokens: the device turns it into seconds with its measured speeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// llama-perplexity runs: 1 (the candidate against cached base logits, or alone), 2 when the baseline's
    /// logits must be computed first.
    pub perplexity_runs: u32,
    /// Tokens evaluated per run, at most.
    pub tokens_per_run: u64,
    pub prompts: u64,
    /// Tokens generated by the golden prompts, at most.
    pub reply_tokens: u64,
}

impl Workload {
    /// Seconds the evaluation takes at the given prompt-processing and generation speeds (tokens/s), at
    /// most: perplexity is prompt processing, golden replies are generation. Prompt tokens of the golden
    /// prompts are small beside both and left out. An unknown speed (0 or less) gives infinity: no budget
    /// can be promised.
    pub fn estimated_seconds(&self, prompt_tokens_per_second: f64, generation_tokens_per_second: f64) -> f64 {
        let seconds = |tokens: u64, rate: f64| if rate > 0.0 { tokens as f64 / rate } else { f64::INFINITY };
        seconds(u64::from(self.perplexity_runs) * self.tokens_per_run, prompt_tokens_per_second)
            + seconds(self.reply_tokens, generation_tokens_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
name = "smoke"
version = "1"
corpus = "corpus.txt"
prompts = "prompts.jsonl"
context_size = 128
chunks = 16
time_budget_seconds = 300
"#;
    const PROMPTS: &str = r#"{"id":"p1","prompt":"a","max_tokens":8,"checks":[{"contains":"b"}]}
{"id":"p2","messages":[{"role":"user","content":"hi"}],"max_tokens":24,"checks":["chat_template_smoke"]}
"#;

    fn corpus() -> String {
        "The quick brown fox jumps over the lazy dog. ".repeat(20)
    }

    fn with(extra: &str) -> String {
        format!("{MANIFEST}{extra}")
    }

    fn field_of(err: SuiteError) -> &'static str {
        match err {
            SuiteError::Invalid { field, .. } => field,
            other => panic!("expected an invalid field, got {other}"),
        }
    }

    #[test]
    fn reads_a_whole_suite() {
        let corpus = corpus();
        let suite = Suite::parse(SuiteFiles {
            manifest: MANIFEST.as_bytes(),
            corpus: corpus.as_bytes(),
            prompts: PROMPTS.as_bytes(),
        })
        .expect("valid suite");
        assert_eq!(suite.manifest.seed, DEFAULT_SEED);
        assert_eq!((suite.manifest.scored_tokens(), suite.manifest.evaluated_tokens()), (16 * 63, 16 * 128));
        assert_eq!(suite.prompts.len(), 2);
        let work = suite.workload(2);
        assert_eq!(work, Workload { perplexity_runs: 2, tokens_per_run: 2048, prompts: 2, reply_tokens: 32 });
        assert_eq!(work.estimated_seconds(1024.0, 16.0), 4.0 + 2.0);
        assert_eq!(work.estimated_seconds(0.0, 16.0), f64::INFINITY);
        assert_eq!(SuiteManifest::parse(with("seed = 7").as_bytes()).expect("seed").seed, 7);
    }

    #[test]
    fn bad_fields_are_named_with_the_fix() {
        let cases = [
            (MANIFEST.replace("\"smoke\"", "\"Smoke Suite\""), "name"),
            (MANIFEST.replace("version = \"1\"", "version = \"\""), "version"),
            (MANIFEST.replace("\"corpus.txt\"", "\"../corpus.txt\""), "corpus"),
            (MANIFEST.replace("\"corpus.txt\"", "\"suite.toml\""), "corpus"),
            (MANIFEST.replace("\"prompts.jsonl\"", "\"corpus.txt\""), "prompts"),
            (MANIFEST.replace("context_size = 128", "context_size = 8"), "context_size"),
            (MANIFEST.replace("chunks = 16", "chunks = 0"), "chunks"),
            // One chunk of 128 tokens scores 63: too few for the KL-divergence summary.
            (MANIFEST.replace("chunks = 16", "chunks = 1"), "chunks"),
            (MANIFEST.replace("time_budget_seconds = 300", "time_budget_seconds = 0"), "time_budget_seconds"),
        ];
        for (text, field) in cases {
            let err = SuiteManifest::parse(text.as_bytes()).expect_err(field);
            let message = err.to_string();
            assert_eq!(field_of(err), field, "{message}");
            assert!(message.starts_with(&format!("suite.toml field {field}: ")), "{message}");
        }
    }

    #[test]
    fn unknown_missing_and_mistyped_keys_are_refused() {
        for text in [
            with("temperature = 0.7"),
            MANIFEST.replace("chunks = 16", ""),
            MANIFEST.replace("16", "\"16\""),
            "[".into(),
        ] {
            let err = SuiteManifest::parse(text.as_bytes()).expect_err(&text);
            assert!(matches!(err, SuiteError::Toml(_)), "{err}");
        }
        let err = SuiteManifest::parse(with("temperature = 0.7").as_bytes()).expect_err("unknown");
        assert!(err.to_string().contains("temperature"), "{err}");
    }

    #[test]
    fn oversized_or_unreadable_files_are_refused() {
        let big = vec![b'#'; MAX_SUITE_TOML_BYTES + 1];
        assert!(matches!(SuiteManifest::parse(&big), Err(SuiteError::TooLarge { .. })));
        assert!(matches!(SuiteManifest::parse(b"name = \"\xff\""), Err(SuiteError::NotText { .. })));
        fn files(corpus: &[u8], prompts: &[u8]) -> Result<(), String> {
            let manifest = MANIFEST.as_bytes();
            Suite::parse(SuiteFiles { manifest, corpus, prompts }).map(|_| ()).map_err(|e| e.to_string())
        }
        let corpus = corpus();
        let huge = vec![b'a'; MAX_CORPUS_BYTES + 1];
        assert!(files(&huge, PROMPTS.as_bytes()).expect_err("corpus cap").starts_with("corpus.txt is"));
        assert!(files(b"a\0b", PROMPTS.as_bytes()).expect_err("NUL").contains("not UTF-8 text"));
        let short = files(b"too short", PROMPTS.as_bytes()).expect_err("short");
        assert!(short.contains("fewer than the 256 tokens"), "{short}");
        let bad_prompt = files(corpus.as_bytes(), b"{}").expect_err("bad prompt");
        assert!(bad_prompt.starts_with("prompts file line 1"), "{bad_prompt}");
        let huge_prompts = vec![b' '; MAX_PROMPTS_BYTES + 1];
        assert!(files(corpus.as_bytes(), &huge_prompts).expect_err("prompts cap").starts_with("prompts.jsonl is"));
    }
}
