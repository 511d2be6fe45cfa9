//! Quality evaluation on the device: a candidate model judged with an eval suite (perplexity, KL divergence
//! and top-1 agreement against a baseline, golden prompts) on the llama.cpp build it runs on, beside what is
//! served and never disturbing it.
//!
//! From the bottom up: `suite` (acquiring a suite through the pull layer: signature first, sizes before any
//! download), `tool` (the build's `llama-perplexity` and which build that is), `perplexity` (running it at a
//! low priority within a deadline, output bounded and parsed), `vocab` (what a GGUF says about its tokens),
//! `logits` (the baseline logits cache in the content store), `golden` (golden prompts through a loopback
//! llama-server), `measure` (one measurement of resolved models, and its budget), `subject` (a bundle
//! variant resolved, fit-checked and acquired), `run` (one evaluation of bundles, from request to
//! [`alki_shared::eval::quality::QualityResult`]), `files` (`evaluations.json`, `evaluated.json`), `jobs`
//! (the queue, its one-at-a-time task and the three triggers), `gap` (an activation's evaluation in its
//! stop-then-start gap, when it does not fit beside the candidate) and `cli` (`alki-agent eval`).

pub mod cli;
pub mod files;
pub mod gap;
pub mod golden;
pub mod jobs;
pub mod logits;
pub mod measure;
pub mod perplexity;
pub mod run;
pub mod subject;
pub mod suite;
pub mod tool;
pub mod vocab;

pub use cli::{run_cli, table};
pub use gap::{GapEvaluation, GapEvaluator};
pub use jobs::{Evaluator, Job, Jobs, QUEUE, Reporter};
pub use run::{Env, Request};
