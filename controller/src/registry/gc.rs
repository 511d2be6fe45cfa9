//! Garbage collection of unreferenced blobs: mark and sweep with a grace period, safe against pushes
//! running at the same time, on a schedule ([`Registry::run_gc_schedule`]) or on request
//! (`POST /api/v1/registry/gc`, which `alkictl registry gc` calls).
//!
//! A blob is garbage when no manifest of any repository references it and it is not a manifest itself.
//! Mark: one read transaction lists such digests. Sweep: in batches, under the files lock that orders
//! every blob link and manifest store, one write transaction re-checks each candidate and unlinks it from
//! every repository; its file is deleted after the commit (a crash in between leaves an unlinked file,
//! which the next collection deletes). Never swept: a blob linked, mounted or read within the grace
//! period, a blob linked in a repository with an upload in flight, and upload temporaries (their own
//! expiry deletes those). The worst a collection can do to a push that outlasts the grace period is make
//! its manifest PUT fail with MANIFEST_BLOB_UNKNOWN; a stored manifest never loses a blob.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use alki_shared::digest::Digest;
use alki_shared::gc::GcReport;
use tokio_util::sync::CancellationToken;

use super::index::Link;
use super::{Registry, RegistryError};

/// Candidates re-checked and unlinked per write transaction (and per hold of the files lock).
const SWEEP_BATCH: usize = 128;
/// Recently read blobs remembered at most (each entry is a digest and a timestamp, about 100 bytes).
const MAX_TOUCHED: usize = 100_000;

/// Counts a single-request upload in flight in its repository until dropped.
pub(super) struct PushGuard<'a> {
    registry: &'a Registry,
    repository: String,
}

impl Drop for PushGuard<'_> {
    fn drop(&mut self) {
        let mut pushing = self.registry.pushing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = pushing.get_mut(&self.repository) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                pushing.remove(&self.repository);
            }
        }
    }
}

impl Registry {
    /// Collects garbage now: deletes blobs no manifest references that are not manifests themselves,
    /// sparing those younger than `grace` (see the module docs). Blocking (file and index I/O); one
    /// collection runs at a time, a second call waits for the first.
    pub fn gc(&self, grace: Duration) -> Result<GcReport, RegistryError> {
        let _running = self.gc_running.lock().unwrap_or_else(PoisonError::into_inner);
        let started = std::time::Instant::now();
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let mut report = GcReport { grace_secs: grace.as_secs(), ..GcReport::default() };

        let candidates = self.index.unreferenced()?;
        report.unreferenced = candidates.len() as u64;
        for batch in candidates.chunks(SWEEP_BATCH) {
            let _files = self.store.lock_files();
            let now = self.now().as_millis();
            let cutoff = now.saturating_sub(grace_ms);
            let busy = self.busy_repositories();
            let (swept, kept) = self.index.sweep(batch, |digest, links: &[Link]| {
                self.touched_after(digest, cutoff)
                    || links.iter().any(|link| {
                        let linked = link.linked_unix_ms.or_else(|| self.store.modified_unix_ms(digest)).unwrap_or(now);
                        busy.contains(&link.repository) || linked > cutoff
                    })
            })?;
            report.kept_recent += kept;
            for (digest, links) in swept {
                report.links_removed += links;
                if let Some(size) = self.store.remove_counting(&digest)? {
                    report.blobs_deleted += 1;
                    report.bytes_freed += size;
                }
            }
        }

        // Files no repository links: a crash between a file's rename and its link, or a failed removal.
        let cutoff = self.now().as_millis().saturating_sub(grace_ms);
        let mut unlinked = Vec::new();
        self.store.for_each_file(|digest, modified_unix_ms| {
            if modified_unix_ms <= cutoff {
                unlinked.push(digest);
            }
        })?;
        for digest in unlinked {
            if self.index.is_linked(&digest)? {
                continue;
            }
            let _files = self.store.lock_files();
            if self.index.is_linked(&digest)? || self.touched_after(&digest, cutoff) {
                continue;
            }
            if let Some(size) = self.store.remove_counting(&digest)? {
                tracing::info!(%digest, size, "Deleted a blob file no repository linked.");
                report.blobs_deleted += 1;
                report.bytes_freed += size;
            }
        }

        self.touched.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, at| *at > cutoff);
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if report.blobs_deleted > 0 {
            tracing::info!(
                blobs_deleted = report.blobs_deleted,
                bytes_freed = report.bytes_freed,
                links_removed = report.links_removed,
                kept_recent = report.kept_recent,
                duration_ms = report.duration_ms,
                "Registry garbage collection deleted unreferenced blobs."
            );
        } else {
            tracing::debug!(kept_recent = report.kept_recent, "Registry garbage collection found nothing to delete.");
        }
        Ok(report)
    }

    /// Runs [`Registry::gc`] every `gc_interval` (the first run one interval after the start) with
    /// `gc_grace`, until `stop` is cancelled. Does nothing when the interval is zero. Failures are
    /// logged and retried at the next interval.
    pub async fn run_gc_schedule(self: Arc<Self>, stop: CancellationToken) {
        let (interval, grace) = (self.config.gc_interval, self.config.gc_grace);
        if interval.is_zero() {
            tracing::info!("Registry garbage collection schedule is off (interval 0).");
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let registry = self.clone();
            match tokio::task::spawn_blocking(move || registry.gc(grace)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::error!(
                    %error,
                    "Scheduled registry garbage collection failed; it runs again at the next interval."
                ),
                Err(error) => tracing::error!(%error, "Scheduled registry garbage collection task failed."),
            }
        }
    }

    /// Marks a blob as just read or checked: the collector spares it for a grace period.
    pub(super) fn touch(&self, digest: &Digest) {
        let now = self.now().as_millis();
        let mut touched = self.touched.lock().unwrap_or_else(PoisonError::into_inner);
        if touched.len() >= MAX_TOUCHED && !touched.contains_key(digest) {
            // Collections prune the map; without them (schedule off) it is pruned here.
            let grace_ms = i64::try_from(self.config.gc_grace.as_millis()).unwrap_or(i64::MAX);
            let cutoff = now.saturating_sub(grace_ms);
            touched.retain(|_, at| *at > cutoff);
            if touched.len() >= MAX_TOUCHED {
                // Everything is recent: forgetting one costs at most a failed manifest PUT, never data.
                touched.clear();
            }
        }
        touched.insert(digest.clone(), now);
    }

    /// Counts a single-request upload in flight in `repository` (chunked ones are upload sessions).
    pub(super) fn pushing(&self, repository: &str) -> PushGuard<'_> {
        *self.pushing.lock().unwrap_or_else(PoisonError::into_inner).entry(repository.to_owned()).or_insert(0) += 1;
        PushGuard { registry: self, repository: repository.to_owned() }
    }

    fn touched_after(&self, digest: &Digest, cutoff: i64) -> bool {
        self.touched.lock().unwrap_or_else(PoisonError::into_inner).get(digest).is_some_and(|at| *at > cutoff)
    }

    /// Repositories with an upload in flight, chunked or single-request.
    fn busy_repositories(&self) -> BTreeSet<String> {
        let mut busy = self.uploads.repositories();
        busy.extend(self.pushing.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned());
        busy
    }
}
