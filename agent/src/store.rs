//! The local content store: blobs under `<data_dir>/content/blobs/sha256/<2 hex>/<hex>`, keyed by digest,
//! written through a temporary file that is hashed while written and renamed only when the digest matches.

use std::path::{Path, PathBuf};

use alki_shared::digest::{Digest, Hasher};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

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
        matches!(self, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
    }
}

/// A content-addressed blob store on the local disk.
#[derive(Clone, Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

impl ContentStore {
    /// Opens (creating) the store at `<root>/blobs` and `<root>/tmp`, removing temporary files a crash left.
    pub fn open(root: &Path) -> Result<ContentStore, StoreError> {
        let store = ContentStore { blobs: root.join("blobs"), tmp: root.join("tmp") };
        std::fs::create_dir_all(&store.blobs).map_err(io_at(&store.blobs))?;
        if store.tmp.exists() {
            std::fs::remove_dir_all(&store.tmp).map_err(io_at(&store.tmp))?;
        }
        std::fs::create_dir_all(&store.tmp).map_err(io_at(&store.tmp))?;
        Ok(store)
    }

    /// Where the blob with this digest lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.storage_path())
    }

    /// True when the blob is present. Blobs are only ever renamed into place after their digest was checked.
    pub async fn contains(&self, digest: &Digest) -> bool {
        tokio::fs::metadata(self.path(digest)).await.is_ok_and(|m| m.is_file())
    }

    /// The blob's size, if present.
    pub async fn size(&self, digest: &Digest) -> Option<u64> {
        tokio::fs::metadata(self.path(digest)).await.ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    /// Removes a blob (e.g. one whose size disagrees with its descriptor).
    pub async fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&path)(e)),
        }
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
        let dir = final_path.parent().map(Path::to_owned).unwrap_or_else(|| self.blobs.clone());
        tokio::fs::create_dir_all(&dir).await.map_err(io_at(&dir))?;
        let target = final_path.clone();
        tokio::task::spawn_blocking(move || {
            tmp.persist(&target).map_err(|e| e.error)?;
            alki_shared::fsutil::sync_dir(&dir)
        })
        .await
        .map_err(|join| io_at(&final_path)(std::io::Error::other(join)))?
        .map_err(io_at(&final_path))?;
        Ok(final_path)
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

    #[tokio::test]
    async fn open_cleans_leftover_temporary_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir");
        std::fs::write(dir.path().join("tmp/leftover.partial"), b"x").expect("write");
        let store = ContentStore::open(dir.path()).expect("open");
        let digest = Digest::of(b"{}");
        store.write_bytes(&digest, b"{}").await.expect("write");
        assert_eq!(files_under(dir.path()), vec![store.path(&digest)]);
    }
}
