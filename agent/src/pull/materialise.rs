//! Materialising a pulled variant for llama-server: its GGUF files as hard links to the verified blobs (copies
//! across filesystems) in `<bundles_dir>/<variant hex>/`, the verification record beside them, and the removal
//! of variant directories no one uses.

use std::path::{Path, PathBuf};

use alki_shared::digest::Digest;
use alki_shared::signing::Verified;

use super::error::PullError;
use crate::reference::BundleLocation;
use crate::trust::RepositoryTrust;

/// Written beside the model files: what was verified, so an operator on the device can see why it runs.
pub const VERIFICATION_RECORD: &str = ".alki-verification.json";

/// Makes `dir` hold one entry per `(blob path, file name)`: a hard link to the blob, or a copy when the
/// link fails (another filesystem). Entries already linked to their blob are kept; others are replaced.
pub async fn materialise(dir: &Path, files: Vec<(PathBuf, String)>) -> Result<Vec<PathBuf>, PullError> {
    let owned = dir.to_owned();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(&owned)?;
        let mut out = Vec::new();
        for (blob, name) in files {
            out.push(link_or_copy(&blob, &owned, &name)?);
        }
        alki_shared::fsutil::sync_dir(&owned)?;
        Ok(out)
    })
    .await;
    let dir = dir.to_owned();
    match result {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(source)) => Err(PullError::Materialise { dir, source }),
        Err(join) => Err(PullError::Materialise { dir, source: std::io::Error::other(join) }),
    }
}

/// `dir/name` as the blob's file: kept when it is already linked to it, else linked (or copied) anew.
fn link_or_copy(blob: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let target = dir.join(name);
    let blob_meta = std::fs::metadata(blob)?;
    if let Ok(meta) = std::fs::symlink_metadata(&target) {
        if meta.is_file() && meta.dev() == blob_meta.dev() && meta.ino() == blob_meta.ino() {
            return Ok(target);
        }
        std::fs::remove_file(&target)?;
    }
    if let Err(e) = std::fs::hard_link(blob, &target) {
        tracing::debug!(error = %e, file = %target.display(), "Hard link failed; copying.");
        let tmp = dir.join(format!(".{name}.copy"));
        std::fs::copy(blob, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &target)?;
    }
    Ok(target)
}

/// Writes what was verified into the variant directory (best effort: the pull already succeeded).
pub async fn record_verification(
    dir: &Path,
    bundle: &BundleLocation,
    verified: Option<&Verified>,
    trust: &RepositoryTrust,
) {
    let record = serde_json::json!({
        "bundle": bundle.to_proto().display(),
        "digest": bundle.digest,
        "verified": verified,
        "policy": trust.source,
        "signature_required": trust.required,
    });
    let path = dir.join(VERIFICATION_RECORD);
    let bytes = serde_json::to_vec_pretty(&record).unwrap_or_default();
    let written = tokio::task::spawn_blocking(move || alki_shared::fsutil::write_atomic(&path, &bytes)).await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::warn!(dir = %dir.display(), "Cannot write the verification record.");
    }
}

/// Removes variant directories under `bundles_dir` other than `keep` (they hold hard links to blobs, so a
/// blob's space is only freed once no directory links it). Best effort.
pub async fn prune_variant_dirs(bundles_dir: &Path, keep: &[Digest]) {
    let Ok(mut entries) = tokio::fs::read_dir(bundles_dir).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep.iter().any(|d| d.hex() == name) {
            continue;
        }
        if let Err(e) = tokio::fs::remove_dir_all(entry.path()).await {
            tracing::warn!(dir = %entry.path().display(), error = %e, "Cannot remove an unused bundle directory.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ContentStore;

    #[tokio::test]
    async fn materialise_links_blobs_by_name_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(&dir.path().join("content")).expect("store");
        let digest = Digest::of(b"gguf bytes");
        let blob = store.write_bytes(&digest, b"gguf bytes").await.expect("store blob");
        let target_dir = dir.path().join("bundles").join(digest.hex());
        for _ in 0..2 {
            let files = materialise(&target_dir, vec![(blob.clone(), "model.gguf".to_owned())]).await.expect("link");
            assert_eq!(files, vec![target_dir.join("model.gguf")]);
            assert_eq!(std::fs::read(&files[0]).expect("read"), b"gguf bytes");
        }
    }
}
