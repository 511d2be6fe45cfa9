//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): what `bundle pack` writes
//! and `bundle push` reads. skopeo and oras read and write the same shape.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use alki_shared::digest::{Digest, Hasher};
use alki_shared::oci::{ANNOTATION_REF_NAME, Descriptor, ImageIndex, MEDIA_TYPE_IMAGE_INDEX, Manifest};
use anyhow::{Context as _, bail};

pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Creates an empty layout at `root`, which must not exist or be an empty directory.
    pub fn create(root: &Path) -> anyhow::Result<Layout> {
        if root.exists() && std::fs::read_dir(root)?.next().is_some() {
            bail!("{} is not empty; choose a new directory for the bundle", root.display());
        }
        std::fs::create_dir_all(root.join("blobs/sha256")).with_context(|| format!("creating {}", root.display()))?;
        std::fs::write(root.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Layout { root: root.to_owned() })
    }

    pub fn open(root: &Path) -> anyhow::Result<Layout> {
        let marker = root.join("oci-layout");
        if !marker.is_file() {
            bail!("{} is not an OCI layout (no oci-layout file); make one with `alkictl bundle pack`", root.display());
        }
        Ok(Layout { root: root.to_owned() })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Writes a small blob held in memory.
    pub fn write_blob(&self, bytes: &[u8]) -> anyhow::Result<Digest> {
        let digest = Digest::of(bytes);
        std::fs::write(self.blob_path(&digest), bytes)?;
        Ok(digest)
    }

    /// Copies a file into the layout, hashing it on the way: the file is read exactly once. Hashing and
    /// writing overlap (a writer thread takes each buffer while the next one is read and hashed), so packing
    /// runs at about the speed of hashing alone. `progress` is called with the bytes copied so far.
    pub fn copy_blob(&self, source: &Path, mut progress: impl FnMut(u64)) -> anyhow::Result<(Digest, u64)> {
        const CHUNK: usize = 4 << 20;
        let mut input = std::fs::File::open(source).with_context(|| format!("opening {}", source.display()))?;
        let dir = self.root.join("blobs/sha256");
        let tmp = tempfile::NamedTempFile::new_in(&dir)?;
        let mut out = tmp.reopen()?;
        // Three buffers circulate: one being read and hashed, one queued, one being written.
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(1);
        let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(3);
        for _ in 0..3 {
            let _ = empty_tx.send(vec![0u8; CHUNK]);
        }
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            for (buf, n) in full_rx {
                out.write_all(&buf[..n])?;
                // The reader may have stopped on an error; a closed channel is not one here.
                let _ = empty_tx.send(buf);
            }
            out.flush()
        });
        let mut hasher = Hasher::new();
        let read_result = (|| -> anyhow::Result<()> {
            while let Ok(mut buf) = empty_rx.recv() {
                let n = input.read(&mut buf).with_context(|| format!("reading {}", source.display()))?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                if full_tx.send((buf, n)).is_err() {
                    // The writer stopped: its error is reported below.
                    return Ok(());
                }
                progress(hasher.len());
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer.join().map_err(|_| anyhow::anyhow!("the layout writer thread panicked"))?;
        read_result?;
        written.with_context(|| format!("writing into {}", dir.display()))?;
        let len = hasher.len();
        let digest = hasher.finish();
        tmp.persist(self.blob_path(&digest)).map_err(|e| e.error)?;
        Ok((digest, len))
    }

    /// Writes `index.json` naming the bundle's top-level manifest under `tag`.
    pub fn write_index(&self, bundle: Descriptor, tag: &str) -> anyhow::Result<()> {
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
        std::fs::write(self.root.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
        Ok(())
    }

    /// The layout's entries from `index.json`.
    pub fn entries(&self) -> anyhow::Result<Vec<Descriptor>> {
        let path = self.root.join("index.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        match Manifest::parse(&bytes, None).with_context(|| format!("parsing {}", path.display()))? {
            Manifest::Index(index) => Ok(index.manifests),
            Manifest::Image(_) => bail!("{} is a manifest, not an index", path.display()),
        }
    }

    /// Reads a small blob (a manifest or config), checking it against its digest.
    pub fn read_blob(&self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            bail!(
                "{} does not match its digest {digest} (it hashes to {actual}); pack the bundle again",
                path.display()
            );
        }
        Ok(bytes)
    }
}
