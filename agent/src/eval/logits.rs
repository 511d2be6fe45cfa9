//! The baseline logits cache: what a baseline's llama-perplexity run writes (`--kl-divergence-base`), kept
//! once per (baseline variant × suite) so every candidate compared with the same baseline and suite reuses
//! it. Each file is a blob of the content store (under its disk budget, evicted least recently used like any
//! blob, never while an evaluation holds its lease), found through `content/base-logits/<key>` (the blob's
//! digest and size), and checked with [`BaseLogitsHeader::check`] before every reuse.

use std::path::{Path, PathBuf};

use alki_shared::digest::Digest;
use alki_shared::eval::perplexity::{BaseLogitsError, BaseLogitsHeader, base_logits_size};
use serde::{Deserialize, Serialize};

use crate::pull::blob::check_disk;
use crate::store::{BlobLease, ContentStore};

/// The index directory under the content store's root.
pub const DIR_NAME: &str = "base-logits";

/// An index entry: which blob holds the logits of one baseline and suite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    blob: Digest,
    size: u64,
    baseline: Digest,
    suite: Digest,
}

/// What a baseline's logits are for: a baseline variant, a suite, and the suite's context and chunks.
#[derive(Clone, Copy, Debug)]
pub struct Key<'a> {
    pub baseline: &'a Digest,
    pub suite: &'a Digest,
    pub context_size: u32,
    pub chunks: u32,
}

impl Key<'_> {
    fn file_name(&self) -> String {
        Digest::of(format!("{}\n{}", self.baseline, self.suite).as_bytes()).hex().to_owned()
    }
}

/// Baseline logits ready for a KL-divergence run, leased while held.
#[derive(Debug)]
pub struct Cached {
    pub path: PathBuf,
    pub header: BaseLogitsHeader,
    pub size: u64,
    _lease: BlobLease,
}

/// The cache over a content store.
#[derive(Clone, Debug)]
pub struct BaseLogits {
    store: ContentStore,
    index: PathBuf,
}

impl BaseLogits {
    /// The cache over `store`, its index in `<content root>/base-logits`.
    pub fn new(store: ContentStore, content_root: &Path) -> BaseLogits {
        BaseLogits { store, index: content_root.join(DIR_NAME) }
    }

    pub fn store(&self) -> &ContentStore {
        &self.store
    }

    /// The baseline's logits for `key`, when cached, unchanged since verified, and whole for the suite's
    /// context and chunks; anything else is dropped from the cache (and computed again by the caller).
    pub async fn get(&self, key: Key<'_>) -> Option<Cached> {
        let path = self.index.join(key.file_name());
        let entry: Entry = serde_json::from_slice(&tokio::fs::read(&path).await.ok()?).ok()?;
        let lease = self.store.lease(&entry.blob);
        let usable = match self.store.verified(&entry.blob, entry.size).await {
            Ok(true) => check(&self.store.path(&entry.blob), entry.size, key).await,
            _ => Err(BaseLogitsError::Io("the cached file is gone or damaged".to_owned())),
        };
        match usable {
            Ok(header) => {
                self.store.touch(&entry.blob).await;
                Some(Cached { path: self.store.path(&entry.blob), header, size: entry.size, _lease: lease })
            }
            Err(e) => {
                tracing::warn!(baseline = %key.baseline, suite = %key.suite, error = %e, "Cached baseline logits are not usable; computing them again.");
                let _ = tokio::fs::remove_file(&path).await;
                drop(lease);
                let _ = self.store.remove(&entry.blob).await;
                None
            }
        }
    }

    /// A scratch file for a baseline run to write into (same file system as the store).
    pub fn scratch(&self) -> Result<tempfile::TempPath, String> {
        self.store.scratch("base-logits").map_err(|e| e.to_string())
    }

    /// Checks a baseline run's file and takes it into the cache for `key`.
    pub async fn insert(&self, key: Key<'_>, written: tempfile::TempPath) -> Result<Cached, String> {
        let size = tokio::fs::metadata(&written).await.map(|m| m.len()).unwrap_or(0);
        check(&written, size, key).await.map_err(|e| format!("the baseline run wrote a bad file: {e}"))?;
        let (blob, size) = self.store.adopt(written).await.map_err(|e| e.to_string())?;
        let _lease = self.store.lease(&blob);
        let entry = Entry { blob: blob.clone(), size, baseline: key.baseline.clone(), suite: key.suite.clone() };
        let (index, bytes) = (self.index.join(key.file_name()), serde_json::to_vec(&entry).unwrap_or_default());
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(index.parent().unwrap_or(Path::new(".")))?;
            alki_shared::fsutil::write_atomic(&index, &bytes)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!("Cannot record the baseline logits in the cache; they will be computed again next time.");
        }
        let path = self.store.path(&blob);
        let header = check(&path, size, key).await.map_err(|e| e.to_string())?;
        Ok(Cached { path, header, size, _lease })
    }

    /// Makes sure a baseline run for `key` with a vocabulary of `n_vocab` tokens fits on the disk beside
    /// `reserve` bytes, evicting cached logits (least recently used, none in use) when it does not.
    pub async fn make_room(&self, key: Key<'_>, n_vocab: u32, reserve: u64) -> Result<(), String> {
        let needed = base_logits_size(key.context_size, n_vocab, key.chunks).unwrap_or(u64::MAX);
        let dir = self.store.blobs_dir();
        if check_disk(dir, needed, reserve).await.is_ok() {
            return Ok(());
        }
        let mut entries = self.entries().await;
        entries.sort_by_key(|(_, _, used)| *used);
        for (file, entry, _) in entries {
            if self.store.evict_blob(&entry.blob).await {
                let _ = tokio::fs::remove_file(&file).await;
                tracing::info!(blob = %entry.blob, "Evicted cached baseline logits to make room.");
            }
            if check_disk(dir, needed, reserve).await.is_ok() {
                return Ok(());
            }
        }
        check_disk(dir, needed, reserve).await.map_err(|e| format!("baseline logits: {e}"))
    }

    /// Bytes of cached logits whose blobs are still in the store.
    pub async fn bytes(&self) -> u64 {
        let mut total = 0u64;
        for (_, entry, _) in self.entries().await {
            if self.store.size(&entry.blob).await == Some(entry.size) {
                total = total.saturating_add(entry.size);
            }
        }
        total
    }

    /// Every index entry with its file and the blob's last use.
    async fn entries(&self) -> Vec<(PathBuf, Entry, std::time::SystemTime)> {
        let Ok(mut dir) = tokio::fs::read_dir(&self.index).await else { return Vec::new() };
        let mut out = Vec::new();
        while let Ok(Some(file)) = dir.next_entry().await {
            let Ok(bytes) = tokio::fs::read(file.path()).await else { continue };
            let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else { continue };
            let used = tokio::fs::metadata(self.store.path(&entry.blob))
                .await
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            out.push((file.path(), entry, used));
        }
        out
    }
}

/// A logits file's header, checked against the suite and the file's size.
async fn check(path: &Path, size: u64, key: Key<'_>) -> Result<BaseLogitsHeader, BaseLogitsError> {
    let path = path.to_owned();
    let (context, chunks) = (key.context_size, key.chunks);
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| BaseLogitsError::Io(e.to_string()))?;
        let header = BaseLogitsHeader::read(std::io::BufReader::new(file))?;
        header.check(size, context, chunks, None)?;
        Ok(header)
    })
    .await
    .map_err(|e| BaseLogitsError::Io(e.to_string()))?
}
