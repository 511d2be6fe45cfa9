//! The evaluation files in the data directory: `evaluations.json` (the newest reports, for people and for a
//! controller that missed some) and `evaluated.json` (which variant × suite × baseline were evaluated after
//! an activation, so a reconnect or a restart does not evaluate them again). Both bounded, replaced
//! atomically; a corrupt file is reported and started again (it only holds results the next run replaces).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use alki_shared::digest::Digest;
use alki_shared::proto;

/// The reports file in the data directory.
pub const EVALUATIONS_FILE: &str = "evaluations.json";
/// Reports kept in it (the newest win).
pub const EVALUATIONS_KEPT: usize = 64;
/// The file of evaluations done after activations.
pub const DONE_FILE: &str = "evaluated.json";
/// Keys kept in it (the newest win): far more than a device's distinct rollouts between restarts.
pub const DONE_KEPT: usize = 256;

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
    pub fn load(&self) -> Vec<proto::EvalReport> {
        read_json(&self.path, "evaluations")
    }

    /// Appends `report`, keeping the newest. Blocking.
    pub fn append(&self, report: proto::EvalReport) -> std::io::Result<()> {
        let mut all = self.load();
        all.push(report);
        all.drain(..all.len().saturating_sub(EVALUATIONS_KEPT));
        write_json(&self.path, &all)
    }

    pub async fn append_async(&self, report: proto::EvalReport) {
        let file = self.clone();
        if !matches!(tokio::task::spawn_blocking(move || file.append(report)).await, Ok(Ok(()))) {
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
            file.append(proto::EvalReport { at_unix_ms: i as i64, ..Default::default() }).expect("append");
        }
        let all = file.load();
        assert_eq!((all.len(), all[0].at_unix_ms), (EVALUATIONS_KEPT, 2));
        std::fs::write(file.path(), b"[{").expect("corrupt");
        assert!(file.load().is_empty());
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
