//! llama-perplexity runs of an evaluation: at a low CPU priority, killed when the agent dies or the deadline
//! passes, output kept bounded and read with `alki_shared::eval::perplexity` (which tells apart the failures
//! the exit code hides). A run that lost the end of its output (a real flake of the tool) runs once more.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;

use alki_shared::eval::perplexity::{
    KlDivergence, Perplexity, PerplexitySettings, ToolError, parse_kl_divergence, parse_perplexity,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::tool::Tool;
use crate::runtime::priority::{Priority, lower};

/// Bytes kept of each output stream; the rest is read and dropped (a 1,024-chunk run prints ~200 KB).
pub const MAX_OUTPUT_BYTES: usize = 4 << 20;
/// Runs of one measurement when the tool's output keeps losing its end.
const RUNS_IF_CUT: u32 = 3;
/// Characters of the output quoted when the tool exits with an error.
const TAIL_CHARS: usize = 400;

/// Why a run gave no result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run {}: {source}; check the llama.cpp build", tool.display())]
    Spawn { tool: std::path::PathBuf, source: std::io::Error },
    /// The deadline passed; the process was killed.
    #[error("llama-perplexity did not finish before the deadline")]
    OutOfTime,
    #[error("llama-perplexity exited with {status}: {tail}")]
    Exited { status: String, tail: String },
    #[error(transparent)]
    Tool(#[from] ToolError),
}

impl RunError {
    /// The tool's output was cut before its result (a flake seen on the real tool): worth one more run.
    fn lost_its_tail(&self) -> bool {
        matches!(self, RunError::Tool(ToolError::MissingEstimate(_) | ToolError::MissingSummary(_)))
    }
}

/// How runs are made: which tool, at what priority, until when.
#[derive(Clone, Copy, Debug)]
pub struct Runner<'a> {
    pub tool: &'a Tool,
    pub priority: Priority,
    pub deadline: Instant,
}

/// What a finished run printed.
struct Output {
    stdout: String,
    stderr: String,
}

impl Runner<'_> {
    /// A plain run: the model's perplexity on `corpus`.
    pub async fn perplexity(
        &self,
        settings: &PerplexitySettings,
        model: &Path,
        corpus: &Path,
    ) -> Result<Perplexity, RunError> {
        let args = settings.perplexity_args(model, corpus, None);
        self.twice_if_cut(&args, |o| parse_perplexity(&o.stdout, &o.stderr)).await
    }

    /// A KL-divergence run of `model` against the baseline's logits in `base`.
    pub async fn kl_divergence(
        &self,
        settings: &PerplexitySettings,
        model: &Path,
        base: &Path,
    ) -> Result<KlDivergence, RunError> {
        let args = settings.kl_divergence_args(model, base);
        self.twice_if_cut(&args, |o| parse_kl_divergence(&o.stdout, &o.stderr)).await
    }

    /// The baseline's run, writing its logits to `out`. Only the file matters (the caller validates it); an
    /// output that lost its final estimate is no failure here.
    pub async fn base_logits(
        &self,
        settings: &PerplexitySettings,
        model: &Path,
        corpus: &Path,
        out: &Path,
    ) -> Result<(), RunError> {
        let output = self.run(&settings.perplexity_args(model, corpus, Some(out))).await?;
        match parse_perplexity(&output.stdout, &output.stderr) {
            Ok(_) | Err(ToolError::MissingEstimate(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs with `args` and reads the result; a run whose output lost its end is run again, at most
    /// [`RUNS_IF_CUT`] runs in all. The tool logs through a thread it never flushes at exit
    /// (llama.cpp's `common_log_main` is leaked on purpose), so under load its last lines, the summary
    /// among them, can be lost from a run that succeeded.
    async fn twice_if_cut<T>(
        &self,
        args: &[OsString],
        read: impl Fn(&Output) -> Result<T, ToolError>,
    ) -> Result<T, RunError> {
        let mut runs = 1;
        loop {
            match read(&self.run(args).await?).map_err(RunError::from) {
                Err(e) if e.lost_its_tail() && runs < RUNS_IF_CUT => {
                    runs += 1;
                    tracing::warn!(error = %e, run = runs, "llama-perplexity's output lost its end; running it again.");
                }
                other => return other,
            }
        }
    }

    /// One run to its end, or killed at the deadline.
    async fn run(&self, args: &[OsString]) -> Result<Output, RunError> {
        let mut command = self.tool.command();
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        crate::runtime::instance::die_with_parent(&mut command);
        lower(&mut command, self.priority);
        let spawn_error = |source| RunError::Spawn { tool: self.tool.path.clone(), source };
        let mut child = command.spawn().map_err(spawn_error)?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let finished = async {
            let (out, err, status) = tokio::join!(bounded(stdout), bounded(stderr), child.wait());
            (out, err, status)
        };
        // On the deadline `finished` is dropped, and with it the child: kill_on_drop sends SIGKILL.
        let (stdout, stderr, status) =
            tokio::time::timeout_at(self.deadline, finished).await.map_err(|_| RunError::OutOfTime)?;
        let status = status.map_err(spawn_error)?;
        if !status.success() {
            let tail: String = stderr.chars().rev().take(TAIL_CHARS).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(RunError::Exited { status: status.to_string(), tail: tail.trim().to_owned() });
        }
        Ok(Output { stdout, stderr })
    }
}

/// A stream read to its end, its first [`MAX_OUTPUT_BYTES`] kept (the rest drained so the tool never blocks).
async fn bounded(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else { return String::new() };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_OUTPUT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    /// A stand-in tool: a shell script (fault injection only; the real tool runs in tests/eval_real_llama.rs).
    fn script(dir: &Path, body: &str) -> Tool {
        let path = dir.join("llama-perplexity");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Tool { path, library_dir: None, build: "test".into() }
    }

    fn settings() -> PerplexitySettings {
        PerplexitySettings { context_size: 128, chunks: 4, threads: 0, gpu_layers: 0 }
    }

    #[tokio::test]
    async fn a_run_past_its_deadline_is_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tool = script(dir.path(), "sleep 30");
        let runner =
            Runner { tool: &tool, priority: Priority::Normal, deadline: Instant::now() + Duration::from_millis(300) };
        let started = std::time::Instant::now();
        let err = runner.perplexity(&settings(), Path::new("m.gguf"), Path::new("c.txt")).await.expect_err("killed");
        assert!(matches!(err, RunError::OutOfTime), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "not waited for");
    }

    #[tokio::test]
    async fn a_cut_output_is_run_once_more_and_failures_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The first run loses its tail, the second prints the estimate.
        let marker = dir.path().join("ran-once");
        let body = format!(
            "if [ -e {m} ]; then echo 'Final estimate: PPL = 12.5 +/- 0.25' >&2; else touch {m}; echo '[1]12.0,' ; fi",
            m = marker.display()
        );
        let tool = script(dir.path(), &body);
        let runner =
            Runner { tool: &tool, priority: Priority::Normal, deadline: Instant::now() + Duration::from_secs(20) };
        let ppl = runner.perplexity(&settings(), Path::new("m.gguf"), Path::new("c.txt")).await.expect("second run");
        assert_eq!(ppl.ppl.value, 12.5);

        // A tool that always loses its tail is run RUNS_IF_CUT times, then the cut is the answer.
        let runs = dir.path().join("runs");
        let always_cut = script(dir.path(), &format!("echo run >> {}; echo '[1]12.0,'", runs.display()));
        let cut = Runner { tool: &always_cut, ..runner };
        let err = cut.perplexity(&settings(), Path::new("m.gguf"), Path::new("c.txt")).await.expect_err("cut");
        assert!(matches!(err, RunError::Tool(ToolError::MissingEstimate(_))), "{err}");
        let count = std::fs::read_to_string(&runs).expect("runs").lines().count();
        assert_eq!(count, RUNS_IF_CUT as usize);

        let short = script(dir.path(), "echo 'perplexity: you need at least 256 tokens for a context of 128' >&2");
        let runner = Runner { tool: &short, ..runner };
        let err = runner.perplexity(&settings(), Path::new("m.gguf"), Path::new("c.txt")).await.expect_err("short");
        assert!(matches!(err, RunError::Tool(ToolError::NotEnoughTokens { needed: 256, .. })), "{err}");

        let broken = script(dir.path(), "echo 'error: failed to load model' >&2; exit 1");
        let runner = Runner { tool: &broken, ..runner };
        let err = runner.perplexity(&settings(), Path::new("m.gguf"), Path::new("c.txt")).await.expect_err("exit 1");
        assert!(err.to_string().contains("failed to load model"), "{err}");
    }
}
