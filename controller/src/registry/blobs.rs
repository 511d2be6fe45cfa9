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

/// A blob being received: a temporary file and the running hash of exactly the bytes written to it.
pub struct Partial {
    path: PathBuf,
    file: Option<std::fs::File>,
    hasher: Hasher,
    /// Set while a write is in flight and left set when it fails: the file and hash may disagree.
    broken: bool,
    armed: bool,
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
        Ok(Partial { path, file: Some(file), hasher: Hasher::new(), broken: false, armed: true })
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.hasher.len()
    }

    /// Whether a failed or interrupted write left this upload unusable.
    pub fn is_broken(&self) -> bool {
        self.broken || self.file.is_none()
    }

    /// Writes and hashes `buf` on a blocking thread and hands the (cleared) buffer back for reuse.
    pub async fn append(&mut self, mut buf: Vec<u8>) -> Result<Vec<u8>, RegistryError> {
        let Some(mut file) = self.file.take() else {
            return Err(RegistryError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("upload is broken"),
            });
        };
        self.broken = true;
        let mut hasher = std::mem::take(&mut self.hasher);
        let path = self.path.clone();
        let (file, hasher, buf) = blocking(move || {
            file.write_all(&buf).map_err(io(&path))?;
            hasher.update(&buf);
            buf.clear();
            Ok((file, hasher, buf))
        })
        .await?;
        self.file = Some(file);
        self.hasher = hasher;
        self.broken = false;
        Ok(buf)
    }

    /// Fsyncs and closes the file; the digest is of everything written.
    pub async fn finish(mut self) -> Result<Finished, RegistryError> {
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
        let buf = partial.append(b"hello ".to_vec()).await.expect("append");
        assert!(buf.is_empty());
        partial.append(b"world".to_vec()).await.expect("append");
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
