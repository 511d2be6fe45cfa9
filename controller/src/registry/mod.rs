//! The controller's embedded OCI registry (distribution spec v1.1.1): blob and manifest storage, and
//! the authenticated `/v2/` routes on axum.
//!
//! - `blobs`: content-addressed files and upload temporaries (the only code touching blob files).
//! - `index`: the redb tables saying what each repository holds (the only code touching them).
//! - `uploads`: in-memory upload sessions, bounded and expired by [`Registry::spawn_cleanup`].
//! - `gc`: mark-and-sweep garbage collection of unreferenced blobs with a grace period
//!   ([`Registry::gc`], [`Registry::run_gc_schedule`]) and the admin client alkictl uses.
//! - `routes`, `error`, `range`, `names`: HTTP, error bodies, byte ranges, and the spec's grammars.
//!
//! Invariants: a blob is visible in a repository only after its file is fsynced, renamed into place and
//! linked in the index; a stored manifest never references a missing blob or manifest (deletes and the
//! garbage collector re-check references in the same transaction, under the files lock); request bodies
//! are streamed through fixed-size buffers (never a whole blob in memory); no lock is held across an await.

pub mod access;
mod blobs;
mod error;
pub mod gc;
mod index;
pub mod names;
mod range;
mod routes;
mod uploads;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alki_shared::clock::{self, SharedClock, UnixMs};
use alki_shared::digest::{Digest, DigestError};
use alki_shared::oci::MAX_MANIFEST_BYTES;

pub use alki_shared::gc::GcReport;
pub use routes::router;

use blobs::{BlobStore, Finished, blocking};
use index::{BlobUnlink, Index, ManifestDelete, ManifestPut, ManifestRecord};
use names::Reference;
use uploads::Uploads;

/// Limits of the embedded registry.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Largest manifest accepted (413 above it); at most [`MAX_MANIFEST_BYTES`], which parsing enforces.
    pub max_manifest_bytes: usize,
    /// Largest blob accepted (413 SIZE_INVALID above it). GGUF files of large models run to tens of GiB.
    pub max_blob_bytes: u64,
    /// An upload untouched for this long is abandoned: its session and temporary file are deleted.
    pub upload_ttl: Duration,
    /// Uploads open at once; more get 429 TOOMANYREQUESTS until some finish or expire.
    pub max_open_uploads: usize,
    /// How often the controller collects garbage (unreferenced blobs); zero turns the schedule off.
    pub gc_interval: Duration,
    /// Unreferenced blobs linked, mounted or read more recently than this are kept: it must exceed the
    /// longest time a client takes between pushing a blob and pushing the manifest that references it.
    pub gc_grace: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_bytes: MAX_MANIFEST_BYTES,
            max_blob_bytes: 256 << 30,
            upload_ttl: Duration::from_secs(30 * 60),
            max_open_uploads: 64,
            gc_interval: Duration::from_secs(60 * 60),
            gc_grace: Duration::from_secs(60 * 60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry storage I/O on {path}: {source}; check the data directory's disk and permissions")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("registry index database: {0}")]
    Database(#[from] redb::Error),
    #[error("registry index record {key} is unreadable: {source}")]
    CorruptRecord { key: String, source: serde_json::Error },
    #[error("registry index entry {key} holds an invalid digest: {source}")]
    CorruptTag { key: String, source: DigestError },
    #[error("could not encode a registry index record: {0}")]
    Encode(serde_json::Error),
    #[error("registry background task failed: {0}")]
    Task(String),
}

/// A manifest as stored: the exact bytes pushed.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredManifest {
    pub repository: String,
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// A stored manifest with what the registry knows about it.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    pub repository: String,
    pub digest: Digest,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub size: u64,
    pub pushed_unix_ms: i64,
    /// Tags of this repository pointing at the manifest, in lexical order.
    pub tags: Vec<String>,
    pub subject: Option<Digest>,
}

/// The embedded registry: blob files under the data directory, metadata in the controller's redb.
pub struct Registry {
    config: RegistryConfig,
    store: BlobStore,
    index: Index,
    uploads: Arc<Uploads>,
    cleanup_started: AtomicBool,
    /// Blobs read or checked (HEAD) recently, with when (Unix ms): a client that found a blob present
    /// may push a manifest referencing it next, so the garbage collector treats it as young.
    touched: Mutex<HashMap<Digest, i64>>,
    /// Single-request (monolithic) uploads in flight, per repository.
    pushing: Mutex<HashMap<String, usize>>,
    /// Serialises garbage collections (scheduled and requested).
    gc_running: Mutex<()>,
    /// When manifests are pushed and blobs linked and read; the garbage collector's grace counts by it.
    clock: SharedClock,
}

impl Registry {
    /// Opens the registry under `data_dir` (`blobs/`, `uploads/`), creating its tables in `db`, and
    /// deletes upload temporaries an earlier run left behind. Blocking.
    pub fn open(data_dir: &Path, db: Arc<redb::Database>, config: RegistryConfig) -> Result<Registry, RegistryError> {
        Registry::open_with_clock(data_dir, db, config, clock::system())
    }

    /// [`Registry::open`] reading time from `clock` (a test advances it past a grace period).
    pub fn open_with_clock(
        data_dir: &Path,
        db: Arc<redb::Database>,
        config: RegistryConfig,
        clock: SharedClock,
    ) -> Result<Registry, RegistryError> {
        let store = BlobStore::open(data_dir)?;
        let index = Index::open(db, clock.clone())?;
        let uploads = Arc::new(Uploads::new(config.max_open_uploads));
        Ok(Registry {
            config,
            store,
            index,
            uploads,
            cleanup_started: AtomicBool::new(false),
            touched: Mutex::new(HashMap::new()),
            pushing: Mutex::new(HashMap::new()),
            gc_running: Mutex::new(()),
            clock,
        })
    }

    fn now(&self) -> UnixMs {
        self.clock.now()
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Resolve a tag or digest in a repository to the stored manifest. Blocking (reads the index and a
    /// small file). An invalid reference resolves to nothing.
    pub fn resolve(&self, repository: &str, reference: &str) -> Result<Option<StoredManifest>, RegistryError> {
        let Ok(reference) = Reference::parse(reference) else { return Ok(None) };
        let Some(digest) = self.digest_of(repository, &reference)? else { return Ok(None) };
        let Some(record) = self.index.manifest(repository, &digest)? else { return Ok(None) };
        let path = self.store.path(&digest);
        let bytes = std::fs::read(&path).map_err(blobs::io(&path))?;
        Ok(Some(StoredManifest { repository: repository.to_owned(), digest, media_type: record.media_type, bytes }))
    }

    /// Every manifest stored in a repository (and every repository when None), with the tags pointing
    /// at each; ordered by repository, then digest. Blocking.
    pub fn manifests(&self, repository: Option<&str>) -> Result<Vec<ManifestEntry>, RegistryError> {
        self.index.entries(repository)
    }

    /// Path of a blob on disk if present (for size/reads by other modules).
    pub fn blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        let path = self.store.path(digest);
        path.is_file().then_some(path)
    }

    /// Starts the task that expires abandoned uploads (every `upload_ttl / 4`, between 50 ms and a
    /// minute). [`router`] calls this; further calls do nothing. The task ends when the registry is
    /// dropped. Returns whether this call started it (false outside a Tokio runtime, too).
    pub fn spawn_cleanup(self: &Arc<Self>) -> bool {
        if self.cleanup_started.swap(true, Ordering::SeqCst) {
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.cleanup_started.store(false, Ordering::SeqCst);
            tracing::warn!("The registry's upload cleanup needs a Tokio runtime; it was not started.");
            return false;
        };
        let registry = Arc::downgrade(self);
        let period = (self.config.upload_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(60));
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(registry) = registry.upgrade() else { break };
                let uploads = registry.uploads.clone();
                let ttl = registry.config.upload_ttl;
                drop(registry);
                for (id, session) in uploads.expire(tokio::time::Instant::now(), ttl) {
                    tracing::info!(
                        upload = %id,
                        repository = %session.repository,
                        received = session.partial.received(),
                        "Deleted an upload abandoned for longer than the upload TTL."
                    );
                    session.partial.discard().await;
                }
            }
        });
        true
    }

    fn digest_of(&self, repository: &str, reference: &Reference) -> Result<Option<Digest>, RegistryError> {
        match reference {
            Reference::Digest(d) => Ok(Some(d.clone())),
            Reference::Tag(tag) => self.index.tag(repository, tag),
        }
    }

    /// Makes a received blob visible in `repository`: rename into place (unless already stored), link.
    async fn commit_blob(self: &Arc<Self>, finished: Finished, repository: &str) -> Result<(), RegistryError> {
        let registry = self.clone();
        let repository = repository.to_owned();
        blocking(move || {
            let (digest, size) = (finished.digest.clone(), finished.size);
            let _files = registry.store.lock_files();
            registry.store.persist(finished)?;
            registry.index.link_blob(&repository, &digest, size)
        })
        .await
    }

    /// Links a blob another repository holds into `repository`; false when `from` does not hold it.
    async fn mount_blob(
        self: &Arc<Self>,
        digest: &Digest,
        from: &str,
        repository: &str,
    ) -> Result<bool, RegistryError> {
        let registry = self.clone();
        let (digest, from, repository) = (digest.clone(), from.to_owned(), repository.to_owned());
        blocking(move || {
            let _files = registry.store.lock_files();
            let Some(size) = registry.index.blob_size(&from, &digest)? else { return Ok(false) };
            if !registry.store.path(&digest).is_file() {
                return Ok(false);
            }
            registry.index.link_blob(&repository, &digest, size)?;
            Ok(true)
        })
        .await
    }

    async fn blob_size(self: &Arc<Self>, repository: &str, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let registry = self.clone();
        let (repository, digest) = (repository.to_owned(), digest.clone());
        blocking(move || registry.index.blob_size(&repository, &digest)).await
    }

    async fn delete_blob(self: &Arc<Self>, repository: &str, digest: &Digest) -> Result<BlobUnlink, RegistryError> {
        let registry = self.clone();
        let (repository, digest) = (repository.to_owned(), digest.clone());
        blocking(move || {
            let _files = registry.store.lock_files();
            let outcome = registry.index.unlink_blob(&repository, &digest)?;
            if outcome == (BlobUnlink::Removed { orphaned: true }) {
                registry.store.remove(&digest)?;
            }
            Ok(outcome)
        })
        .await
    }

    /// Stores a manifest's bytes as a blob file and its record in the index, atomically with the check
    /// that everything it references is in the repository.
    async fn put_manifest(
        self: &Arc<Self>,
        repository: &str,
        digest: &Digest,
        bytes: Vec<u8>,
        record: ManifestRecord,
        is_index: bool,
        tag: Option<String>,
    ) -> Result<ManifestPut, RegistryError> {
        let registry = self.clone();
        let (repository, digest) = (repository.to_owned(), digest.clone());
        blocking(move || {
            let _files = registry.store.lock_files();
            let store = &registry.store;
            registry.index.put_manifest(&repository, &digest, &record, is_index, tag.as_deref(), || {
                store.write_small(&digest, &bytes)
            })
        })
        .await
    }

    /// The record of a manifest by tag or digest, with its digest.
    async fn manifest_record(
        self: &Arc<Self>,
        repository: &str,
        reference: &Reference,
    ) -> Result<Option<(Digest, ManifestRecord)>, RegistryError> {
        let registry = self.clone();
        let (repository, reference) = (repository.to_owned(), reference.clone());
        blocking(move || {
            let Some(digest) = registry.digest_of(&repository, &reference)? else { return Ok(None) };
            Ok(registry.index.manifest(&repository, &digest)?.map(|record| (digest, record)))
        })
        .await
    }

    /// Deletes a manifest by digest (with its tags, unless an index lists it), or only a tag.
    async fn delete_manifest(
        self: &Arc<Self>,
        repository: &str,
        reference: &Reference,
    ) -> Result<ManifestDelete, RegistryError> {
        let registry = self.clone();
        let (repository, reference) = (repository.to_owned(), reference.clone());
        blocking(move || match &reference {
            Reference::Tag(tag) => Ok(if registry.index.untag(&repository, tag)? {
                ManifestDelete::Deleted { orphaned: false }
            } else {
                ManifestDelete::Unknown
            }),
            Reference::Digest(digest) => {
                let _files = registry.store.lock_files();
                let outcome = registry.index.delete_manifest(&repository, digest)?;
                if outcome == (ManifestDelete::Deleted { orphaned: true }) {
                    registry.store.remove(digest)?;
                }
                Ok(outcome)
            }
        })
        .await
    }

    async fn tags(self: &Arc<Self>, repository: &str) -> Result<Option<Vec<String>>, RegistryError> {
        let registry = self.clone();
        let repository = repository.to_owned();
        blocking(move || registry.index.tags(&repository)).await
    }

    /// Manifests of `repository` whose subject is `subject`.
    async fn referrers(
        self: &Arc<Self>,
        repository: &str,
        subject: &Digest,
    ) -> Result<Vec<(Digest, ManifestRecord)>, RegistryError> {
        let registry = self.clone();
        let (repository, subject) = (repository.to_owned(), subject.clone());
        blocking(move || {
            Ok(registry
                .index
                .records(Some(&repository))?
                .into_iter()
                .filter(|(_, _, record)| record.subject.as_ref() == Some(&subject))
                .map(|(_, digest, record)| (digest, record))
                .collect())
        })
        .await
    }
}
