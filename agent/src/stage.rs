//! Pre-staging: downloading and verifying a bundle ahead of its activation (the controller's Prestage command),
//! one job at a time from a small bounded queue, and the bookkeeping of staged bundles: persisted in
//! `<data_dir>/staged.json`, pinned against eviction until activated or superseded, listed in Hello.
//!
//! A staging job runs the activation's own acquire path (variant choice, trust policy, signature before any
//! layer, bandwidth limit, disk checks, digests while streaming, the runtime build) through
//! [`crate::pull::Acquirer`], and stops before starting anything. Because pulls keep the verified signature in the content store, the later
//! activation verifies everything again from the store and needs no network.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alki_shared::clock::UnixMs;
use alki_shared::digest::Digest;
use alki_shared::oci::{MAX_MANIFEST_BYTES, Manifest};
use alki_shared::proto::{self, ErrorCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::metrics::AgentMetrics;
use crate::pull::keep::{Kept, deployed, deployment_blobs, kept};
use crate::pull::{Acquirer, PullError, PullOptions, Want};
use crate::reference::BundleLocation;
use crate::state::Snapshot;
use crate::store::ContentStore;

/// Staging jobs waiting behind the one running; a full queue refuses with "busy".
pub const QUEUE: usize = 2;
/// Staged bundles kept at most; staging another one drops the oldest (superseded).
pub const MAX_STAGED: usize = 2;
/// Reports waiting for the session (it forwards them while connected); Hello carries the staged list anyway.
pub const REPORTS: usize = 8;
/// The file name under the data directory.
pub const STAGED_FILE: &str = "staged.json";

/// A bundle downloaded and verified ahead of its activation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBundle {
    pub bundle: BundleLocation,
    /// The variant manifest that was staged (the bundle's digest for a single-manifest bundle).
    pub variant_digest: Digest,
    pub staged_unix_ms: UnixMs,
}

/// The staged bundles, oldest first, at most [`MAX_STAGED`]. Pure.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedSet {
    pub entries: Vec<StagedBundle>,
}

impl StagedSet {
    /// Adds `entry` (replacing an entry of the same bundle) and returns the entries it superseded: the
    /// oldest beyond [`MAX_STAGED`].
    pub fn add(&mut self, entry: StagedBundle) -> Vec<StagedBundle> {
        self.entries.retain(|e| e.bundle.digest != entry.bundle.digest);
        self.entries.push(entry);
        let over = self.entries.len().saturating_sub(MAX_STAGED);
        self.entries.drain(..over).collect()
    }

    /// Drops the entries of `bundle` (it was activated, or it no longer verifies); true when one was there.
    pub fn remove(&mut self, bundle: &Digest) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| &e.bundle.digest != bundle);
        self.entries.len() != before
    }

    /// What Hello lists: every staged bundle except the one running (it is reported as `running`).
    pub fn listed(&self, running: Option<&proto::BundleRef>) -> Vec<proto::BundleRef> {
        self.entries
            .iter()
            .filter(|e| running.is_none_or(|r| r.digest != e.bundle.digest.as_str()))
            .map(|e| e.bundle.to_proto())
            .collect()
    }
}

/// `<data_dir>/staged.json`, replaced atomically.
#[derive(Clone, Debug)]
pub struct StagedFile {
    path: PathBuf,
}

impl StagedFile {
    pub fn new(data_dir: &Path) -> StagedFile {
        StagedFile { path: data_dir.join(STAGED_FILE) }
    }

    /// The staged set; empty when the file is missing or unreadable (staging is an optimisation: an activation
    /// of a bundle no longer listed simply pulls what it lacks).
    pub async fn load(&self) -> StagedSet {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %self.path.display(), error = %e, "The staged-bundles file is not valid; starting with none.");
                StagedSet::default()
            }),
            Err(_) => StagedSet::default(),
        }
    }

    pub async fn save(&self, set: &StagedSet) {
        let path = self.path.clone();
        let bytes = serde_json::to_vec_pretty(set).unwrap_or_default();
        let written = tokio::task::spawn_blocking(move || alki_shared::fsutil::write_atomic(&path, &bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(file = %self.path.display(), "Cannot write the staged-bundles file.");
        }
    }
}

/// A Prestage command waiting for its turn.
#[derive(Clone, Debug)]
pub struct Job {
    pub command_id: String,
    pub prestage: proto::Prestage,
}

/// The sending side of the staging queue, for the session.
#[derive(Clone, Debug)]
pub struct Jobs(mpsc::Sender<Job>);

impl Jobs {
    /// Queues the command; the refusal report to send at once when the queue is full.
    pub fn offer(&self, command_id: &str, prestage: proto::Prestage) -> Result<(), Box<proto::PrestageReport>> {
        let job = Job { command_id: command_id.to_owned(), prestage };
        match self.0.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                let job = match e {
                    mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => job,
                };
                let message = format!(
                    "the device is busy staging other bundles (at most {} at once); send the prestage again later",
                    QUEUE + 1
                );
                Err(Box::new(report(&job, None, Err(error(ErrorCode::PullFailed, message)))))
            }
        }
    }
}

/// What the session needs: the queue, the reports to forward, the staged list for Hello.
pub struct SessionStaging {
    pub jobs: Jobs,
    pub reports: mpsc::Receiver<proto::PrestageReport>,
    pub staged: watch::Receiver<StagedSet>,
}

/// Everything the staging task needs; built by [`crate::Agent::run`].
pub(crate) struct Stager {
    pub(crate) acquirer: Acquirer,
    pub(crate) bundles_dir: PathBuf,
    pub(crate) data_dir: PathBuf,
    /// The config at start and its reloads: disk reserve and bandwidth limit are read for each job.
    pub(crate) config: Arc<crate::Config>,
    pub(crate) reloads: Option<watch::Receiver<crate::reload::ConfigState>>,
    pub(crate) snapshot: watch::Receiver<Snapshot>,
    pub(crate) metrics: Arc<AgentMetrics>,
}

fn error(code: ErrorCode, message: String) -> proto::ActivationError {
    proto::ActivationError { code: code as i32, message, layer_digest: String::new() }
}

fn report(job: &Job, variant: Option<&Digest>, outcome: Result<u64, proto::ActivationError>) -> proto::PrestageReport {
    let (ready, error, bytes_downloaded) = match outcome {
        Ok(bytes) => (true, None, bytes),
        Err(e) => (false, Some(e), 0),
    };
    proto::PrestageReport {
        command_id: job.command_id.clone(),
        bundle: job.prestage.bundle.clone(),
        variant_digest: variant.map(ToString::to_string).unwrap_or_else(|| job.prestage.variant_digest.clone()),
        ready,
        error,
        bytes_downloaded,
    }
}

impl Stager {
    /// Loads the staged list (keeping the entries whose blobs are all present), pins them, and starts the task
    /// that verifies them again in the background and then runs staging jobs one at a time until `shutdown`.
    pub(crate) async fn spawn(self, shutdown: watch::Receiver<bool>) -> (SessionStaging, tokio::task::JoinHandle<()>) {
        let file = StagedFile::new(&self.data_dir);
        let mut set = file.load().await;
        let mut present = StagedSet::default();
        for entry in set.entries.drain(..) {
            let store = &self.acquirer.store;
            if variant_present(store, &entry.variant_digest).await && store.contains(&entry.bundle.digest).await {
                present.entries.push(entry);
            } else {
                tracing::warn!(bundle = %entry.bundle, "A staged bundle is no longer complete in the content store; dropped.");
            }
        }
        self.pin(&present).await;
        self.metrics.set_staged(present.entries.len());
        let (staged_tx, staged_rx) = watch::channel(present);
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE);
        let (reports_tx, reports_rx) = mpsc::channel(REPORTS);
        let task = tokio::spawn(self.run(file, staged_tx, jobs_rx, reports_tx, shutdown).in_current_span());
        (SessionStaging { jobs: Jobs(jobs_tx), reports: reports_rx, staged: staged_rx }, task)
    }

    async fn run(
        mut self,
        file: StagedFile,
        staged: watch::Sender<StagedSet>,
        mut jobs: mpsc::Receiver<Job>,
        reports: mpsc::Sender<proto::PrestageReport>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // What was staged before a restart is verified again (digests and the current trust policy).
        let loaded = staged.borrow().clone();
        for entry in &loaded.entries {
            let verified = tokio::select! {
                v = self.verify_stored(entry) => v,
                _ = shutdown.changed() => return,
            };
            if let Err(e) = verified {
                tracing::warn!(bundle = %entry.bundle, error = %e, "A staged bundle no longer verifies; dropped.");
                let mut set = staged.borrow().clone();
                set.remove(&entry.bundle.digest);
                self.commit(&file, &staged, set).await;
            }
        }
        loop {
            let job = tokio::select! {
                job = jobs.recv() => job,
                changed = self.snapshot.changed() => match changed {
                    Ok(()) => None,
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            };
            let Some(job) = job else {
                if jobs.is_closed() && jobs.is_empty() {
                    return;
                }
                self.forget_activated(&file, &staged).await;
                continue;
            };
            let command_id = job.command_id.clone();
            let span = tracing::info_span!("prestage", %command_id);
            let report = tokio::select! {
                r = self.stage(&job, &file, &staged).instrument(span) => r,
                _ = shutdown.changed() => {
                    // The partial download stays under partial/: the next staging or activation resumes it.
                    tracing::info!(%command_id, "Staging abandoned for shutdown.");
                    return;
                }
            };
            self.metrics.prestaged(report.ready);
            if reports.try_send(report).is_err() {
                tracing::warn!(%command_id, "The staging report could not be queued for the controller; Hello lists the staged bundles.");
            }
        }
    }

    /// A staged bundle that is now served was activated: the active deployment protects it from now on.
    async fn forget_activated(&mut self, file: &StagedFile, staged: &watch::Sender<StagedSet>) {
        let running = self.snapshot.borrow_and_update().running.clone();
        let mut set = staged.borrow().clone();
        if let Some(r) = running
            && let Ok(digest) = r.digest.parse::<Digest>()
            && set.remove(&digest)
        {
            tracing::info!(bundle = %r.digest, "A staged bundle was activated.");
            self.commit(file, staged, set).await;
        }
    }

    /// Replaces the staged set: the file, the pins, the list Hello reads.
    async fn commit(&self, file: &StagedFile, staged: &watch::Sender<StagedSet>, set: StagedSet) {
        file.save(&set).await;
        self.pin(&set).await;
        self.metrics.set_staged(set.entries.len());
        staged.send_replace(set);
    }

    async fn pin(&self, set: &StagedSet) {
        let mut pins = HashSet::new();
        for e in &set.entries {
            pins.extend(deployment_blobs(&self.acquirer.store, &e.bundle.digest, &e.variant_digest).await);
        }
        self.acquirer.store.set_pinned(pins);
    }

    fn current_config(&self) -> Arc<crate::Config> {
        match &self.reloads {
            Some(rx) => Arc::clone(&rx.borrow().config),
            None => Arc::clone(&self.config),
        }
    }

    /// Disk reserve and bandwidth from the config now, and what a staging pull must never evict to make room:
    /// the active and previous deployments (from the state file the device loop keeps) and the staged bundles.
    async fn options(&self, set: &StagedSet, preferred: Option<Digest>) -> PullOptions {
        let config = self.current_config();
        let mut deployments = deployed(&self.data_dir).await;
        deployments.extend(set.entries.iter().map(|e| (e.bundle.digest.clone(), e.variant_digest.clone())));
        let Kept { blobs, variants } = kept(&self.acquirer.store, deployments).await;
        PullOptions {
            disk_reserve: config.disk_reserve_bytes(),
            keep: blobs,
            keep_variants: variants,
            bandwidth: config.bandwidth_limit(),
            preferred_variant: preferred,
            ..PullOptions::default()
        }
    }

    /// Runs one Prestage command: acquire without activating; records the bundle as staged.
    async fn stage(&self, job: &Job, file: &StagedFile, staged: &watch::Sender<StagedSet>) -> proto::PrestageReport {
        let (bundle, preferred) = match parse(job) {
            Ok(parsed) => parsed,
            Err(refusal) => return report(job, None, Err(refusal)),
        };
        tracing::info!(bundle = %bundle, "Staging a bundle ahead of its activation.");
        let set = staged.borrow().clone();
        let options = self.options(&set, preferred).await;
        // The llama.cpp build the bundle names comes too: its activation then needs no network either.
        let want = Want { bundle: &bundle, into: &self.bundles_dir, memory: None, trust: None, options };
        let pulled = match self.acquirer.acquire(want, &mut |_| {}).await {
            Ok(pulled) => pulled,
            Err(e) => {
                tracing::warn!(bundle = %bundle, error = %e, "Staging failed.");
                return report(job, None, Err(e.activation_error()));
            }
        };
        self.metrics.pulled(pulled.bytes_fetched);
        tracing::info!(bundle = %bundle, variant = %pulled.variant_digest, bytes_downloaded = pulled.bytes_fetched, "Bundle staged.");
        let running = self.snapshot.borrow().running.as_ref().is_some_and(|r| r.digest == bundle.digest.as_str());
        // Already served: the active deployment keeps it; nothing to stage.
        if !running {
            let entry = StagedBundle {
                bundle: bundle.clone(),
                variant_digest: pulled.variant_digest.clone(),
                staged_unix_ms: UnixMs::now(),
            };
            let mut set = staged.borrow().clone();
            for dropped in set.add(entry) {
                tracing::info!(bundle = %dropped.bundle, "A staged bundle was superseded by a newer one; it may be evicted.");
            }
            self.commit(file, staged, set).await;
        }
        report(job, Some(&pulled.variant_digest), Ok(pulled.bytes_fetched))
    }

    /// Verifies a staged bundle again from the content store alone (no network).
    async fn verify_stored(&self, entry: &StagedBundle) -> Result<(), PullError> {
        let set = StagedSet { entries: vec![entry.clone()] };
        let options = self.options(&set, Some(entry.variant_digest.clone())).await;
        // The memory check was made when it was staged; the activation makes it again.
        let want =
            Want { bundle: &entry.bundle, into: &self.bundles_dir, memory: Some(u64::MAX), trust: None, options };
        self.acquirer.verify_stored(want).await.map(|_| ())
    }
}

/// The bundle and preferred variant a Prestage command names; the refusal when they are unusable.
fn parse(job: &Job) -> Result<(BundleLocation, Option<Digest>), proto::ActivationError> {
    let bundle = BundleLocation::from_proto(job.prestage.bundle.as_ref()).map_err(|e| {
        error(ErrorCode::BundleInvalid, format!("{e}; the controller sent an unusable bundle reference"))
    })?;
    let preferred = match job.prestage.variant_digest.as_str() {
        "" => None,
        text => Some(text.parse::<Digest>().map_err(|e| {
            let message = format!("variant digest {text:?} is not valid ({e}); send a sha256:<hex> digest");
            error(ErrorCode::BundleInvalid, message)
        })?),
    };
    Ok((bundle, preferred))
}

/// True when the variant manifest and every blob it names are in the store with the sizes it says.
async fn variant_present(store: &ContentStore, variant: &Digest) -> bool {
    let Some(size) = store.size(variant).await else { return false };
    if size > MAX_MANIFEST_BYTES as u64 {
        return false;
    }
    let Ok(bytes) = tokio::fs::read(store.path(variant)).await else { return false };
    let Ok(Manifest::Image(m)) = Manifest::parse(&bytes, None) else { return false };
    for d in std::iter::once(&m.config).chain(&m.layers) {
        if store.size(&d.digest).await != Some(d.size) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, at: i64) -> StagedBundle {
        StagedBundle {
            bundle: BundleLocation {
                registry: String::new(),
                repository: "acme/tiny".to_owned(),
                digest: Digest::of(name.as_bytes()),
                tag: String::new(),
            },
            variant_digest: Digest::of(format!("variant {name}").as_bytes()),
            staged_unix_ms: UnixMs(at),
        }
    }

    #[test]
    fn staging_keeps_at_most_two_and_supersedes_the_oldest() {
        let mut set = StagedSet::default();
        assert!(set.add(entry("a", 1)).is_empty());
        assert!(set.add(entry("b", 2)).is_empty());
        let dropped = set.add(entry("c", 3));
        assert_eq!(dropped, vec![entry("a", 1)]);
        assert_eq!(set.entries, vec![entry("b", 2), entry("c", 3)]);
        // Staging the same bundle again replaces its entry and moves it last.
        assert!(set.add(entry("b", 4)).is_empty());
        assert_eq!(set.entries, vec![entry("c", 3), entry("b", 4)]);
        assert!(set.remove(&entry("c", 0).bundle.digest));
        assert!(!set.remove(&entry("c", 0).bundle.digest));
    }

    #[test]
    fn hello_lists_staged_bundles_but_not_the_running_one() {
        let mut set = StagedSet::default();
        set.add(entry("a", 1));
        set.add(entry("b", 2));
        let running = entry("a", 0).bundle.to_proto();
        assert_eq!(set.listed(Some(&running)), vec![entry("b", 2).bundle.to_proto()]);
        assert_eq!(set.listed(None).len(), 2);
    }

    #[tokio::test]
    async fn the_staged_file_round_trips_and_a_bad_one_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StagedFile::new(dir.path());
        assert_eq!(file.load().await, StagedSet::default());
        let mut set = StagedSet::default();
        set.add(entry("a", 1));
        file.save(&set).await;
        assert_eq!(file.load().await, set);
        std::fs::write(dir.path().join(STAGED_FILE), b"{not json").expect("write");
        assert_eq!(file.load().await, StagedSet::default());
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_with_the_command_id() {
        let (tx, _rx) = mpsc::channel(1);
        let jobs = Jobs(tx);
        let prestage = proto::Prestage { bundle: Some(entry("a", 0).bundle.to_proto()), variant_digest: String::new() };
        jobs.offer("c1", prestage.clone()).expect("queued");
        let refusal = jobs.offer("c2", prestage).expect_err("busy");
        assert_eq!(refusal.command_id, "c2");
        assert!(!refusal.ready);
        let error = refusal.error.expect("error");
        assert!(error.message.contains("busy"), "{}", error.message);
    }
}
