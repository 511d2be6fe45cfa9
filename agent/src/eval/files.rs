//! The evaluation files in the data directory: `evaluations.json` (the newest reports, for people and for a
//! controller that missed some) and `evaluated.json` (which variant × suite × baseline were evaluated after
//! an activation, so a reconnect or a restart does not evaluate them again). Both bounded, replaced
//! atomically; a corrupt file is reported and started again (it only holds results the next run replaces).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use alki_shared::digest::Digest;
use alki_shared::eval::quality::QualityResult;
use alki_shared::eval::wire;
use alki_shared::proto;
use serde::{Deserialize, Serialize};

/// The reports file in the data directory.
pub const EVALUATIONS_FILE: &str = "evaluations.json";
/// Reports kept in it (the newest win).
pub const EVALUATIONS_KEPT: usize = 64;
/// The file of evaluations done after activations.
pub const DONE_FILE: &str = "evaluated.json";
/// Keys kept in it (the newest win): far more than a device's distinct rollouts between restarts.
pub const DONE_KEPT: usize = 256;

/// An eval report as the device keeps it: the result in `alki_shared::eval::quality`'s form, whose JSON keeps
/// a NaN a model computed (the protobuf messages' JSON cannot read one back).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredReport {
    #[serde(default)]
    pub command_id: String,
    #[serde(default)]
    pub rollout_id: String,
    pub bundle: Option<proto::BundleRef>,
    pub suite: Option<proto::BundleRef>,
    pub baseline: Option<proto::BundleRef>,
    /// None for a refusal that could not name a variant or a suite (`refused` says why).
    pub result: Option<QualityResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    pub at_unix_ms: i64,
}

impl StoredReport {
    pub fn of(report: &proto::EvalReport) -> StoredReport {
        let result = report.result.as_ref().map(wire::from_proto);
        let refused = match (&result, report.result.as_ref().and_then(|r| r.outcome.as_ref())) {
            (Some(Ok(_)), _) => None,
            (_, Some(proto::quality_result::Outcome::CouldNotRun(c))) => Some(c.problem.clone()),
            _ => Some("the report holds no readable result".to_owned()),
        };
        StoredReport {
            command_id: report.command_id.clone(),
            rollout_id: report.rollout_id.clone(),
            bundle: report.bundle.clone(),
            suite: report.suite.clone(),
            baseline: report.baseline.clone(),
            result: result.and_then(Result::ok),
            refused,
            at_unix_ms: report.at_unix_ms,
        }
    }
}

/// `<data_dir>/evaluations.json`: the newest [`EVALUATIONS_KEPT`] eval reports, oldest first.
#[derive(Clone, Debug)]
pub struct EvaluationsFile {
    path: PathBuf,
}

impl EvaluationsFile {
    pub fn new(data_dir: &Path) -> EvaluationsFile {
        EvaluationsFile { path: data_dir.join(EVALUATIONS_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored reports; empty when there are none or the file is unreadable.
    pub fn load(&self) -> Vec<StoredReport> {
        read_json(&self.path, "evaluations")
    }

    /// Appends `report`, keeping the newest. Blocking.
    pub fn append(&self, report: &proto::EvalReport) -> std::io::Result<()> {
        let mut all = self.load();
        all.push(StoredReport::of(report));
        all.drain(..all.len().saturating_sub(EVALUATIONS_KEPT));
        write_json(&self.path, &all)
    }

    pub async fn append_async(&self, report: proto::EvalReport) {
        let file = self.clone();
        if !matches!(tokio::task::spawn_blocking(move || file.append(&report)).await, Ok(Ok(()))) {
            tracing::warn!(file = %self.path.display(), "Cannot store the evaluation report.");
        }
    }
}

/// What an evaluation after an activation is remembered by: candidate variant, suite and baseline variant.
pub fn done_key(variant: &Digest, suite: &Digest, baseline: Option<&Digest>) -> String {
    format!("{variant} {suite} {}", baseline.map(Digest::as_str).unwrap_or("-"))
}

/// `<data_dir>/evaluated.json`: keys ([`done_key`]) of evaluations done after activations, oldest first.
#[derive(Clone, Debug)]
pub struct DoneFile {
    path: PathBuf,
}

impl DoneFile {
    pub fn new(data_dir: &Path) -> DoneFile {
        DoneFile { path: data_dir.join(DONE_FILE) }
    }

    pub async fn contains(&self, key: &str) -> bool {
        let path = self.path.clone();
        let keys = tokio::task::spawn_blocking(move || read_json::<String>(&path, "evaluated")).await;
        keys.is_ok_and(|keys| keys.iter().any(|k| k == key))
    }

    /// Remembers `key`, keeping the newest [`DONE_KEPT`].
    pub async fn insert(&self, key: String) {
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut keys: VecDeque<String> = read_json(&path, "evaluated").into();
            keys.retain(|k| *k != key);
            keys.push_back(key);
            while keys.len() > DONE_KEPT {
                keys.pop_front();
            }
            write_json(&path, &keys)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(file = %self.path.display(), "Cannot record the evaluation as done; a restart may run it again.");
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Vec<T> {
    let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!(file = %path.display(), error = %e, "The {what} file is unreadable; starting it again.");
        Vec::new()
    })
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    alki_shared::fsutil::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reports_file_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = EvaluationsFile::new(dir.path());
        for i in 0..(EVALUATIONS_KEPT + 2) {
            file.append(&proto::EvalReport { at_unix_ms: i as i64, ..Default::default() }).expect("append");
        }
        let all = file.load();
        assert_eq!((all.len(), all[0].at_unix_ms), (EVALUATIONS_KEPT, 2));
        assert_eq!(all[0].refused.as_deref(), Some("the report holds no readable result"));
        std::fs::write(file.path(), b"[{").expect("corrupt");
        assert!(file.load().is_empty());
    }

    #[test]
    fn a_result_with_nan_survives_the_file() {
        use alki_shared::eval::perplexity::{Estimate, PerplexitySettings};
        use alki_shared::eval::quality::{EvalSettings, GoldenSummary, Measurement, Outcome};
        let dir = tempfile::tempdir().expect("tempdir");
        let file = EvaluationsFile::new(dir.path());
        let result = QualityResult {
            suite: Digest::of(b"suite"),
            candidate: Digest::of(b"b"),
            baseline: None,
            outcome: Outcome::Measured(Measurement {
                perplexity: Some(Estimate { value: 31.5, uncertainty: f64::NAN }),
                kl_divergence: None,
                golden: GoldenSummary::new(0, Vec::new()),
                build: "llama.cpp test".into(),
                settings: EvalSettings {
                    perplexity: PerplexitySettings { context_size: 128, chunks: 16, threads: 0, gpu_layers: 0 },
                    seed: 42,
                },
                duration_ms: 5,
            }),
        };
        let report =
            proto::EvalReport { command_id: "c".into(), result: Some(wire::to_proto(&result)), ..Default::default() };
        file.append(&report).expect("append");
        file.append(&report).expect("append again: the file reads back");
        let all = file.load();
        assert_eq!(all.len(), 2);
        let Some(Outcome::Measured(m)) = all[1].result.as_ref().map(|r| &r.outcome) else { panic!("measured") };
        assert!(m.perplexity.expect("ppl").uncertainty.is_nan());
    }

    #[tokio::test]
    async fn done_evaluations_are_remembered_across_restarts_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, s) = (Digest::of(b"variant"), Digest::of(b"suite"));
        let key = done_key(&a, &s, None);
        assert!(!DoneFile::new(dir.path()).contains(&key).await);
        DoneFile::new(dir.path()).insert(key.clone()).await;
        assert!(DoneFile::new(dir.path()).contains(&key).await, "a new agent reads it back");
        assert!(!DoneFile::new(dir.path()).contains(&done_key(&a, &s, Some(&a))).await, "another baseline");
        for i in 0..DONE_KEPT {
            DoneFile::new(dir.path()).insert(format!("k{i}")).await;
        }
        assert!(!DoneFile::new(dir.path()).contains(&key).await, "the oldest gives way");
        assert!(DoneFile::new(dir.path()).contains(&format!("k{}", DONE_KEPT - 1)).await);
    }
}
