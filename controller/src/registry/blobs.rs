//! Blob files on disk: content-addressed under `<data_dir>/blobs/sha256/<2 hex>/<hex>`, received into
//! temporary files under `<data_dir>/uploads/` (hashed as they are written), fsynced, then renamed in.
//!
//! A temporary file belongs to exactly one [`Partial`] or [`Finished`]; dropping either deletes the file,
//! so an upload that fails, is cancelled or is abandoned never leaves anything behind.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use alki_shared::digest::{Digest, Hasher};
use alki_shared::fsutil;
use bytes::Bytes;

use super::RegistryError;

/// Where blob files and upload temporaries live, and the lock that orders making a blob file appear
/// (rename + index link) against deleting one (index unlink + file removal).
pub struct BlobStore {
    blobs: PathBuf,
    uploads: PathBuf,
    files: Mutex<()>,
}

impl BlobStore {
    /// Creates the directories and deletes upload temporaries a crash left behind.
    pub fn open(data_dir: &Path) -> Result<BlobStore, RegistryError> {
        let blobs = data_dir.join("blobs");
        let uploads = data_dir.join("uploads");
        std::fs::create_dir_all(blobs.join("sha256")).map_err(io(&blobs))?;
        std::fs::create_dir_all(&uploads).map_err(io(&uploads))?;
        let mut removed = 0usize;
        for entry in std::fs::read_dir(&uploads).map_err(io(&uploads))? {
            let path = entry.map_err(io(&uploads))?.path();
            let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            result.map_err(io(&path))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, dir = %uploads.display(), "Deleted unfinished uploads left by an earlier run.");
        }
        Ok(BlobStore { blobs, uploads, files: Mutex::new(()) })
    }

    /// Where a blob's file is (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.storage_path())
    }

    pub fn uploads_dir(&self) -> &Path {
        &self.uploads
    }

    /// Held (briefly, on blocking threads only) while a blob file appears or disappears together with
    /// its index entry, so a delete never removes a file that a concurrent push just linked.
    pub fn lock_files(&self) -> MutexGuard<'_, ()> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves a finished upload into place (or drops it when the content is already stored). Blocking;
    /// the caller holds [`BlobStore::lock_files`].
    pub fn persist(&self, mut finished: Finished) -> Result<(), RegistryError> {
        let target = self.path(&finished.digest);
        if target.exists() {
            // The same content is already stored: the temporary is not needed.
            finished.armed = false;
            log_removal(&finished.path, std::fs::remove_file(&finished.path));
            return Ok(());
        }
        self.ensure_parent(&target)?;
        std::fs::rename(&finished.path, &target).map_err(io(&target))?;
        finished.armed = false;
        let parent = target.parent().unwrap_or(&self.blobs);
        fsutil::sync_dir(parent).map_err(io(parent))
    }

    /// Writes bytes held in memory (a manifest) as the blob file of `digest`, durably, unless present.
    /// Blocking; the caller holds [`BlobStore::lock_files`].
    pub fn write_small(&self, digest: &Digest, bytes: &[u8]) -> Result<(), RegistryError> {
        let target = self.path(digest);
        if target.exists() {
            return Ok(());
        }
        self.ensure_parent(&target)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.uploads).map_err(io(&self.uploads))?;
        tmp.write_all(bytes).map_err(io(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io(tmp.path()))?;
        tmp.persist(&target).map_err(|e| RegistryError::Io { path: target.clone(), source: e.error })?;
        let parent = target.parent().unwrap_or(&self.blobs);
        fsutil::sync_dir(parent).map_err(io(parent))
    }

    /// Deletes a blob file no repository links any more. Blocking; the caller holds the lock.
    pub fn remove(&self, digest: &Digest) -> Result<(), RegistryError> {
        let path = self.path(digest);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RegistryError::Io { path, source: e }),
        }
    }

    /// Deletes a blob file and returns the bytes it held, or `None` when there was none. Blocking; the
    /// caller holds the lock.
    pub fn remove_counting(&self, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let path = self.path(digest);
        let size = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RegistryError::Io { path, source: e }),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(Some(size)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RegistryError::Io { path, source: e }),
        }
    }

    /// When a blob file was last written (Unix ms), if it exists.
    pub fn modified_unix_ms(&self, digest: &Digest) -> Option<i64> {
        let modified = std::fs::metadata(self.path(digest)).and_then(|m| m.modified()).ok()?;
        let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    /// Calls `f` with the digest and modification time (Unix ms) of every blob file. Files whose names
    /// are not digests are left alone. Blocking.
    pub fn for_each_file(&self, mut f: impl FnMut(Digest, i64)) -> Result<(), RegistryError> {
        let root = self.blobs.join("sha256");
        for shard in std::fs::read_dir(&root).map_err(io(&root))? {
            let shard = shard.map_err(io(&root))?.path();
            if !shard.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&shard).map_err(io(&shard))? {
                let entry = entry.map_err(io(&shard))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
                let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else { continue };
                let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else { continue };
                let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                f(digest, i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX));
            }
        }
        Ok(())
    }

    /// Creates the shard directory; when new, makes its entry in `blobs/sha256` durable too.
    fn ensure_parent(&self, target: &Path) -> Result<(), RegistryError> {
        let Some(parent) = target.parent() else { return Ok(()) };
        if parent.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        match parent.parent() {
            Some(grandparent) => fsutil::sync_dir(grandparent).map_err(io(grandparent)),
            None => Ok(()),
        }
    }
}

/// Once this many bytes are written since the last one, a background `fdatasync` starts on a duplicate
/// handle, so the disk writes back while the upload keeps arriving and the final fsync has little left.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// A blob being received: a temporary file and the running hash of exactly the bytes written to it.
pub struct Partial {
    path: PathBuf,
    file: Option<std::fs::File>,
    hasher: Hasher,
    /// Set while a write is in flight and left set when it fails: the file and hash may disagree.
    broken: bool,
    armed: bool,
    /// Bytes written since the last background sync started.
    unsynced: u64,
    /// The background sync in flight, if any. Its error must fail the upload: on Linux a failed
    /// writeback is reported once per open file, and the duplicate shares this one's.
    writeback: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Partial {
    /// Creates an empty temporary file in `dir`.
    pub async fn create(dir: &Path) -> Result<Partial, RegistryError> {
        let path = dir.join(uuid::Uuid::new_v4().to_string());
        let create_path = path.clone();
        let file = blocking(move || {
            std::fs::OpenOptions::new().write(true).create_new(true).open(&create_path).map_err(io(&create_path))
        })
        .await?;
        Ok(Partial {
            path,
            file: Some(file),
            hasher: Hasher::new(),
            broken: false,
            armed: true,
            unsynced: 0,
            writeback: None,
        })
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.hasher.len()
    }

    /// Whether a failed or interrupted write left this upload unusable.
    pub fn is_broken(&self) -> bool {
        self.broken || self.file.is_none()
    }

    /// Writes and hashes `pieces` (request body chunks, taken as they came: no copy) on blocking threads,
    /// the hash and the write side by side, and hands the emptied vector back for reuse.
    pub async fn append(&mut self, mut pieces: Vec<Bytes>) -> Result<Vec<Bytes>, RegistryError> {
        let Some(mut file) = self.file.take() else {
            return Err(RegistryError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("upload is broken"),
            });
        };
        self.broken = true;
        let mut hasher = std::mem::take(&mut self.hasher);
        let path = self.path.clone();
        let to_hash = pieces.clone();
        let hashing = tokio::task::spawn_blocking(move || {
            for piece in &to_hash {
                hasher.update(piece);
            }
            hasher
        });
        let to_write = std::mem::take(&mut pieces);
        let written = blocking(move || {
            let mut len = 0u64;
            for piece in &to_write {
                file.write_all(piece).map_err(io(&path))?;
                len += piece.len() as u64;
            }
            Ok((file, len))
        })
        .await;
        let hashed = hashing.await.map_err(|e| RegistryError::Task(e.to_string()));
        let ((file, len), hasher) = (written?, hashed?);
        self.file = Some(file);
        self.hasher = hasher;
        self.unsynced += len;
        self.start_writeback().await?;
        self.broken = false;
        Ok(pieces)
    }

    /// Starts a background sync when enough is written and none is running; reports a finished one's error.
    async fn start_writeback(&mut self) -> Result<(), RegistryError> {
        if self.writeback.as_ref().is_some_and(|h| !h.is_finished()) || self.unsynced < WRITEBACK_EVERY {
            return Ok(());
        }
        self.wait_writeback().await?;
        let Some(file) = &self.file else { return Ok(()) };
        let duplicate = file.try_clone().map_err(io(&self.path))?;
        self.writeback = Some(tokio::task::spawn_blocking(move || duplicate.sync_data()));
        self.unsynced = 0;
        Ok(())
    }

    /// Waits for the background sync, if any, and returns its error.
    async fn wait_writeback(&mut self) -> Result<(), RegistryError> {
        let Some(handle) = self.writeback.take() else { return Ok(()) };
        let result = handle.await.map_err(|e| RegistryError::Task(e.to_string()))?;
        result.map_err(io(&self.path))
    }

    /// Fsyncs and closes the file; the digest is of everything written.
    pub async fn finish(mut self) -> Result<Finished, RegistryError> {
        if let Err(error) = self.wait_writeback().await {
            self.broken = true;
            return Err(error);
        }
        let Some(file) = self.file.take().filter(|_| !self.broken) else {
            return Err(RegistryError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("upload is broken"),
            });
        };
        let path = self.path.clone();
        blocking(move || file.sync_all().map_err(io(&path))).await?;
        self.armed = false;
        let hasher = std::mem::take(&mut self.hasher);
        let size = hasher.len();
        Ok(Finished { path: self.path.clone(), digest: hasher.finish(), size, armed: true })
    }

    /// Deletes the temporary file now (dropping does it in the background).
    pub async fn discard(mut self) {
        self.file = None;
        self.armed = false;
        remove_now(self.path.clone()).await;
    }
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("path", &self.path)
            .field("received", &self.received())
            .field("broken", &self.is_broken())
            .finish()
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.armed {
            self.file = None;
            remove_in_background(self.path.clone());
        }
    }
}

/// A fully received, fsynced blob, not yet visible anywhere.
pub struct Finished {
    path: PathBuf,
    pub digest: Digest,
    pub size: u64,
    armed: bool,
}

impl Finished {
    /// Deletes the temporary file now.
    pub async fn discard(mut self) {
        self.armed = false;
        remove_now(self.path.clone()).await;
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        if self.armed {
            remove_in_background(self.path.clone());
        }
    }
}

async fn remove_now(path: PathBuf) {
    let result = tokio::fs::remove_file(&path).await;
    log_removal(&path, result);
}

/// Deletes a temporary from a destructor: on the blocking pool inside a runtime, else right here.
fn remove_in_background(path: PathBuf) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(move || {
                let result = std::fs::remove_file(&path);
                log_removal(&path, result);
            });
        }
        Err(_) => {
            let result = std::fs::remove_file(&path);
            log_removal(&path, result);
        }
    }
}

fn log_removal(path: &Path, result: std::io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(path = %path.display(), %error, "Could not delete an upload's temporary file."),
    }
}

/// Blob reads go out in windows of this size, the next one mapped ahead while the current one is sent.
pub const READ_WINDOW: usize = 4 << 20;

/// Streams `len` bytes of `file` from `start`, one memory-mapped window at a time: each window is mapped
/// and its pages faulted in on a blocking thread while the one before it goes to the network, so disk (or
/// page cache) and socket work overlap, and the bytes go from the page cache to the socket with one copy
/// (a `read` into a buffer would add another). At most two windows are mapped at once, so resident memory
/// stays flat whatever the blob's size.
pub fn read_ahead(file: std::fs::File, start: u64, len: u64) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    let file = std::sync::Arc::new(file);
    async_stream::try_stream! {
        let end = start.saturating_add(len);
        let mut next = (len > 0).then(|| map_window(file.clone(), start, end));
        while let Some(pending) = next.take() {
            let (offset, bytes) = pending.await.map_err(std::io::Error::other)??;
            let after = offset + bytes.len() as u64;
            if after < end {
                next = Some(map_window(file.clone(), after, end));
            }
            yield bytes;
        }
    }
}

/// Maps `[offset, min(offset + READ_WINDOW, end))` of `file` and touches every page, so the async thread
/// that sends it never waits on the disk.
fn map_window(
    file: std::sync::Arc<std::fs::File>,
    offset: u64,
    end: u64,
) -> tokio::task::JoinHandle<std::io::Result<(u64, Bytes)>> {
    tokio::task::spawn_blocking(move || {
        let want = (end - offset).min(READ_WINDOW as u64) as usize;
        if file.metadata()?.len() < offset + want as u64 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob file is shorter than its size"));
        }
        // SAFETY: a mapped file changed underneath us is undefined behaviour (and a truncation is SIGBUS).
        // Blob files are written under a temporary name, fsynced and renamed into place, and never written
        // again: the garbage collector only unlinks them, which leaves existing mappings intact.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(want).map(&*file)? };
        let _ = map.advise(memmap2::Advice::Sequential);
        // Touch one byte per page: minor faults here, on a blocking thread, instead of major ones inside
        // the socket write on an async thread.
        let mut sum = 0u8;
        for page in map.chunks(4096) {
            sum = sum.wrapping_add(page[0]);
        }
        std::hint::black_box(sum);
        Ok((offset, Bytes::from_owner(map)))
    })
}

/// Runs blocking file or database work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| RegistryError::Task(e.to_string()))?
}

pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn partial_hashes_what_it_writes_and_persists_or_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let mut partial = Partial::create(store.uploads_dir()).await.expect("create");
        let pieces = vec![Bytes::from_static(b"hel"), Bytes::from_static(b"lo ")];
        let pieces = partial.append(pieces).await.expect("append");
        assert!(pieces.is_empty());
        partial.append(vec![Bytes::from_static(b"world")]).await.expect("append");
        assert_eq!(partial.received(), 11);
        let finished = partial.finish().await.expect("finish");
        assert_eq!(finished.digest, Digest::of(b"hello world"));
        let digest = finished.digest.clone();
        store.persist(finished).expect("persist");
        assert_eq!(std::fs::read(store.path(&digest)).expect("read"), b"hello world");
        assert_eq!(std::fs::read_dir(store.uploads_dir()).expect("list").count(), 0);

        let partial = Partial::create(store.uploads_dir()).await.expect("create");
        partial.discard().await;
        assert_eq!(std::fs::read_dir(store.uploads_dir()).expect("list").count(), 0);
    }

    #[test]
    fn open_deletes_leftover_uploads() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("uploads")).expect("mkdir");
        std::fs::write(dir.path().join("uploads/leftover"), b"x").expect("write");
        let store = BlobStore::open(dir.path()).expect("open");
        assert_eq!(std::fs::read_dir(store.uploads_dir()).expect("list").count(), 0);
    }
}
