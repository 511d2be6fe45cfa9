//! The local content store: blobs under `<data_dir>/content/blobs/sha256/<2 hex>/<hex>`, keyed by digest,
//! written through a temporary file that is hashed while written and renamed only when the digest matches.
//! Downloads go through [`PartialBlob`] under `partial/`, kept across attempts and restarts so that a pull
//! resumes from the bytes on disk; the whole file is verified before it becomes a blob. Each blob verified is
//! sealed (`seals/<hex>`: its file's identity, size and modification time); [`ContentStore::verified`] takes a
//! blob whose file still matches its seal as verified and hashes any other again, so reusing gigabytes
//! already on the device (a pre-staged bundle, a return to an earlier one) costs no rehash while any write to
//! a blob, or a file put in its place, is still caught. A file another program wrote (an evaluation's base
//! logits) becomes a blob with [`ContentStore::adopt`]; a blob being read holds a [`BlobLease`], and eviction
//! never removes it meanwhile.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use alki_shared::digest::{Digest, Hasher};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// Write buffer size: blobs go to disk in chunks of this size whatever the network's chunking.
const WRITE_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content for {digest} is {actual} bytes{}, but {expected} were announced", if *.more { " or more" } else { "" })]
    SizeMismatch { digest: Digest, expected: u64, actual: u64, more: bool },
    #[error("reading the content for {digest} failed: {source}")]
    Source { digest: Digest, source: std::io::Error },
    #[error("content store I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl StoreError {
    /// True when the disk is full (the operator frees space or lowers the bundle size).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
    }
}

/// A content-addressed blob store on the local disk.
#[derive(Clone, Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    tmp: PathBuf,
    partial: PathBuf,
    /// `signatures/<bundle hex>`: the digest of the signature manifest verified for that bundle, so it can
    /// be verified again from the store without a registry.
    signatures: PathBuf,
    /// `seals/<hex>`: the [`Seal`] of the blob's file when its content was last verified.
    seals: PathBuf,
    /// Blobs [`ContentStore::evict`] never removes whatever its caller keeps (pre-staged bundles).
    pinned: std::sync::Arc<std::sync::Mutex<HashSet<Digest>>>,
    /// Blobs a task reads right now (an evaluation's suite and base logits), with their reader counts:
    /// [`ContentStore::evict`] never removes them while a [`BlobLease`] is held.
    in_use: Arc<std::sync::Mutex<std::collections::HashMap<Digest, usize>>>,
    /// One pull at a time per store: two pulls appending to the same `partial/` file would corrupt it.
    pulls: std::sync::Arc<tokio::sync::Semaphore>,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

impl ContentStore {
    /// Opens (creating) the store at `<root>/blobs` and `<root>/tmp`, removing temporary files a crash left.
    pub fn open(root: &Path) -> Result<ContentStore, StoreError> {
        let store = ContentStore {
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
            partial: root.join("partial"),
            signatures: root.join("signatures"),
            seals: root.join("seals"),
            pinned: Default::default(),
            in_use: Default::default(),
            pulls: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        };
        std::fs::create_dir_all(&store.blobs).map_err(io_at(&store.blobs))?;
        std::fs::create_dir_all(&store.signatures).map_err(io_at(&store.signatures))?;
        std::fs::create_dir_all(&store.seals).map_err(io_at(&store.seals))?;
        // Seals half-written when the agent stopped (whole seals are renamed over their name).
        for entry in std::fs::read_dir(&store.seals).map_err(io_at(&store.seals))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if store.tmp.exists() {
            std::fs::remove_dir_all(&store.tmp).map_err(io_at(&store.tmp))?;
        }
        std::fs::create_dir_all(&store.tmp).map_err(io_at(&store.tmp))?;
        std::fs::create_dir_all(&store.partial).map_err(io_at(&store.partial))?;
        Ok(store)
    }

    /// The directory blobs live under (for free-space checks of the store's disk).
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs
    }

    /// Where the blob with this digest lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.storage_path())
    }

    /// Waits for this store's pull slot: pulls into one store run one at a time (a pre-staging download and
    /// an activation's pull of the same layer would otherwise append to the same partial file). The slot is a
    /// bounded-concurrency permit, not a lock on data: nothing else waits on it.
    pub async fn pull_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        // The semaphore is never closed; None would only mean that, and the caller then pulls unserialised.
        std::sync::Arc::clone(&self.pulls).acquire_owned().await.ok()
    }

    /// Replaces the set of pinned blobs: [`ContentStore::evict`] keeps them whatever its caller says.
    pub fn set_pinned(&self, pinned: HashSet<Digest>) {
        match self.pinned.lock() {
            Ok(mut guard) => *guard = pinned,
            Err(poisoned) => *poisoned.into_inner() = pinned,
        }
    }

    /// The pinned blobs and those in use now: eviction keeps both.
    fn pinned(&self) -> HashSet<Digest> {
        let mut pinned = match self.pinned.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let in_use = self.in_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pinned.extend(in_use.keys().cloned());
        pinned
    }

    /// Marks `digest` as in use until the lease is dropped: [`ContentStore::evict`] keeps it meanwhile,
    /// whoever asks (the device loop's budget, a pull making room).
    pub fn lease(&self, digest: &Digest) -> BlobLease {
        let mut in_use = self.in_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *in_use.entry(digest.clone()).or_insert(0) += 1;
        BlobLease { in_use: Arc::clone(&self.in_use), digest: digest.clone() }
    }

    /// Puts a verified file at `digest`'s blob path with `persist` (a rename), makes the rename durable and
    /// seals the blob; off the async threads.
    async fn install(
        &self,
        digest: &Digest,
        persist: impl FnOnce(&Path) -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), StoreError> {
        let target = self.path(digest);
        let dir = target.parent().map(Path::to_owned).unwrap_or_else(|| self.blobs.clone());
        let (moved, seal) = (target.clone(), self.seal_path(digest));
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            persist(&moved)?;
            alki_shared::fsutil::sync_dir(&dir)?;
            if let Err(e) = write_seal(&moved, &seal) {
                tracing::debug!(error = %e, blob = %moved.display(), "Cannot seal a verified blob.");
            }
            Ok(())
        })
        .await
        .map_err(|join| io_at(&target)(std::io::Error::other(join)))?
        .map_err(io_at(&target))
    }

    /// Removes one blob unless it is pinned or in use; true when it is gone.
    pub async fn evict_blob(&self, digest: &Digest) -> bool {
        !self.pinned().contains(digest) && self.remove(digest).await.is_ok()
    }

    /// A new empty file in the store's temporary directory (removed when dropped, and at the next open), for a
    /// program that writes content the store then takes with [`ContentStore::adopt`].
    pub fn scratch(&self, prefix: &str) -> Result<tempfile::TempPath, StoreError> {
        let file = tempfile::Builder::new().prefix(prefix).tempfile_in(&self.tmp).map_err(io_at(&self.tmp))?;
        Ok(file.into_temp_path())
    }

    /// Takes a file written by another program into the store as a blob: hashed, renamed to its digest's
    /// path (it must be on the store's file system, as [`ContentStore::scratch`] files are), synced and
    /// sealed. Returns the blob's digest and size.
    pub async fn adopt(&self, file: tempfile::TempPath) -> Result<(Digest, u64), StoreError> {
        let (digest, size) = alki_shared::digest::hash_file(&file).await.map_err(io_at(&file))?;
        self.install(&digest, move |target| file.persist(target).map_err(|e| e.error)).await?;
        Ok((digest, size))
    }

    /// The digest of the signature manifest last verified for `bundle`, if one was recorded. Only a pointer:
    /// whoever reads it checks the manifest's bytes against it and the signatures against the trust policy.
    pub async fn signature_of(&self, bundle: &Digest) -> Option<Digest> {
        let text = tokio::fs::read_to_string(self.signatures.join(bundle.hex())).await.ok()?;
        text.trim().parse().ok()
    }

    /// Records that `signature` (a signature manifest in this store) verified for `bundle`; durable.
    pub async fn set_signature_of(&self, bundle: &Digest, signature: &Digest) -> Result<(), StoreError> {
        let path = self.signatures.join(bundle.hex());
        let text = signature.to_string();
        let target = path.clone();
        tokio::task::spawn_blocking(move || alki_shared::fsutil::write_atomic(&target, text.as_bytes()))
            .await
            .map_err(|join| io_at(&path)(std::io::Error::other(join)))?
            .map_err(io_at(&path))
    }

    /// True when the blob is present. Blobs are only ever renamed into place after their digest was checked.
    pub async fn contains(&self, digest: &Digest) -> bool {
        tokio::fs::metadata(self.path(digest)).await.is_ok_and(|m| m.is_file())
    }

    /// The blob's size, if present.
    pub async fn size(&self, digest: &Digest) -> Option<u64> {
        tokio::fs::metadata(self.path(digest)).await.ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    fn seal_path(&self, digest: &Digest) -> PathBuf {
        self.seals.join(digest.hex())
    }

    /// True when the blob is present with `size` bytes and its content is known to match its digest: its
    /// file is unchanged since it was verified (its seal), or it is hashed now and matches (and is sealed
    /// again). A blob that no longer matches, or has another size, is removed and this returns false, so the
    /// caller fetches it anew (or, without a registry, refuses to use it).
    pub async fn verified(&self, digest: &Digest, size: u64) -> Result<bool, StoreError> {
        let path = self.path(digest);
        let meta = match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => meta,
            _ => return Ok(false),
        };
        if meta.len() == size {
            let sealed = tokio::fs::read_to_string(self.seal_path(digest)).await.ok().and_then(|t| Seal::parse(&t));
            if sealed == Some(Seal::of(&meta)) {
                return Ok(true);
            }
            match alki_shared::digest::hash_file(&path).await {
                Ok((actual, len)) if &actual == digest && len == size => {
                    self.seal(digest).await;
                    return Ok(true);
                }
                _ => tracing::warn!(blob = %digest, "A stored blob no longer matches its digest; it is removed."),
            }
        }
        self.remove(digest).await?;
        Ok(false)
    }

    /// Seals the blob as it is now (just verified). Best effort: without a seal the blob is hashed again on
    /// its next use, nothing worse.
    async fn seal(&self, digest: &Digest) {
        let (blob, seal) = (self.path(digest), self.seal_path(digest));
        let sealed = tokio::task::spawn_blocking(move || write_seal(&blob, &seal)).await;
        if let Ok(Err(e)) = sealed {
            tracing::debug!(%digest, error = %e, "Cannot seal a verified blob; it will be hashed again on use.");
        }
    }

    /// Removes a blob (e.g. one whose size disagrees with its descriptor) and its seal.
    pub async fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let _ = tokio::fs::remove_file(self.seal_path(digest)).await;
        let path = self.path(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Marks a blob as used now (its modification time), for least-recently-used eviction. A blob that still
    /// matched its seal is sealed again with the new time; one that did not stays unsealed (hashed on use).
    pub async fn touch(&self, digest: &Digest) {
        let (path, seal) = (self.path(digest), self.seal_path(digest));
        let touched = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&path)?;
            let sealed = std::fs::read_to_string(&seal).ok().and_then(|t| Seal::parse(&t));
            let was_sealed = sealed.is_some() && sealed == Some(Seal::of(&file.metadata()?));
            file.set_modified(SystemTime::now())?;
            if was_sealed { write_seal(&path, &seal) } else { Ok(()) }
        })
        .await;
        if let Ok(Err(e)) = touched {
            tracing::debug!(%digest, error = %e, "Cannot mark a blob as used.");
        }
    }

    /// Every blob in the store with its size and last use.
    pub async fn list(&self) -> Result<Vec<StoredBlob>, StoreError> {
        let root = self.blobs.join("sha256");
        let walked = root.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<StoredBlob>> {
            let mut out = Vec::new();
            let shards = match std::fs::read_dir(&walked) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            };
            for shard in shards {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(shard.path())? {
                    let entry = entry?;
                    let meta = entry.metadata()?;
                    let name = entry.file_name();
                    let Ok(digest) = format!("sha256:{}", name.to_string_lossy()).parse::<Digest>() else { continue };
                    if meta.is_file() {
                        let last_used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        out.push(StoredBlob { digest, size: meta.len(), last_used });
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|join| io_at(&root)(std::io::Error::other(join)))?
        .map_err(io_at(&root))
    }

    /// Removes the least recently used blobs not in `keep` until the store holds at most `budget` bytes
    /// (or nothing more can go). Returns what was removed and the bytes freed.
    pub async fn evict(&self, keep: &HashSet<Digest>, budget: u64) -> Result<(Vec<Digest>, u64), StoreError> {
        let mut keep = keep.clone();
        keep.extend(self.pinned());
        let blobs = self.list().await?;
        let chosen = choose_evictions(&blobs, &keep, budget);
        let mut freed = 0;
        for digest in &chosen {
            let size = blobs.iter().find(|b| &b.digest == digest).map(|b| b.size).unwrap_or(0);
            self.remove(digest).await?;
            freed += size;
        }
        Ok((chosen, freed))
    }

    /// Opens the download of a blob of `size` bytes, resuming from what an earlier attempt left under
    /// `partial/` (hashed again now, so the final check covers the whole file). A leftover longer than `size`
    /// cannot be a prefix and is dropped.
    pub async fn partial(&self, expected: &Digest, size: u64) -> Result<PartialBlob, StoreError> {
        let path = self.partial.join(expected.hex());
        let owned = path.clone();
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<(std::fs::File, Hasher)> {
            use std::io::{Read, Seek};
            let mut file =
                std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&owned)?;
            let mut hasher = Hasher::new();
            if file.metadata()?.len() <= size {
                let mut buf = vec![0u8; WRITE_BUFFER];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
            }
            if hasher.len() > size || file.metadata()?.len() != hasher.len() {
                hasher = Hasher::new();
            }
            file.set_len(hasher.len())?;
            file.seek(std::io::SeekFrom::End(0))?;
            Ok((file, hasher))
        })
        .await
        .map_err(|join| io_at(&path)(std::io::Error::other(join)))?
        .map_err(io_at(&path))?;
        let (file, hasher) = opened;
        let writer = Arc::new(file.try_clone().map_err(io_at(&path))?);
        let file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, tokio::fs::File::from_std(file));
        Ok(PartialBlob {
            writer,
            path,
            seal_path: self.seal_path(expected),
            final_path: self.path(expected),
            expected: expected.clone(),
            size,
            hasher,
            file,
            unsynced: 0,
            writeback: None,
        })
    }

    /// Stores small in-memory content (manifests, runtime layers), checking its digest.
    pub async fn write_bytes(&self, expected: &Digest, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let chunk = Bytes::copy_from_slice(bytes);
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(chunk)]);
        self.write_stream(expected, Some(bytes.len() as u64), stream, |_| {}).await
    }

    /// Streams content into the store: a temporary file under `tmp/`, hashed while written through a
    /// fixed-size buffer, fsynced, and renamed to its digest's path only if digest (and `expected_size`,
    /// when given) match. On any error nothing is left behind. More bytes than `expected_size` stop the
    /// transfer at once. `progress` is called with the bytes written so far.
    pub async fn write_stream<S>(
        &self,
        expected: &Digest,
        expected_size: Option<u64>,
        stream: S,
        mut progress: impl FnMut(u64),
    ) -> Result<PathBuf, StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>>,
    {
        let final_path = self.path(expected);
        // The temporary file is deleted when `tmp` drops: on error, on cancellation, on mismatch.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}.", expected.hex()))
            .suffix(".partial")
            .tempfile_in(&self.tmp)
            .map_err(io_at(&self.tmp))?;
        let std_file = tmp.as_file().try_clone().map_err(io_at(tmp.path()))?;
        let mut file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, tokio::fs::File::from_std(std_file));
        let mut hasher = Hasher::new();
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| StoreError::Source { digest: expected.clone(), source })?;
            if let Some(size) = expected_size
                && hasher.len() + chunk.len() as u64 > size
            {
                return Err(StoreError::SizeMismatch {
                    digest: expected.clone(),
                    expected: size,
                    actual: hasher.len() + chunk.len() as u64,
                    more: true,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_at(tmp.path()))?;
            progress(hasher.len());
        }
        file.flush().await.map_err(io_at(tmp.path()))?;
        let file = file.into_inner();
        file.sync_all().await.map_err(io_at(tmp.path()))?;
        drop(file);
        let len = hasher.len();
        if let Some(size) = expected_size
            && len != size
        {
            return Err(StoreError::SizeMismatch {
                digest: expected.clone(),
                expected: size,
                actual: len,
                more: false,
            });
        }
        let actual = hasher.finish();
        if &actual != expected {
            return Err(StoreError::DigestMismatch { expected: expected.clone(), actual });
        }
        self.install(expected, move |target| tmp.persist(target).map(drop).map_err(|e| e.error)).await?;
        Ok(final_path)
    }
}

/// What a blob's file looked like when its content was verified: the same file (device and inode), size and
/// modification time. Any write through the file system moves the modification time and a file put in the
/// blob's place is another inode; a hard link (the variant directories) changes neither. It guards against
/// accidents (an edit, a copy over the blob, a partial restore), not against someone resetting the time on
/// purpose, who could as well rewrite the seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seal {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Seal {
    fn of(meta: &std::fs::Metadata) -> Seal {
        use std::os::unix::fs::MetadataExt as _;
        Seal { dev: meta.dev(), ino: meta.ino(), size: meta.len(), mtime: meta.mtime(), mtime_nsec: meta.mtime_nsec() }
    }

    fn encode(&self) -> String {
        format!("{} {} {} {} {}\n", self.dev, self.ino, self.size, self.mtime, self.mtime_nsec)
    }

    fn parse(text: &str) -> Option<Seal> {
        let mut fields = text.split_ascii_whitespace();
        let mut next = || fields.next()?.parse::<i128>().ok();
        let seal = Seal {
            dev: u64::try_from(next()?).ok()?,
            ino: u64::try_from(next()?).ok()?,
            size: u64::try_from(next()?).ok()?,
            mtime: i64::try_from(next()?).ok()?,
            mtime_nsec: i64::try_from(next()?).ok()?,
        };
        fields.next().is_none().then_some(seal)
    }
}

/// Writes the seal of `blob` as it is now to `seal` (a temporary file renamed over it: a reader sees a whole
/// seal or none). Not fsynced: a seal lost in a power cut only means one more hash.
fn write_seal(blob: &Path, seal: &Path) -> std::io::Result<()> {
    let text = Seal::of(&std::fs::metadata(blob)?).encode();
    let dir = seal.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.persist(seal).map_err(|e| e.error)?;
    Ok(())
}

/// Starts writing `len` bytes at `offset` of `file` to the disk without waiting for them. Only a head start
/// for the final fsync, which alone makes the data durable and reports write errors; so a failure here
/// (a filesystem that does not support it) changes nothing and is not an error.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (Ok(offset), Ok(len)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: the descriptor belongs to `file`, borrowed for the whole call; the call touches no memory of ours.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    Ok(())
}

/// A blob in use: [`ContentStore::evict`] keeps it until every lease on it is dropped.
#[derive(Debug)]
pub struct BlobLease {
    in_use: Arc<std::sync::Mutex<std::collections::HashMap<Digest, usize>>>,
    digest: Digest,
}

impl BlobLease {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl Drop for BlobLease {
    fn drop(&mut self) {
        let mut in_use = self.in_use.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = in_use.get_mut(&self.digest) {
            *count -= 1;
            if *count == 0 {
                in_use.remove(&self.digest);
            }
        }
    }
}

/// A blob in the store, as eviction sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
    /// The file's modification time: set when written and by [`ContentStore::touch`].
    pub last_used: SystemTime,
}

/// The blobs to remove so that the store holds at most `budget` bytes: least recently used first, never
/// one in `keep`. Pure.
pub fn choose_evictions(blobs: &[StoredBlob], keep: &HashSet<Digest>, budget: u64) -> Vec<Digest> {
    let mut total: u64 = blobs.iter().map(|b| b.size).fold(0, u64::saturating_add);
    let mut candidates: Vec<&StoredBlob> = blobs.iter().filter(|b| !keep.contains(&b.digest)).collect();
    candidates.sort_by_key(|b| (b.last_used, b.digest.as_str().to_owned()));
    let mut chosen = Vec::new();
    for blob in candidates {
        if total <= budget {
            break;
        }
        total = total.saturating_sub(blob.size);
        chosen.push(blob.digest.clone());
    }
    chosen
}

/// A blob being downloaded into `partial/<hex>`: appended to across attempts, hashed as it grows, and
/// renamed into the store by [`PartialBlob::finish`] only when its size and digest match.
pub struct PartialBlob {
    path: PathBuf,
    final_path: PathBuf,
    seal_path: PathBuf,
    expected: Digest,
    size: u64,
    hasher: Hasher,
    file: tokio::io::BufWriter<tokio::fs::File>,
    /// The same open file for [`PartialBlob::append`]'s writes on a blocking thread, side by side with the
    /// hashing (a duplicate handle: it shares the file position, so `restart` rewinds both).
    writer: Arc<std::fs::File>,
    /// Bytes written since the last writeback was started.
    unsynced: u64,
    /// A writeback being started (see [`WRITEBACK_EVERY`]); it may wait while the disk's queue is full.
    writeback: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// A batch being hashed and written by [`PartialBlob::launch`].
struct BatchInFlight {
    len: u64,
    hashing: tokio::task::JoinHandle<Hasher>,
    writing: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// [`PartialBlob::append`] hashes and writes this many received bytes at a time: large enough that handing
/// a batch to two threads costs nothing next to hashing it, small enough that a slow link still writes (and
/// so can resume from) every second or so.
const APPEND_BATCH: u64 = 1 << 20;

/// Once this many bytes are written since the last writeback started, the disk is told to start writing
/// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait): the disk works while the download
/// continues with its queue kept full, so the final fsync (the one that makes the blob durable, and reports
/// any write error) has almost nothing left. The kernel alone would not start until gigabytes are dirty.
const WRITEBACK_EVERY: u64 = 8 << 20;

impl PartialBlob {
    /// Bytes on disk so far: where the next request resumes.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hasher.len() == 0
    }

    /// Drops what was downloaded (the server ignored the range, or the content did not verify).
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        self.wait_writeback().await?;
        self.file.flush().await.map_err(io_at(&self.path))?;
        let file = self.file.get_mut();
        file.set_len(0).await.map_err(io_at(&self.path))?;
        file.seek(std::io::SeekFrom::Start(0)).await.map_err(io_at(&self.path))?;
        self.hasher = Hasher::new();
        Ok(())
    }

    /// Appends a stream in batches of up to [`APPEND_BATCH`] bytes: each batch is hashed and written on two
    /// blocking threads at once, with no copy (the received buffers are shared), while the next batch is
    /// received. More bytes than the blob's size stop at once. When the stream fails, the bytes received so
    /// far are written for the next attempt to resume from.
    pub async fn append<S>(&mut self, stream: S, mut progress: impl FnMut(u64)) -> Result<(), StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>>,
    {
        let mut stream = std::pin::pin!(stream);
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batch_len = 0u64;
        let mut in_flight: Option<BatchInFlight> = None;
        loop {
            let ended = match stream.next().await {
                Some(Ok(chunk)) => {
                    let received = self.hasher.len() + in_flight.as_ref().map_or(0, |b| b.len) + batch_len;
                    let after = received + chunk.len() as u64;
                    if after > self.size {
                        self.land(in_flight.take()).await?;
                        return Err(StoreError::SizeMismatch {
                            digest: self.expected.clone(),
                            expected: self.size,
                            actual: after,
                            more: true,
                        });
                    }
                    batch_len += chunk.len() as u64;
                    batch.push(chunk);
                    // Received, not yet on disk: progress is for people; resumption uses `len()`.
                    progress(after);
                    false
                }
                Some(Err(source)) => {
                    self.land(in_flight.take()).await?;
                    let rest = self.launch(std::mem::take(&mut batch));
                    self.land(Some(rest)).await?;
                    return Err(StoreError::Source { digest: self.expected.clone(), source });
                }
                None => true,
            };
            if batch_len >= APPEND_BATCH || (ended && !batch.is_empty()) {
                // One batch in flight at a time: its hash must end before the next one's starts.
                self.land(in_flight.take()).await?;
                in_flight = Some(self.launch(std::mem::take(&mut batch)));
                batch_len = 0;
            }
            if ended {
                return self.land(in_flight.take()).await;
            }
        }
    }

    /// Starts hashing and writing `pieces` side by side on two blocking threads; the hasher travels with
    /// the batch and comes back in [`PartialBlob::land`], so the hash covers exactly what was written.
    fn launch(&mut self, pieces: Vec<Bytes>) -> BatchInFlight {
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let mut hasher = std::mem::take(&mut self.hasher);
        let to_hash = pieces.clone();
        let hashing = tokio::task::spawn_blocking(move || {
            for piece in &to_hash {
                hasher.update(piece);
            }
            hasher
        });
        let writer = self.writer.clone();
        let writing = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file: &std::fs::File = &writer;
            for piece in &pieces {
                file.write_all(piece)?;
            }
            Ok(())
        });
        BatchInFlight { len, hashing, writing }
    }

    /// Waits for a launched batch (if any) to be hashed and written, then starts the disk's writeback
    /// when enough is written. After a write error the file may hold less than was hashed: the caller
    /// gives this download up, and the next [`ContentStore::partial`] hashes what is on disk again.
    async fn land(&mut self, batch: Option<BatchInFlight>) -> Result<(), StoreError> {
        let Some(batch) = batch else { return Ok(()) };
        let (hashed, written) = (batch.hashing.await, batch.writing.await);
        self.hasher = hashed.map_err(|join| io_at(&self.path)(std::io::Error::other(join)))?;
        written.map_err(|join| io_at(&self.path)(std::io::Error::other(join)))?.map_err(io_at(&self.path))?;
        self.unsynced += batch.len;
        self.start_writeback().await
    }

    /// Starts a background sync when enough is written and none is running; reports a finished one's error.
    async fn start_writeback(&mut self) -> Result<(), StoreError> {
        if self.unsynced < WRITEBACK_EVERY || self.writeback.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        self.wait_writeback().await?;
        let writer = self.writer.clone();
        let end = self.hasher.len();
        let start = end.saturating_sub(self.unsynced);
        self.writeback = Some(tokio::task::spawn_blocking(move || start_writeback(&writer, start, end - start)));
        self.unsynced = 0;
        Ok(())
    }

    /// Waits for the background sync, if any, and returns its error.
    async fn wait_writeback(&mut self) -> Result<(), StoreError> {
        let Some(handle) = self.writeback.take() else { return Ok(()) };
        let result = handle.await.map_err(|join| io_at(&self.path)(std::io::Error::other(join)))?;
        result.map_err(io_at(&self.path))
    }

    /// Verifies the whole file (size, then digest) and renames it into the store, durably. On a digest
    /// mismatch the download restarts from zero next time.
    pub async fn finish(&mut self) -> Result<PathBuf, StoreError> {
        self.wait_writeback().await?;
        self.file.flush().await.map_err(io_at(&self.path))?;
        self.file.get_ref().sync_all().await.map_err(io_at(&self.path))?;
        let len = self.hasher.len();
        if len != self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.clone(),
                expected: self.size,
                actual: len,
                more: false,
            });
        }
        let actual = std::mem::replace(&mut self.hasher, Hasher::new()).finish();
        if actual != self.expected {
            self.restart().await?;
            return Err(StoreError::DigestMismatch { expected: self.expected.clone(), actual });
        }
        let dir = self.final_path.parent().map(Path::to_owned).unwrap_or_default();
        tokio::fs::create_dir_all(&dir).await.map_err(io_at(&dir))?;
        tokio::fs::rename(&self.path, &self.final_path).await.map_err(io_at(&self.final_path))?;
        let synced = dir.clone();
        let (blob, seal) = (self.final_path.clone(), self.seal_path.clone());
        tokio::task::spawn_blocking(move || {
            alki_shared::fsutil::sync_dir(&synced)?;
            if let Err(e) = write_seal(&blob, &seal) {
                tracing::debug!(error = %e, blob = %blob.display(), "Cannot seal a verified blob.");
            }
            Ok(())
        })
        .await
        .map_err(|join| io_at(&dir)(std::io::Error::other(join)))?
        .map_err(io_at(&dir))?;
        Ok(self.final_path.clone())
    }

    /// Removes the partial file (content that can never verify, e.g. longer than announced).
    pub async fn discard(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.path).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read_dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() { stack.push(path) } else { out.push(path) }
            }
        }
        out
    }

    #[tokio::test]
    async fn matching_content_lands_at_its_digest_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"hello world");
        assert!(!store.contains(&digest).await);
        let mut seen = Vec::new();
        let path = store
            .write_stream(&digest, Some(11), chunks(&[b"hello", b" world"]), |n| seen.push(n))
            .await
            .expect("write");
        assert_eq!(path, dir.path().join("blobs").join(digest.storage_path()));
        assert_eq!(std::fs::read(&path).expect("read"), b"hello world");
        assert_eq!(seen, vec![5, 11]);
        assert!(store.contains(&digest).await);
        assert_eq!(store.size(&digest).await, Some(11));
        assert!(files_under(&dir.path().join("tmp")).is_empty());
    }

    #[tokio::test]
    async fn a_mismatch_leaves_nothing_visible_and_names_both_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let expected = Digest::of(b"good bytes");
        let err = store.write_stream(&expected, None, chunks(&[b"evil bytes"]), |_| {}).await.expect_err("mismatch");
        match err {
            StoreError::DigestMismatch { expected: e, actual } => {
                assert_eq!(e, expected);
                assert_eq!(actual, Digest::of(b"evil bytes"));
            }
            other => panic!("expected DigestMismatch, got {other}"),
        }
        assert!(!store.contains(&expected).await);
        assert!(files_under(dir.path()).is_empty(), "no blob and no temporary file: {:?}", files_under(dir.path()));
    }

    #[tokio::test]
    async fn sizes_are_enforced_while_streaming() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"abcdef");
        let err = store.write_stream(&digest, Some(3), chunks(&[b"ab", b"cdef"]), |_| {}).await.expect_err("too long");
        assert!(matches!(err, StoreError::SizeMismatch { expected: 3, more: true, .. }), "{err}");
        let err = store.write_stream(&digest, Some(10), chunks(&[b"abcdef"]), |_| {}).await.expect_err("too short");
        assert!(matches!(err, StoreError::SizeMismatch { expected: 10, actual: 6, more: false, .. }), "{err}");
        assert!(files_under(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_failing_source_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"abc");
        let stream = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"ab")),
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset")),
        ]);
        let err = store.write_stream(&digest, None, stream, |_| {}).await.expect_err("source error");
        assert!(matches!(err, StoreError::Source { .. }), "{err}");
        assert!(files_under(dir.path()).is_empty());
    }

    #[test]
    fn eviction_takes_the_least_recently_used_blobs_not_kept_until_under_budget() {
        let at = |secs| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let blob =
            |name: &str, size, used| StoredBlob { digest: Digest::of(name.as_bytes()), size, last_used: at(used) };
        let blobs = vec![blob("active", 50, 1), blob("old", 30, 2), blob("older", 20, 1), blob("recent", 40, 9)];
        let keep: HashSet<Digest> = [Digest::of(b"active")].into();
        // 140 bytes; budget 100: the oldest unkept (20 bytes) then the next (30) go.
        assert_eq!(choose_evictions(&blobs, &keep, 100), vec![Digest::of(b"older"), Digest::of(b"old")]);
        assert_eq!(choose_evictions(&blobs, &keep, 140), Vec::<Digest>::new(), "within budget");
        assert_eq!(choose_evictions(&blobs, &keep, 0).len(), 3, "everything but what is kept");
    }

    #[tokio::test]
    async fn evict_removes_files_and_list_sees_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let (a, b) = (Digest::of(b"aaaa"), Digest::of(b"bb"));
        store.write_bytes(&a, b"aaaa").await.expect("a");
        store.write_bytes(&b, b"bb").await.expect("b");
        assert_eq!(store.list().await.expect("list").len(), 2);
        let (removed, freed) = store.evict(&[b.clone()].into(), 0).await.expect("evict");
        assert_eq!((removed, freed), (vec![a.clone()], 4));
        assert!(!store.contains(&a).await && store.contains(&b).await);
    }

    #[tokio::test]
    async fn leased_blobs_survive_eviction_until_released_and_adopted_files_become_sealed_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let scratch = store.scratch("logits").expect("scratch");
        std::fs::write(&scratch, b"written by a tool").expect("tool writes");
        let (digest, size) = store.adopt(scratch).await.expect("adopt");
        assert_eq!((digest.clone(), size), (Digest::of(b"written by a tool"), 17));
        assert!(store.verified(&digest, 17).await.expect("verified"));
        assert_eq!(seal_on_disk(&store, &digest), Some(seal_now(&store, &digest)), "sealed when adopted");

        let lease = store.lease(&digest);
        let second = store.lease(&digest);
        let (removed, _) = store.evict(&HashSet::new(), 0).await.expect("evict");
        assert!(removed.is_empty() && store.contains(&digest).await, "in use: kept");
        drop(lease);
        assert!(store.evict(&HashSet::new(), 0).await.expect("evict").0.is_empty(), "one reader is left");
        drop(second);
        let (removed, freed) = store.evict(&HashSet::new(), 0).await.expect("evict");
        assert_eq!((removed, freed), (vec![digest.clone()], 17));
    }

    #[tokio::test]
    async fn a_partial_download_survives_reopening_and_is_verified_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let digest = Digest::of(b"hello world");
        {
            let store = ContentStore::open(dir.path()).expect("open");
            let mut partial = store.partial(&digest, 11).await.expect("partial");
            let err = partial
                .append(
                    futures::stream::iter(vec![
                        Ok(Bytes::from_static(b"hello")),
                        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut")),
                    ]),
                    |_| {},
                )
                .await
                .expect_err("cut");
            assert!(matches!(err, StoreError::Source { .. }), "{err}");
        }
        let store = ContentStore::open(dir.path()).expect("reopen");
        let mut partial = store.partial(&digest, 11).await.expect("partial");
        assert_eq!(partial.len(), 5, "the bytes before the cut are kept");
        partial.append(chunks(&[b" world"]), |_| {}).await.expect("rest");
        let path = partial.finish().await.expect("verified");
        assert_eq!(std::fs::read(path).expect("read"), b"hello world");
    }

    #[tokio::test]
    async fn batches_in_flight_are_written_whole_before_a_cut_is_reported() {
        // Several batches, the last one in flight when the source fails: every byte received before the cut
        // is on disk, in order, and the resumed download verifies.
        let content: Vec<u8> = (0..(5 * APPEND_BATCH + 12_345)).map(|i| (i * 7 % 251) as u8).collect();
        let digest = Digest::of(&content);
        let cut_at = 4 * APPEND_BATCH as usize + 4_096 * 3;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let mut partial = store.partial(&digest, content.len() as u64).await.expect("partial");
        let mut before_cut: Vec<Result<Bytes, std::io::Error>> =
            content[..cut_at].chunks(4_096).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        before_cut.push(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut")));
        let err = partial.append(futures::stream::iter(before_cut), |_| {}).await.expect_err("cut");
        assert!(matches!(err, StoreError::Source { .. }), "{err}");
        assert_eq!(partial.len(), cut_at as u64);
        assert_eq!(std::fs::read(dir.path().join("partial").join(digest.hex())).expect("read"), content[..cut_at]);

        let rest: Vec<Result<Bytes, std::io::Error>> =
            content[cut_at..].chunks(100_000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        partial.append(futures::stream::iter(rest), |_| {}).await.expect("rest");
        let path = partial.finish().await.expect("verified");
        assert_eq!(std::fs::read(path).expect("read"), content);
    }

    fn seal_on_disk(store: &ContentStore, digest: &Digest) -> Option<Seal> {
        std::fs::read_to_string(store.seal_path(digest)).ok().and_then(|t| Seal::parse(&t))
    }

    fn seal_now(store: &ContentStore, digest: &Digest) -> Seal {
        Seal::of(&std::fs::metadata(store.path(digest)).expect("blob"))
    }

    #[tokio::test]
    async fn a_verified_blob_is_sealed_and_trusted_while_its_file_is_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"weights");
        store.write_bytes(&digest, b"weights").await.expect("write");
        assert_eq!(seal_on_disk(&store, &digest), Some(seal_now(&store, &digest)), "sealed when written");

        // Same bytes count, other content, and the modification time put back as it was: the file looks
        // unchanged, so it is taken as verified without being hashed (the seal's documented limit).
        let path = store.path(&digest);
        let mtime = std::fs::metadata(&path).expect("meta").modified().expect("mtime");
        let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        (&file).write_all(b"WEIGHTS").expect("write");
        file.set_modified(mtime).expect("set mtime");
        drop(file);
        assert!(store.verified(&digest, 7).await.expect("verified"), "not hashed again");

        // A used blob is sealed again with its new modification time.
        store.touch(&digest).await;
        assert_eq!(seal_on_disk(&store, &digest), Some(seal_now(&store, &digest)));
        assert!(store.verified(&digest, 7).await.expect("verified"));
    }

    #[tokio::test]
    async fn a_blob_written_to_after_it_was_sealed_is_hashed_again_and_removed_when_damaged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"weights");
        store.write_bytes(&digest, b"weights").await.expect("write");
        let path = store.path(&digest);
        let sealed = seal_now(&store, &digest);
        // An edit in place moves the modification time.
        let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        (&file).write_all(b"WEIGHTS").expect("write");
        file.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(sealed.mtime as u64 + 60))
            .expect("set mtime");
        drop(file);
        // Touching does not bless it: the seal is only renewed for a blob that matched it.
        store.touch(&digest).await;
        assert!(!store.verified(&digest, 7).await.expect("verified"), "hashed, and it does not match");
        assert!(!path.exists() && seal_on_disk(&store, &digest).is_none(), "blob and seal removed");

        // The wrong size is never trusted, sealed or not.
        store.write_bytes(&digest, b"weights").await.expect("write");
        assert!(!store.verified(&digest, 8).await.expect("verified"));
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_good_blob_without_its_seal_or_put_back_as_a_new_file_is_hashed_once_and_sealed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"weights");
        store.write_bytes(&digest, b"weights").await.expect("write");
        std::fs::remove_file(store.seal_path(&digest)).expect("unseal");
        assert!(store.verified(&digest, 7).await.expect("verified"));
        assert_eq!(seal_on_disk(&store, &digest), Some(seal_now(&store, &digest)), "sealed again");

        // The same bytes restored as a new file (another inode): hashed, matches, sealed for the new file.
        let path = store.path(&digest);
        std::fs::remove_file(&path).expect("unlink");
        std::fs::write(&path, b"weights").expect("restore");
        assert_ne!(seal_on_disk(&store, &digest), Some(seal_now(&store, &digest)));
        assert!(store.verified(&digest, 7).await.expect("verified"));
        assert_eq!(seal_on_disk(&store, &digest), Some(seal_now(&store, &digest)));
        assert!(!store.verified(&Digest::of(b"absent"), 1).await.expect("verified"), "absent is not verified");
    }

    #[test]
    fn seals_parse_only_whole_records() {
        let seal = Seal { dev: 2049, ino: 77, size: 1 << 40, mtime: -5, mtime_nsec: 999_999_999 };
        assert_eq!(Seal::parse(&seal.encode()), Some(seal));
        for torn in ["", "2049 77", "2049 77 1 2 3 4", "a b c d e", "2049 77 -1 0 0"] {
            assert_eq!(Seal::parse(torn), None, "{torn:?}");
        }
    }

    #[tokio::test]
    async fn open_cleans_leftover_temporary_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir");
        std::fs::write(dir.path().join("tmp/leftover.partial"), b"x").expect("write");
        std::fs::create_dir_all(dir.path().join("seals")).expect("mkdir");
        std::fs::write(dir.path().join("seals/.tmpAbC123"), b"20").expect("write");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"{}");
        store.write_bytes(&digest, b"{}").await.expect("write");
        let mut files = files_under(dir.path());
        files.sort();
        assert_eq!(files, vec![store.path(&digest), store.seal_path(&digest)]);
    }
}
