//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): what `bundle pack` writes
//! and `bundle push` reads. skopeo and oras read and write the same shape.

use std::io::Read;
use std::path::{Path, PathBuf};

use alki_shared::digest::{Digest, Hasher};
use alki_shared::oci::{ANNOTATION_REF_NAME, Descriptor, ImageIndex, MEDIA_TYPE_IMAGE_INDEX, Manifest};

use crate::error::{Error, IoContext as _, ManifestContext as _, Result, refuse};
use crate::progress::Progress;

/// An OCI image layout directory.
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Creates an empty layout at `root`, which must not exist or be an empty directory.
    pub fn create(root: &Path) -> Result<Layout> {
        if root.exists() && std::fs::read_dir(root).doing(|| format!("reading {}", root.display()))?.next().is_some() {
            refuse!("{} is not empty; choose a new directory for the bundle", root.display());
        }
        std::fs::create_dir_all(root.join("blobs/sha256")).doing(|| format!("creating {}", root.display()))?;
        std::fs::write(root.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .doing(|| format!("writing {}/oci-layout", root.display()))?;
        Ok(Layout { root: root.to_owned() })
    }

    /// Opens an existing layout.
    pub fn open(root: &Path) -> Result<Layout> {
        let marker = root.join("oci-layout");
        if !marker.is_file() {
            refuse!(
                "{} is not an OCI layout (no oci-layout file); make one with `alkictl bundle pack`",
                root.display()
            );
        }
        Ok(Layout { root: root.to_owned() })
    }

    /// The directory the layout is in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` is (or would be) stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Writes a small blob held in memory.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let path = self.blob_path(&digest);
        std::fs::write(&path, bytes).doing(|| format!("writing {}", path.display()))?;
        Ok(digest)
    }

    /// Copies a file into the layout, hashing it on the way, reading it from disk once: each 4 MiB chunk is
    /// read and hashed here, and a copier thread then copies the same range inside the kernel
    /// (`copy_file_range`: no second trip through user space, a reflink on filesystems that share extents)
    /// while the chunk is still in the page cache and the next one is being hashed. Packing therefore runs
    /// at about the speed of hashing alone. A file that changes while it is packed is refused: the copy
    /// would no longer match the digest. `progress` advances by the bytes hashed.
    pub fn copy_blob(&self, source: &Path, progress: &Progress) -> Result<(Digest, u64)> {
        const CHUNK: usize = 4 << 20;
        let mut input = std::fs::File::open(source).doing(|| format!("opening {}", source.display()))?;
        let before = input.metadata().doing(|| format!("reading {}", source.display()))?;
        let dir = self.root.join("blobs/sha256");
        let tmp = tempfile::NamedTempFile::new_in(&dir).doing(|| format!("creating a file in {}", dir.display()))?;
        let out = tmp.reopen().doing(|| format!("opening {}", tmp.path().display()))?;
        // Offsets are explicit in every copy, so sharing the reader's file position is harmless.
        let copy_source = input.try_clone().doing(|| format!("opening {}", source.display()))?;
        // Two ranges may wait: the copier stays at most two chunks behind, inside the page cache.
        let (ranges_tx, ranges_rx) = std::sync::mpsc::sync_channel::<(u64, usize)>(2);
        let copier = std::thread::spawn(move || -> std::io::Result<()> {
            for (offset, len) in ranges_rx {
                copy_range(&copy_source, &out, offset, len)?;
            }
            Ok(())
        });
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let read_result = (|| -> Result<()> {
            loop {
                let n = input.read(&mut buf).doing(|| format!("reading {}", source.display()))?;
                if n == 0 {
                    return Ok(());
                }
                let offset = hasher.len();
                hasher.update(&buf[..n]);
                if ranges_tx.send((offset, n)).is_err() {
                    // The copier stopped: its error is reported below.
                    return Ok(());
                }
                progress.inc(n as u64);
            }
        })();
        drop(ranges_tx);
        let copied = copier.join().unwrap_or_else(|_| Err(std::io::Error::other("the layout copier thread panicked")));
        read_result?;
        copied.doing(|| format!("copying {} into {}", source.display(), dir.display()))?;
        unchanged_since(source, &before, hasher.len())?;
        let len = hasher.len();
        let digest = hasher.finish();
        self.persist(tmp, &digest)?;
        Ok((digest, len))
    }

    /// Hashes a file and hard-links it into the layout under its digest: no byte is copied. Where a link
    /// cannot be made (another filesystem), the file is copied instead and a [`Progress::note`] says so. A file
    /// that changes while it is hashed is refused, as in [`Layout::copy_blob`].
    pub fn link_blob(&self, source: &Path, progress: &Progress) -> Result<(Digest, u64)> {
        const CHUNK: usize = 4 << 20;
        let mut input = std::fs::File::open(source).doing(|| format!("opening {}", source.display()))?;
        let before = input.metadata().doing(|| format!("reading {}", source.display()))?;
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = input.read(&mut buf).doing(|| format!("reading {}", source.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            progress.inc(n as u64);
        }
        unchanged_since(source, &before, hasher.len())?;
        let len = hasher.len();
        let digest = hasher.finish();
        let target = self.blob_path(&digest);
        match std::fs::hard_link(source, &target) {
            Ok(()) => {}
            // The same content packed twice (two names for one file): the blob is already there.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                progress.note(&format!(
                    "cannot hard-link {} into {} ({e}); copying it instead",
                    source.display(),
                    self.root.display()
                ));
                let dir = self.root.join("blobs/sha256");
                let tmp =
                    tempfile::NamedTempFile::new_in(&dir).doing(|| format!("creating a file in {}", dir.display()))?;
                // std::fs::copy copies inside the kernel where it can (copy_file_range).
                std::fs::copy(source, tmp.path()).doing(|| format!("copying {}", source.display()))?;
                self.persist(tmp, &digest)?;
            }
        }
        Ok((digest, len))
    }

    /// Writes `index.json` naming the bundle's top-level manifest under `tag`.
    pub fn write_index(&self, bundle: Descriptor, tag: &str) -> Result<()> {
        let mut entry = bundle;
        entry.annotations.insert(ANNOTATION_REF_NAME.to_owned(), tag.to_owned());
        let index = ImageIndex {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_IMAGE_INDEX.to_owned()),
            artifact_type: None,
            manifests: vec![entry],
            subject: None,
            annotations: Default::default(),
        };
        let path = self.root.join("index.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index)?).doing(|| format!("writing {}", path.display()))
    }

    /// The layout's entries from `index.json`.
    pub fn entries(&self) -> Result<Vec<Descriptor>> {
        let path = self.root.join("index.json");
        let bytes = std::fs::read(&path).doing(|| format!("reading {}", path.display()))?;
        match Manifest::parse(&bytes, None).parsing(|| format!("parsing {}", path.display()))? {
            Manifest::Index(index) => Ok(index.manifests),
            Manifest::Image(_) => refuse!("{} is a manifest, not an index", path.display()),
        }
    }

    /// Reads a small blob (a manifest or config), checking it against its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = std::fs::read(&path).doing(|| format!("reading {}", path.display()))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(Error::Corrupt(format!(
                "{} does not match its digest {digest} (it hashes to {actual}); pack the bundle again",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Moves a finished temporary file into place as the blob `digest`.
    fn persist(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest);
        tmp.persist(&path).map_err(|e| e.error).doing(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Refuses a file that changed while it was hashed (size or modification time): the stored copy would no
/// longer match the digest.
fn unchanged_since(source: &Path, before: &std::fs::Metadata, hashed: u64) -> Result<()> {
    let after = std::fs::metadata(source).doing(|| format!("reading {}", source.display()))?;
    if after.len() != hashed || after.modified().ok() != before.modified().ok() {
        refuse!("{} changed while it was being packed; pack it again once nothing is writing to it", source.display());
    }
    Ok(())
}

/// Copies `len` bytes at `offset` of `from` to the same offset of `to` inside the kernel; where the kernel
/// cannot (another filesystem type, an old kernel), through a buffer.
fn copy_range(from: &std::fs::File, to: &std::fs::File, offset: u64, len: usize) -> std::io::Result<()> {
    use rustix::io::Errno;
    let (mut off_in, mut off_out, mut left) = (offset, offset, len);
    while left > 0 {
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), left) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file got shorter while it was being packed",
                ));
            }
            Ok(n) => left -= n,
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => {
                return copy_range_buffered(from, to, off_in, left);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_buffered(
    from: &std::fs::File,
    to: &std::fs::File,
    mut offset: u64,
    mut left: usize,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = vec![0u8; left.min(1 << 20)];
    while left > 0 {
        let want = left.min(buf.len());
        from.read_exact_at(&mut buf[..want], offset)?;
        to.write_all_at(&buf[..want], offset)?;
        offset += want as u64;
        left -= want;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the bytes progress reports.
    #[derive(Clone, Default)]
    struct Counted(std::sync::Arc<std::sync::atomic::AtomicU64>);

    impl crate::progress::ProgressSink for Counted {
        fn inc(&self, bytes: u64) {
            self.0.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_copied_blob_is_byte_identical_and_named_by_its_digest() {
        let dir = tempfile::tempdir().expect("test setup");
        // Several chunks and a ragged end, so ranges, offsets and the last short copy all matter.
        let mut bytes = vec![0u8; (9 << 20) + 12_345];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let source = dir.path().join("model.gguf");
        std::fs::write(&source, &bytes).expect("test setup");
        let layout = Layout::create(&dir.path().join("out")).expect("test setup");
        let counted = Counted::default();
        let (digest, len) = layout.copy_blob(&source, &Progress::to(counted.clone())).expect("test setup");
        assert_eq!(digest, Digest::of(&bytes));
        assert_eq!(len, bytes.len() as u64);
        assert_eq!(counted.0.load(std::sync::atomic::Ordering::Relaxed), len, "progress counts every byte");
        assert_eq!(std::fs::read(layout.blob_path(&digest)).expect("test setup"), bytes);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out/blobs/sha256")).expect("test setup").collect();
        assert_eq!(leftovers.len(), 1, "only the blob itself: no temporary file left behind");
    }

    #[test]
    fn a_linked_blob_is_the_source_file_itself_under_its_digest() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("test setup");
        let bytes: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let source = dir.path().join("model.gguf");
        std::fs::write(&source, &bytes).expect("test setup");
        let layout = Layout::create(&dir.path().join("out")).expect("test setup");
        let (digest, len) = layout.link_blob(&source, &Progress::none()).expect("link");
        assert_eq!((digest.clone(), len), (Digest::of(&bytes), bytes.len() as u64));
        let (blob, original) =
            (std::fs::metadata(layout.blob_path(&digest)).expect("blob"), std::fs::metadata(&source).expect("source"));
        assert_eq!(blob.ino(), original.ino(), "one file, two names: nothing was copied");
        // Linking the same content again is not an error.
        assert_eq!(layout.link_blob(&source, &Progress::none()).expect("again").0, digest);
    }

    #[test]
    fn the_buffered_fallback_copies_the_same_range() {
        let dir = tempfile::tempdir().expect("test setup");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&from, &bytes).expect("test setup");
        let (input, output) =
            (std::fs::File::open(&from).expect("test setup"), std::fs::File::create(&to).expect("test setup"));
        copy_range_buffered(&input, &output, 1000, 2_500_000).expect("test setup");
        let copied = std::fs::read(&to).expect("test setup");
        assert_eq!(&copied[1000..], &bytes[1000..2_501_000]);
    }
}
