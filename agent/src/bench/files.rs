//! The benchmark files in the data directory: the device's results (`benchmarks.json`, the newest kept) and
//! what the running agent serves (`serving.json`, kept up to date on every switch), so `alki-agent bench` in
//! another process finds both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alki_shared::proto;
use tokio::sync::watch;

use super::result::{Subject, Target};
use crate::runtime::Proxy;
use crate::state::Snapshot;

/// Results kept in the results file (the newest win).
pub const RESULTS_KEPT: usize = 64;
/// The results file in the data directory.
pub const RESULTS_FILE: &str = "benchmarks.json";
/// What the agent serves now, for `alki-agent bench` in another process.
pub const SERVING_FILE: &str = "serving.json";

/// The device's benchmark results, newest last, in `<data_dir>/benchmarks.json` (replaced atomically).
#[derive(Clone, Debug)]
pub struct ResultsFile {
    path: PathBuf,
}

impl ResultsFile {
    pub fn new(data_dir: &Path) -> ResultsFile {
        ResultsFile { path: data_dir.join(RESULTS_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored results; empty when there are none. A corrupt file is reported and treated as empty (it
    /// only holds measurements, which the next benchmark replaces).
    pub fn load(&self) -> Vec<proto::BenchmarkResult> {
        let Ok(bytes) = std::fs::read(&self.path) else { return Vec::new() };
        match serde_json::from_slice(&bytes) {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "The benchmark results file is unreadable; starting it again.");
                Vec::new()
            }
        }
    }

    /// Appends `results`, keeping the newest [`RESULTS_KEPT`]. Blocking.
    pub fn append(&self, results: &[proto::BenchmarkResult]) -> std::io::Result<()> {
        let mut all = self.load();
        all.extend_from_slice(results);
        let excess = all.len().saturating_sub(RESULTS_KEPT);
        all.drain(..excess);
        let bytes = serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?;
        alki_shared::fsutil::write_atomic(&self.path, &bytes)
    }

    pub async fn append_async(&self, results: Vec<proto::BenchmarkResult>) {
        let file = self.clone();
        let outcome = tokio::task::spawn_blocking(move || file.append(&results)).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(file = %self.path.display(), error = %e, "Cannot store benchmark results."),
            Err(e) => tracing::warn!(error = %e, "Storing benchmark results failed."),
        }
    }
}

/// The serving instance as the running agent describes it in `<data_dir>/serving.json`, so that
/// `alki-agent bench` can benchmark it from another process.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Serving {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub load_ms: Option<f64>,
    pub bundle: Option<proto::BundleRef>,
    pub variant_digest: String,
    pub model_path: Option<PathBuf>,
}

impl Serving {
    /// What the proxy serves now, described with the device loop's snapshot when they agree.
    pub fn of(proxy: &Proxy, snapshot: &Snapshot) -> Option<Serving> {
        let upstream = proxy.current()?;
        let Subject { bundle, variant_digest, model_path, .. } = Subject::serving(&upstream, snapshot);
        let Target { addr, pid, load_time } = Target::upstream(&upstream);
        Some(Serving {
            addr,
            pid,
            load_ms: load_time.map(|d| d.as_secs_f64() * 1000.0),
            bundle,
            variant_digest,
            model_path,
        })
    }

    /// The served instance as a benchmark target.
    pub fn target(&self) -> Target {
        let load_time = self.load_ms.map(|ms| std::time::Duration::from_secs_f64(ms.max(0.0) / 1000.0));
        Target { addr: self.addr, pid: self.pid, load_time }
    }

    pub fn subject(&self) -> Subject {
        Subject {
            bundle: self.bundle.clone(),
            variant_digest: self.variant_digest.clone(),
            variant_name: String::new(),
            model_path: self.model_path.clone(),
        }
    }
}

/// `<data_dir>/serving.json`, replaced atomically on every switch of the front proxy; absent when nothing
/// is served.
#[derive(Clone, Debug)]
pub struct ServingFile {
    path: PathBuf,
}

impl ServingFile {
    pub fn new(data_dir: &Path) -> ServingFile {
        ServingFile { path: data_dir.join(SERVING_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Option<Serving> {
        serde_json::from_slice(&std::fs::read(&self.path).ok()?).ok()
    }

    async fn store(&self, serving: Option<Serving>) {
        let path = self.path.clone();
        let outcome = tokio::task::spawn_blocking(move || match serving {
            Some(s) => {
                let bytes = serde_json::to_vec_pretty(&s).map_err(std::io::Error::other)?;
                alki_shared::fsutil::write_atomic(&path, &bytes)
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        })
        .await;
        if let Ok(Err(e)) = outcome {
            tracing::warn!(file = %self.path.display(), error = %e, "Cannot record the serving instance.");
        }
    }
}

/// Rewrites the serving file whenever the proxy switches or the device loop publishes, until `shutdown`;
/// removes it at the end (nothing is served after the agent stops).
pub async fn record_serving(
    proxy: Arc<Proxy>,
    mut snapshot: watch::Receiver<Snapshot>,
    file: ServingFile,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut switched = proxy.subscribe();
    let mut last = None;
    loop {
        let now = Serving::of(&proxy, &snapshot.borrow_and_update());
        switched.borrow_and_update();
        if now != last {
            file.store(now.clone()).await;
            last = now;
        }
        tokio::select! {
            Ok(()) = switched.changed() => {}
            Ok(()) = snapshot.changed() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    file.store(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_results_file_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = ResultsFile::new(dir.path());
        assert!(file.load().is_empty());
        for i in 0..(RESULTS_KEPT + 3) {
            let r = proto::BenchmarkResult { at_unix_ms: i as i64, ..Default::default() };
            file.append(&[r]).expect("append");
        }
        let all = file.load();
        assert_eq!(all.len(), RESULTS_KEPT);
        assert_eq!(all[0].at_unix_ms, 3);
        std::fs::write(file.path(), b"{not json").expect("corrupt");
        assert!(file.load().is_empty(), "a corrupt file is started again");
    }
}
