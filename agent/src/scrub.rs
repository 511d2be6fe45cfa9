//! Re-hashing the content store: on demand (`alkictl devices reverify`, the Reverify command) and in the
//! background at a low rate. Both hash every blob whatever its seal says, since silent media corruption
//! keeps a file's inode, size and mtime (the seal only catches changes made through the file system), and
//! remove a blob that no longer matches its digest, so the next activation fetches it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alki_shared::digest::{Digest, Hasher};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Semaphore, watch};

use crate::metrics::AgentMetrics;
use crate::store::ContentStore;

/// Bytes read per step while hashing.
const PIECE: usize = 1 << 20;
/// When the last complete background pass ended (unix seconds), so a restart does not start one afresh.
const LAST_PASS_FILE: &str = "scrub-last";

/// What one pass found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub checked: u64,
    pub corrupt: u64,
    pub removed: u64,
    pub corrupt_digests: Vec<String>,
}

/// Runs passes over one content store, one at a time (a reverify waits for a background pass's current
/// blob, never for the whole pass).
#[derive(Clone)]
pub struct Scrubber {
    store: ContentStore,
    metrics: Arc<AgentMetrics>,
    /// One hashing job at a time: a permit, not a lock on data.
    slot: Arc<Semaphore>,
    /// One reverify at a time; another asked meanwhile is refused rather than queued.
    reverifying: Arc<Semaphore>,
}

impl Scrubber {
    pub fn new(store: ContentStore, metrics: Arc<AgentMetrics>) -> Scrubber {
        Scrubber { store, metrics, slot: Arc::new(Semaphore::new(1)), reverifying: Arc::new(Semaphore::new(1)) }
    }

    /// Hashes every blob now at full speed; corrupt ones are removed.
    pub async fn reverify(&self) -> Result<ScrubReport, String> {
        let Ok(_running) = self.reverifying.try_acquire() else {
            return Err("a reverify is already running on this device; its result comes first".into());
        };
        let blobs = self.store.list().await.map_err(|e| e.to_string())?;
        let mut report = ScrubReport::default();
        for blob in blobs {
            self.check(&blob.digest, None, &mut report).await;
        }
        tracing::info!(
            checked = report.checked,
            corrupt = report.corrupt,
            removed = report.removed,
            "Reverified the content store."
        );
        Ok(report)
    }

    /// Hashes one blob (paced to `rate` bytes/s when given) and removes it when it does not match. A blob
    /// gone meanwhile (evicted) is neither checked nor corrupt.
    async fn check(&self, digest: &Digest, rate: Option<u64>, report: &mut ScrubReport) {
        let Ok(_permit) = self.slot.acquire().await else { return };
        let path = self.store.path(digest);
        let actual = match hash_paced(&path, rate).await {
            Ok(actual) => actual,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(blob = %digest, error = %e, "Cannot read a stored blob to check it.");
                return;
            }
        };
        report.checked += 1;
        let mut removed = 0;
        if &actual != digest {
            report.corrupt += 1;
            report.corrupt_digests.push(digest.to_string());
            tracing::error!(blob = %digest, found = %actual, "A stored blob is corrupt (its bytes changed under an unchanged file); removing it.");
            match self.store.remove(digest).await {
                Ok(()) => {
                    report.removed += 1;
                    removed = 1;
                }
                Err(e) => tracing::error!(blob = %digest, error = %e, "Cannot remove a corrupt blob."),
            }
        }
        self.metrics.scrubbed(1, u64::from(&actual != digest), removed);
    }

    /// The background scrub: a pass every `interval` (the first one `interval` after the last pass that
    /// ended, as recorded in the data dir), each blob hashed at `rate` bytes/s, until `stop`.
    pub async fn run(self, data_dir: PathBuf, rate: u64, interval: Duration, mut stop: watch::Receiver<bool>) {
        let marker = data_dir.join(LAST_PASS_FILE);
        loop {
            let wait = until_next_pass(&marker, interval).await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let mut report = ScrubReport::default();
            let blobs = self.store.list().await.unwrap_or_default();
            for blob in blobs {
                tokio::select! {
                    _ = self.check(&blob.digest, Some(rate), &mut report) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            tracing::info!(checked = report.checked, corrupt = report.corrupt, "Content-store scrub pass done.");
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let _ = tokio::fs::write(&marker, format!("{now}\n")).await;
        }
    }
}

/// How long until the next pass: `interval` after the last recorded one (none recorded: a full interval,
/// since blobs were verified when they were written).
async fn until_next_pass(marker: &Path, interval: Duration) -> Duration {
    let last = tokio::fs::read_to_string(marker).await.ok().and_then(|t| t.trim().parse::<u64>().ok());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match last {
        Some(last) => interval.saturating_sub(Duration::from_secs(now.saturating_sub(last))),
        None => {
            let _ = tokio::fs::write(marker, format!("{now}\n")).await;
            interval
        }
    }
}

/// The file's digest, read in pieces, pausing between them to stay at `rate` bytes/s when given.
async fn hash_paced(path: &Path, rate: Option<u64>) -> std::io::Result<Digest> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; PIECE];
    let mut hasher = Hasher::new();
    let started = tokio::time::Instant::now();
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = started + Duration::from_secs_f64(hasher.len() as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_corrupted_in_place_with_its_mtime_restored_is_found_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("store");
        let good = Digest::of(b"good bytes");
        let bad = Digest::of(b"will rot");
        store.write_bytes(&good, b"good bytes").await.expect("write");
        store.write_bytes(&bad, b"will rot").await.expect("write");
        assert!(store.verified(&bad, 8).await.expect("verified"), "sealed as verified");
        let path = store.path(&bad);
        let mtime = std::fs::metadata(&path).expect("meta").modified().expect("mtime");
        std::fs::write(&path, b"wilL rot").expect("flip a bit, same size");
        std::fs::File::options().write(true).open(&path).expect("open").set_modified(mtime).expect("restore mtime");

        let scrubber = Scrubber::new(store.clone(), Arc::default());
        let report = scrubber.reverify().await.expect("reverify");
        assert_eq!((report.checked, report.corrupt, report.removed), (2, 1, 1));
        assert_eq!(report.corrupt_digests, vec![bad.to_string()]);
        assert!(!store.contains(&bad).await && store.contains(&good).await);
    }
}
