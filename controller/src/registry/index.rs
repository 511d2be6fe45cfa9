//! The registry's metadata in redb: which blobs and manifests each repository holds, its tags, and
//! which manifests reference which digests. Every change is one ACID, fsynced transaction.
//!
//! Blob files are shared across repositories; a repository sees a blob only once it is linked here.
//! A stored manifest is also linked as a blob of its repository (its bytes are a blob file too).
//!
//! Invariant the garbage collector relies on: every row of `REFS` (repository, digest, manifest) has a
//! `BLOBS` row (digest, repository), because a manifest is stored only when its references are linked
//! and neither a referenced blob nor a referenced manifest can be unlinked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use alki_shared::clock::SharedClock;
use alki_shared::digest::Digest;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{ManifestEntry, RegistryError};

/// (digest, repository) → size: the blob is visible in the repository.
const BLOBS: TableDefinition<(&str, &str), u64> = TableDefinition::new("registry_blobs");
/// (repository, digest) → JSON [`ManifestRecord`].
const MANIFESTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("registry_manifests");
/// (repository, tag) → digest.
const TAGS: TableDefinition<(&str, &str), &str> = TableDefinition::new("registry_tags");
/// (repository, referenced digest, referencing manifest digest): what a blob delete must respect.
const REFS: TableDefinition<(&str, &str, &str), ()> = TableDefinition::new("registry_references");
/// (digest, repository) → when the blob was last linked there (Unix ms): the garbage collector's grace
/// period counts from it. Rows written before this table existed are missing; the file's mtime stands in.
const LINKED: TableDefinition<(&str, &str), i64> = TableDefinition::new("registry_blob_linked");

/// What the registry remembers about a stored manifest (its bytes are the blob file of its digest).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    #[serde(default)]
    pub artifact_type: Option<String>,
    pub size: u64,
    pub pushed_unix_ms: i64,
    #[serde(default)]
    pub subject: Option<Digest>,
    /// Config and layers, or an index's manifests.
    #[serde(default)]
    pub references: Vec<Digest>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The outcome of unlinking a blob from a repository.
#[derive(Debug, PartialEq)]
pub enum BlobUnlink {
    Unknown,
    /// The digest is a stored manifest: delete it through its manifest URL.
    IsManifest,
    /// Stored manifests still reference the blob.
    Referenced(Vec<Digest>),
    /// Unlinked; `orphaned` when no repository holds the digest any more (the file may go).
    Removed {
        orphaned: bool,
    },
}

/// The outcome of deleting a manifest by digest.
#[derive(Debug, PartialEq)]
pub enum ManifestDelete {
    Unknown,
    /// Image indexes of the repository still list the manifest; nothing was deleted.
    Referenced(Vec<Digest>),
    /// Deleted; `orphaned` when no repository links the digest any more (the file may go).
    Deleted {
        orphaned: bool,
    },
}

/// An unreferenced blob as the garbage collector sees it: each repository linking it and when.
#[derive(Debug, PartialEq)]
pub struct Link {
    pub repository: String,
    /// Unix ms of the last link, when recorded.
    pub linked_unix_ms: Option<i64>,
}

/// The outcome of storing a manifest.
#[derive(Debug, PartialEq)]
pub enum ManifestPut {
    Stored,
    /// These references are not in the repository; nothing was stored.
    Missing(Vec<Digest>),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self {
                RegistryError::Database(e.into())
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

#[derive(Clone)]
pub struct Index {
    db: Arc<Database>,
    /// When blobs are linked (the garbage collector's grace period counts from then).
    clock: SharedClock,
}

impl Index {
    /// Creates the registry's tables if they are missing.
    pub fn open(db: Arc<Database>, clock: SharedClock) -> Result<Index, RegistryError> {
        let txn = db.begin_write()?;
        txn.open_table(BLOBS)?;
        txn.open_table(MANIFESTS)?;
        txn.open_table(TAGS)?;
        txn.open_table(REFS)?;
        txn.open_table(LINKED)?;
        txn.commit()?;
        Ok(Index { db, clock })
    }

    /// The size of a blob if the repository holds it.
    pub fn blob_size(&self, repository: &str, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOBS)?;
        Ok(table.get((digest.as_str(), repository))?.map(|v| v.value()))
    }

    /// Makes a blob visible in a repository (its file must already be in place).
    pub fn link_blob(&self, repository: &str, digest: &Digest, size: u64) -> Result<(), RegistryError> {
        let txn = self.db.begin_write()?;
        txn.open_table(BLOBS)?.insert((digest.as_str(), repository), size)?;
        txn.open_table(LINKED)?.insert((digest.as_str(), repository), self.clock.now().as_millis())?;
        txn.commit()?;
        Ok(())
    }

    /// Removes a blob from a repository unless a manifest there still references it.
    pub fn unlink_blob(&self, repository: &str, digest: &Digest) -> Result<BlobUnlink, RegistryError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut blobs = txn.open_table(BLOBS)?;
            if blobs.get((digest.as_str(), repository))?.is_none() {
                return Ok(BlobUnlink::Unknown);
            }
            if txn.open_table(MANIFESTS)?.get((repository, digest.as_str()))?.is_some() {
                return Ok(BlobUnlink::IsManifest);
            }
            let referencing = referencing(&txn, repository, digest)?;
            if !referencing.is_empty() {
                return Ok(BlobUnlink::Referenced(referencing));
            }
            blobs.remove((digest.as_str(), repository))?;
            txn.open_table(LINKED)?.remove((digest.as_str(), repository))?;
            BlobUnlink::Removed { orphaned: !digest_held(&blobs, digest)? }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// Stores a manifest (and `tag` pointing at it) if every reference is in the repository: blobs for
    /// an image manifest, manifests for an index. `before_commit` runs inside the transaction once the
    /// references are known to be there; it puts the manifest's bytes in place.
    pub fn put_manifest(
        &self,
        repository: &str,
        digest: &Digest,
        record: &ManifestRecord,
        is_index: bool,
        tag: Option<&str>,
        before_commit: impl FnOnce() -> Result<(), RegistryError>,
    ) -> Result<ManifestPut, RegistryError> {
        let txn = self.db.begin_write()?;
        {
            let mut manifests = txn.open_table(MANIFESTS)?;
            let mut blobs = txn.open_table(BLOBS)?;
            let mut missing = Vec::new();
            for reference in &record.references {
                let present = if is_index {
                    manifests.get((repository, reference.as_str()))?.is_some()
                } else {
                    blobs.get((reference.as_str(), repository))?.is_some()
                };
                if !present && !missing.contains(reference) {
                    missing.push(reference.clone());
                }
            }
            if !missing.is_empty() {
                return Ok(ManifestPut::Missing(missing));
            }
            before_commit()?;
            if manifests.get((repository, digest.as_str()))?.is_none() {
                let bytes = serde_json::to_vec(record).map_err(RegistryError::Encode)?;
                manifests.insert((repository, digest.as_str()), bytes.as_slice())?;
                let mut refs = txn.open_table(REFS)?;
                for reference in &record.references {
                    refs.insert((repository, reference.as_str(), digest.as_str()), ())?;
                }
            }
            blobs.insert((digest.as_str(), repository), record.size)?;
            txn.open_table(LINKED)?.insert((digest.as_str(), repository), self.clock.now().as_millis())?;
            if let Some(tag) = tag {
                txn.open_table(TAGS)?.insert((repository, tag), digest.as_str())?;
            }
        }
        txn.commit()?;
        Ok(ManifestPut::Stored)
    }

    pub fn manifest(&self, repository: &str, digest: &Digest) -> Result<Option<ManifestRecord>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MANIFESTS)?;
        let Some(value) = table.get((repository, digest.as_str()))? else {
            return Ok(None);
        };
        decode(repository, digest.as_str(), value.value()).map(Some)
    }

    pub fn tag(&self, repository: &str, tag: &str) -> Result<Option<Digest>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TAGS)?;
        let Some(value) = table.get((repository, tag))? else {
            return Ok(None);
        };
        value
            .value()
            .parse()
            .map(Some)
            .map_err(|e| RegistryError::CorruptTag { key: format!("{repository}:{tag}"), source: e })
    }

    /// Deletes a manifest, its tags and its references, unless an index of the repository lists it.
    pub fn delete_manifest(&self, repository: &str, digest: &Digest) -> Result<ManifestDelete, RegistryError> {
        let txn = self.db.begin_write()?;
        let orphaned = {
            let referencing = referencing(&txn, repository, digest)?;
            if !referencing.is_empty() {
                return Ok(ManifestDelete::Referenced(referencing));
            }
            let mut manifests = txn.open_table(MANIFESTS)?;
            let Some(record) = manifests.remove((repository, digest.as_str()))? else {
                return Ok(ManifestDelete::Unknown);
            };
            let record = decode(repository, digest.as_str(), record.value())?;
            let mut refs = txn.open_table(REFS)?;
            for reference in &record.references {
                refs.remove((repository, reference.as_str(), digest.as_str()))?;
            }
            let mut tags = txn.open_table(TAGS)?;
            let mut pointing = Vec::new();
            for entry in tags.range((repository, "")..)? {
                let (key, value) = entry?;
                let (repo, tag) = key.value();
                if repo != repository {
                    break;
                }
                if value.value() == digest.as_str() {
                    pointing.push(tag.to_owned());
                }
            }
            for tag in &pointing {
                tags.remove((repository, tag.as_str()))?;
            }
            let mut blobs = txn.open_table(BLOBS)?;
            blobs.remove((digest.as_str(), repository))?;
            txn.open_table(LINKED)?.remove((digest.as_str(), repository))?;
            !digest_held(&blobs, digest)?
        };
        txn.commit()?;
        Ok(ManifestDelete::Deleted { orphaned })
    }

    /// Removes a tag; `false` when it did not exist.
    pub fn untag(&self, repository: &str, tag: &str) -> Result<bool, RegistryError> {
        let txn = self.db.begin_write()?;
        let removed = txn.open_table(TAGS)?.remove((repository, tag))?.is_some();
        txn.commit()?;
        Ok(removed)
    }

    /// The repository's tags in lexical (byte) order; `None` when the repository holds no manifest.
    pub fn tags(&self, repository: &str) -> Result<Option<Vec<String>>, RegistryError> {
        let txn = self.db.begin_read()?;
        let manifests = txn.open_table(MANIFESTS)?;
        let known = match manifests.range((repository, "")..)?.next() {
            Some(entry) => entry?.0.value().0 == repository,
            None => false,
        };
        if !known {
            return Ok(None);
        }
        let tags = txn.open_table(TAGS)?;
        let mut out = Vec::new();
        for entry in tags.range((repository, "")..)? {
            let (key, _) = entry?;
            let (repo, tag) = key.value();
            if repo != repository {
                break;
            }
            out.push(tag.to_owned());
        }
        Ok(Some(out))
    }

    /// Every stored manifest of a repository (or of all, when `None`), with their records.
    pub fn records(&self, repository: Option<&str>) -> Result<Vec<(String, Digest, ManifestRecord)>, RegistryError> {
        let txn = self.db.begin_read()?;
        let manifests = txn.open_table(MANIFESTS)?;
        let mut out = Vec::new();
        for entry in manifests.range((repository.unwrap_or(""), "")..)? {
            let (key, value) = entry?;
            let (repo, digest) = key.value();
            if repository.is_some_and(|r| r != repo) {
                break;
            }
            let record = decode(repo, digest, value.value())?;
            let digest =
                digest.parse().map_err(|e| RegistryError::CorruptTag { key: format!("{repo}@{digest}"), source: e })?;
            out.push((repo.to_owned(), digest, record));
        }
        Ok(out)
    }

    /// Manifests with their tags, for [`super::Registry::manifests`].
    pub fn entries(&self, repository: Option<&str>) -> Result<Vec<ManifestEntry>, RegistryError> {
        let records = self.records(repository)?;
        let repositories: BTreeSet<&str> = records.iter().map(|(repo, _, _)| repo.as_str()).collect();
        let txn = self.db.begin_read()?;
        let tags = txn.open_table(TAGS)?;
        let mut tagged: HashMap<(String, String), Vec<String>> = HashMap::new();
        for repository in repositories {
            for entry in tags.range((repository, "")..)? {
                let (key, value) = entry?;
                let (repo, tag) = key.value();
                if repo != repository {
                    break;
                }
                tagged.entry((repo.to_owned(), value.value().to_owned())).or_default().push(tag.to_owned());
            }
        }
        Ok(records
            .into_iter()
            .map(|(repository, digest, record)| ManifestEntry {
                tags: tagged.remove(&(repository.clone(), digest.as_str().to_owned())).unwrap_or_default(),
                repository,
                digest,
                media_type: record.media_type,
                artifact_type: record.artifact_type,
                size: record.size,
                pushed_unix_ms: record.pushed_unix_ms,
                subject: record.subject,
            })
            .collect())
    }

    /// The mark phase of garbage collection: digests linked in some repository that no manifest of any
    /// repository references and that are not manifests themselves, in digest order. One read
    /// transaction; the sweep checks each again under the lock.
    pub fn unreferenced(&self) -> Result<Vec<Digest>, RegistryError> {
        let txn = self.db.begin_read()?;
        let mut marked: BTreeSet<String> = BTreeSet::new();
        for entry in txn.open_table(REFS)?.iter()? {
            let (key, _) = entry?;
            marked.insert(key.value().1.to_owned());
        }
        for entry in txn.open_table(MANIFESTS)?.iter()? {
            let (key, _) = entry?;
            marked.insert(key.value().1.to_owned());
        }
        let mut out: Vec<Digest> = Vec::new();
        for entry in txn.open_table(BLOBS)?.iter()? {
            let (key, _) = entry?;
            let digest = key.value().0;
            if marked.contains(digest) || out.last().is_some_and(|d| d.as_str() == digest) {
                continue;
            }
            match digest.parse() {
                Ok(digest) => out.push(digest),
                Err(error) => tracing::warn!(digest, %error, "Registry index links an invalid digest; skipped."),
            }
        }
        Ok(out)
    }

    /// Whether any repository links `digest` (as a blob or a manifest).
    pub fn is_linked(&self, digest: &Digest) -> Result<bool, RegistryError> {
        let txn = self.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        match blobs.range((digest.as_str(), "")..)?.next() {
            Some(entry) => Ok(entry?.0.value().0 == digest.as_str()),
            None => Ok(false),
        }
    }

    /// The sweep: in one transaction, unlinks from every repository each digest that is still
    /// unreferenced, still no manifest, and that `keep` does not protect (given its links). Returns the
    /// digests unlinked (their files may go) with the number of links removed, and how many were kept.
    pub fn sweep(
        &self,
        candidates: &[Digest],
        mut keep: impl FnMut(&Digest, &[Link]) -> bool,
    ) -> Result<(Vec<(Digest, u64)>, u64), RegistryError> {
        let txn = self.db.begin_write()?;
        let mut swept = Vec::new();
        let mut kept = 0u64;
        {
            let mut blobs = txn.open_table(BLOBS)?;
            let mut linked = txn.open_table(LINKED)?;
            let manifests = txn.open_table(MANIFESTS)?;
            let refs = txn.open_table(REFS)?;
            'candidates: for digest in candidates {
                let mut links = Vec::new();
                for entry in blobs.range((digest.as_str(), "")..)? {
                    let (key, _) = entry?;
                    let (d, repository) = key.value();
                    if d != digest.as_str() {
                        break;
                    }
                    links.push(Link { repository: repository.to_owned(), linked_unix_ms: None });
                }
                for link in &mut links {
                    let key = (digest.as_str(), link.repository.as_str());
                    if manifests.get((link.repository.as_str(), digest.as_str()))?.is_some() {
                        continue 'candidates;
                    }
                    if let Some(entry) = refs.range((link.repository.as_str(), digest.as_str(), "")..)?.next() {
                        let (key, _) = entry?;
                        let (repository, referenced, _) = key.value();
                        if repository == link.repository && referenced == digest.as_str() {
                            continue 'candidates;
                        }
                    }
                    link.linked_unix_ms = linked.get(key)?.map(|v| v.value());
                }
                if links.is_empty() {
                    continue;
                }
                if keep(digest, &links) {
                    kept += 1;
                    continue;
                }
                for link in &links {
                    blobs.remove((digest.as_str(), link.repository.as_str()))?;
                    linked.remove((digest.as_str(), link.repository.as_str()))?;
                }
                swept.push((digest.clone(), links.len() as u64));
            }
        }
        txn.commit()?;
        Ok((swept, kept))
    }
}

/// The manifests of `repository` that reference `digest` (an index's manifests, an image's blobs).
fn referencing(txn: &WriteTransaction, repository: &str, digest: &Digest) -> Result<Vec<Digest>, RegistryError> {
    let refs = txn.open_table(REFS)?;
    let mut out = Vec::new();
    for entry in refs.range((repository, digest.as_str(), "")..)? {
        let (key, _) = entry?;
        let (repo, referenced, manifest) = key.value();
        if repo != repository || referenced != digest.as_str() {
            break;
        }
        if let Ok(manifest) = manifest.parse() {
            out.push(manifest);
        }
    }
    Ok(out)
}

/// Whether any repository still links `digest`.
fn digest_held(blobs: &redb::Table<(&str, &str), u64>, digest: &Digest) -> Result<bool, RegistryError> {
    match blobs.range((digest.as_str(), "")..)?.next() {
        Some(entry) => Ok(entry?.0.value().0 == digest.as_str()),
        None => Ok(false),
    }
}

fn decode(repository: &str, digest: &str, bytes: &[u8]) -> Result<ManifestRecord, RegistryError> {
    serde_json::from_slice(bytes)
        .map_err(|source| RegistryError::CorruptRecord { key: format!("{repository}@{digest}"), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::clock;

    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("t.redb")).expect("db");
        (dir, Index::open(Arc::new(db), clock::system()).expect("index"))
    }

    fn record(references: Vec<Digest>) -> ManifestRecord {
        ManifestRecord {
            media_type: alki_shared::oci::MEDIA_TYPE_IMAGE_MANIFEST.into(),
            artifact_type: None,
            size: 10,
            pushed_unix_ms: 1,
            subject: None,
            references,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn blobs_are_per_repository_and_referenced_blobs_stay() {
        let (_dir, index) = index();
        let blob = Digest::of(b"layer");
        let manifest = Digest::of(b"manifest");
        index.link_blob("a", &blob, 5).expect("link");
        index.link_blob("ab", &blob, 5).expect("link");
        assert_eq!(index.blob_size("a", &blob).expect("size"), Some(5));
        assert_eq!(index.blob_size("b", &blob).expect("size"), None);
        let put = index.put_manifest("a", &manifest, &record(vec![blob.clone()]), false, Some("v1"), || Ok(()));
        assert_eq!(put.expect("put"), ManifestPut::Stored);
        assert!(
            matches!(index.unlink_blob("a", &blob).expect("unlink"), BlobUnlink::Referenced(m) if m == [manifest.clone()])
        );
        assert_eq!(index.unlink_blob("a", &manifest).expect("unlink"), BlobUnlink::IsManifest);
        assert_eq!(index.tags("a").expect("tags"), Some(vec!["v1".to_owned()]));
        assert_eq!(index.tags("ab").expect("tags"), None);
        assert_eq!(index.delete_manifest("a", &manifest).expect("delete"), ManifestDelete::Deleted { orphaned: true });
        assert_eq!(index.tag("a", "v1").expect("tag"), None);
        assert_eq!(index.unlink_blob("a", &blob).expect("unlink"), BlobUnlink::Removed { orphaned: false });
        assert_eq!(index.unlink_blob("ab", &blob).expect("unlink"), BlobUnlink::Removed { orphaned: true });
        assert_eq!(index.unlink_blob("ab", &blob).expect("unlink"), BlobUnlink::Unknown);
    }

    #[test]
    fn manifests_with_missing_references_are_not_stored() {
        let (_dir, index) = index();
        let missing = Digest::of(b"nope");
        let manifest = Digest::of(b"m");
        let put = index.put_manifest("a", &manifest, &record(vec![missing.clone()]), true, None, || {
            panic!("must not run when references are missing")
        });
        assert_eq!(put.expect("put"), ManifestPut::Missing(vec![missing]));
        assert!(index.manifest("a", &manifest).expect("get").is_none());
        assert!(index.entries(None).expect("entries").is_empty());
    }
}
