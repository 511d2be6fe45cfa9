//! Pre-staging: downloading and verifying a bundle ahead of its activation (the controller's Prestage command),
//! one job at a time from a small bounded queue, and the bookkeeping of staged bundles: persisted in
//! `<data_dir>/staged.json`, pinned against eviction until activated or superseded, listed in Hello.
//!
//! A staging job runs the activation's own path (variant choice, trust policy, signature before any layer,
//! bandwidth limit, disk checks, digests while streaming) through [`crate::pull::pull_bundle_with`], and stops
//! before starting anything. Because pulls keep the verified signature in the content store, the later
//! activation verifies everything again from the store and needs no network.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alki_shared::digest::Digest;
use alki_shared::oci::{MAX_MANIFEST_BYTES, Manifest};
use alki_shared::proto::{self, ErrorCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::device::RegistrySettings;
use crate::pull::{PullError, PullOptions, deployment_blobs, pull_bundle_with};
use crate::reference::BundleLocation;
use crate::session::Snapshot;
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
    pub staged_unix_ms: i64,
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
    pub(crate) registry: RegistrySettings,
    pub(crate) store: ContentStore,
    pub(crate) bundles_dir: PathBuf,
    pub(crate) data_dir: PathBuf,
    /// The config at start and its reloads: disk reserve and bandwidth limit are read for each job.
    pub(crate) config: Arc<crate::Config>,
    pub(crate) reloads: Option<watch::Receiver<crate::reload::ConfigState>>,
    pub(crate) snapshot: watch::Receiver<Snapshot>,
    pub(crate) metrics: Arc<crate::metrics::AgentMetrics>,
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
            if variant_present(&self.store, &entry.variant_digest).await
                && self.store.contains(&entry.bundle.digest).await
            {
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
            pins.extend(deployment_blobs(&self.store, &e.bundle.digest, &e.variant_digest).await);
        }
        self.store.set_pinned(pins);
    }

    fn current_config(&self) -> Arc<crate::Config> {
        match &self.reloads {
            Some(rx) => Arc::clone(&rx.borrow().config),
            None => Arc::clone(&self.config),
        }
    }

    /// Active and previous deployments (from the state file the device loop keeps) and the staged bundles:
    /// what a staging pull must never evict to make room.
    async fn kept(&self, set: &StagedSet) -> (HashSet<Digest>, Vec<Digest>) {
        let state_file = crate::state::StateFile::new(&self.data_dir);
        let state = tokio::task::spawn_blocking(move || state_file.load()).await.ok().and_then(Result::ok).flatten();
        let mut keep = HashSet::new();
        let mut variants = Vec::new();
        let deployed = state
            .iter()
            .flat_map(|s| [&s.active, &s.previous])
            .flatten()
            .map(|d| (d.bundle.digest.clone(), d.variant_digest.clone()));
        let staged = set.entries.iter().map(|e| (e.bundle.digest.clone(), e.variant_digest.clone()));
        for (bundle, variant) in deployed.chain(staged).collect::<Vec<_>>() {
            keep.extend(deployment_blobs(&self.store, &bundle, &variant).await);
            variants.push(variant);
        }
        (keep, variants)
    }

    async fn options(&self, bundle: &BundleLocation, set: &StagedSet, preferred: Option<Digest>) -> PullOptions {
        let config = self.current_config();
        let (keep, keep_variants) = self.kept(set).await;
        let trust_store = self.registry.trust.clone();
        let repository = bundle.repository.clone();
        // The policy file and its keys are small files: read them off the async threads.
        let trust =
            tokio::task::spawn_blocking(move || trust_store.for_repository(&repository)).await.unwrap_or_default();
        PullOptions {
            disk_reserve: config.disk_reserve_bytes(),
            keep,
            keep_variants,
            bandwidth: config.bandwidth_limit(),
            trust,
            preferred_variant: preferred,
        }
    }

    /// Runs one Prestage command: pull and verify without activating; records the bundle as staged.
    async fn stage(&self, job: &Job, file: &StagedFile, staged: &watch::Sender<StagedSet>) -> proto::PrestageReport {
        let bundle = match BundleLocation::from_proto(job.prestage.bundle.as_ref()) {
            Ok(b) => b,
            Err(e) => {
                let message = format!("{e}; the controller sent an unusable bundle reference");
                return report(job, None, Err(error(ErrorCode::BundleInvalid, message)));
            }
        };
        let preferred = match job.prestage.variant_digest.as_str() {
            "" => None,
            text => match text.parse::<Digest>() {
                Ok(d) => Some(d),
                Err(e) => {
                    let message = format!("variant digest {text:?} is not valid ({e}); send a sha256:<hex> digest");
                    return report(job, None, Err(error(ErrorCode::BundleInvalid, message)));
                }
            },
        };
        tracing::info!(bundle = %bundle, "Staging a bundle ahead of its activation.");
        let set = staged.borrow().clone();
        let options = self.options(&bundle, &set, preferred).await;
        let access = self.registry.access().await;
        let memory = tokio::task::spawn_blocking(crate::inventory::memory_available).await.unwrap_or_default();
        let mut pulled =
            pull_bundle_with(&access, &self.store, &self.bundles_dir, &bundle, memory, &options, &mut |_| {}).await;
        if let Ok(pulled) = &mut pulled {
            // The llama.cpp build the bundle names, too: its activation then needs no network either.
            let builds_dir = self.data_dir.join(crate::builds::DIR_NAME);
            let fetch = crate::builds::Fetch { registry: &access, store: &self.store, builds_dir: &builds_dir };
            if let Err(e) =
                crate::builds::attach(pulled, &bundle, &fetch, &self.registry.trust, &options, &mut |_| {}).await
            {
                tracing::warn!(bundle = %bundle, error = %e, "Staging the bundle's runtime build failed.");
                return report(job, None, Err(activation_error(&e)));
            }
        }
        match pulled {
            Ok(pulled) => {
                self.metrics.pulled(pulled.bytes_fetched);
                tracing::info!(bundle = %bundle, variant = %pulled.variant_digest, bytes_downloaded = pulled.bytes_fetched, "Bundle staged.");
                let mut set = staged.borrow().clone();
                let running =
                    self.snapshot.borrow().running.as_ref().is_some_and(|r| r.digest == bundle.digest.as_str());
                if running {
                    // Already served: the active deployment keeps it; nothing to stage.
                    return report(job, Some(&pulled.variant_digest), Ok(pulled.bytes_fetched));
                }
                let entry = StagedBundle {
                    bundle: bundle.clone(),
                    variant_digest: pulled.variant_digest.clone(),
                    staged_unix_ms: crate::bench::now_unix_ms(),
                };
                for dropped in set.add(entry) {
                    tracing::info!(bundle = %dropped.bundle, "A staged bundle was superseded by a newer one; it may be evicted.");
                }
                self.commit(file, staged, set).await;
                report(job, Some(&pulled.variant_digest), Ok(pulled.bytes_fetched))
            }
            Err(e) => {
                tracing::warn!(bundle = %bundle, error = %e, "Staging failed.");
                report(job, None, Err(activation_error(&e)))
            }
        }
    }

    /// Verifies a staged bundle again from the content store alone (no network).
    async fn verify_stored(&self, entry: &StagedBundle) -> Result<(), PullError> {
        let set = StagedSet { entries: vec![entry.clone()] };
        let options = self.options(&entry.bundle, &set, Some(entry.variant_digest.clone())).await;
        // The memory check was made when it was staged; the activation makes it again.
        crate::pull::verify_from_store(&self.store, &self.bundles_dir, &entry.bundle, u64::MAX, &options)
            .await
            .map(|_| ())
    }
}

fn activation_error(e: &PullError) -> proto::ActivationError {
    proto::ActivationError {
        code: e.code() as i32,
        message: e.to_string(),
        layer_digest: e.layer_digest().map(ToString::to_string).unwrap_or_default(),
    }
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
            staged_unix_ms: at,
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
