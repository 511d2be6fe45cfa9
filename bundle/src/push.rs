//! Pushing a packed OCI layout (a bundle or a runtime build) to a registry (`alkictl bundle push`): every
//! blob streamed from disk, children before the manifests that reference them, the top manifest tagged last.

use std::collections::HashSet;
use std::path::Path;

use alki_shared::digest::Digest;
use alki_shared::oci::{Descriptor, Manifest};
use futures::TryStreamExt as _;
use oci_client::errors::OciDistributionError;
use oci_client::{Client, Reference};
use serde::Serialize;

use crate::error::{Error, IoContext as _, ManifestContext as _, Result, refuse};
use crate::layout::Layout;
use crate::progress::Progress;
use crate::reference::BundleRef;
use crate::registry::Remote;

/// What was pushed, for the table or `-o json`.
#[derive(Debug, Serialize)]
pub struct Pushed {
    /// `registry/repository:tag`, a reference every alkictl command accepts.
    pub reference: String,
    pub digest: Digest,
    pub uploaded_bytes: u64,
    pub skipped_blobs: usize,
}

/// A manifest of the layout with its bytes, in push order.
struct LayoutManifest {
    descriptor: Descriptor,
    bytes: Vec<u8>,
    manifest: Manifest,
}

/// Pushes the layout at `dir` to `remote`, tagging its top manifest `tag`.
pub async fn push(dir: &Path, remote: &Remote, tag: &str, progress: &Progress) -> Result<Pushed> {
    let layout = Layout::open(dir)?;
    let manifests = manifests_in_push_order(&layout, dir)?;
    let Some(top) = manifests.last().map(|m| m.descriptor.clone()) else {
        refuse!("{} has no bundle in index.json", dir.display());
    };
    let client = remote.client();
    client
        .auth(&remote.reference(top.digest.as_str()), &remote.auth(), oci_client::RegistryOperation::Push)
        .await
        .map_err(|e| remote.error(e))?;

    let blobs: Vec<Descriptor> = manifests
        .iter()
        .filter_map(|m| match &m.manifest {
            Manifest::Image(image) => Some(std::iter::once(image.config.clone()).chain(image.layers.clone())),
            Manifest::Index(_) => None,
        })
        .flatten()
        .collect();
    progress.set_length(blobs.iter().map(|b| b.size).sum());
    let (mut uploaded, mut skipped) = (0u64, 0usize);
    let mut done = HashSet::new();
    for blob in blobs {
        if !done.insert(blob.digest.clone()) {
            continue;
        }
        if push_blob(&client, remote, &layout, &blob, progress).await? {
            uploaded += blob.size;
        } else {
            progress.inc(blob.size);
            skipped += 1;
        }
    }
    push_manifests(&client, remote, manifests, tag).await?;
    progress.finish();
    let reference = BundleRef::tagged(Some(&remote.registry), &remote.repository, tag);
    Ok(Pushed {
        reference: reference.to_string(),
        digest: top.digest,
        uploaded_bytes: uploaded,
        skipped_blobs: skipped,
    })
}

/// The layout's top manifest and, for an index, the manifests it lists: children first, since a registry
/// refuses a manifest whose references it does not hold yet.
fn manifests_in_push_order(layout: &Layout, dir: &Path) -> Result<Vec<LayoutManifest>> {
    let entries = layout.entries()?;
    let Some(top) = entries.first() else { refuse!("{} has no bundle in index.json", dir.display()) };
    let read = |descriptor: &Descriptor| -> Result<LayoutManifest> {
        let bytes = layout.read_blob(&descriptor.digest)?;
        let manifest = Manifest::parse(&bytes, Some(&descriptor.media_type))
            .parsing(|| format!("manifest {} in {}", descriptor.digest, dir.display()))?;
        Ok(LayoutManifest { descriptor: descriptor.clone(), bytes, manifest })
    };
    let top = read(top)?;
    let mut manifests = Vec::new();
    if let Manifest::Index(index) = &top.manifest {
        for entry in &index.manifests {
            manifests.push(read(entry)?);
        }
    }
    manifests.push(top);
    Ok(manifests)
}

/// Uploads one blob, streamed from the layout; false when the registry already has it.
async fn push_blob(
    client: &Client,
    remote: &Remote,
    layout: &Layout,
    blob: &Descriptor,
    progress: &Progress,
) -> Result<bool> {
    let reference = remote.reference(blob.digest.as_str());
    if client.blob_exists(&reference, blob.digest.as_str()).await.map_err(|e| remote.error(e))? {
        return Ok(false);
    }
    let path = layout.blob_path(&blob.digest);
    let file = tokio::fs::File::open(&path).await.doing(|| format!("opening {}", path.display()))?;
    let bar = progress.clone();
    // oci-client sends chunks of 4 MiB; reading in 4 MiB keeps each PATCH full without buffering more.
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 4 << 20)
        .inspect_ok(move |chunk| bar.inc(chunk.len() as u64))
        .map_err(OciDistributionError::IoError);
    client
        .push_blob_stream(&reference, stream, blob.digest.as_str(), Some(blob.size))
        .await
        .map_err(|e| remote.error(e).during(&format!("uploading blob {}", blob.digest)))?;
    Ok(true)
}

/// Uploads the manifests in order: every child by digest, the last (the top one) under `tag`.
async fn push_manifests(client: &Client, remote: &Remote, manifests: Vec<LayoutManifest>, tag: &str) -> Result<()> {
    let last = manifests.len().saturating_sub(1);
    for (i, m) in manifests.into_iter().enumerate() {
        let reference: Reference =
            if i == last { remote.reference(tag) } else { remote.reference(m.descriptor.digest.as_str()) };
        let content_type = http::HeaderValue::from_str(m.manifest.media_type())
            .map_err(|_| Error::Refused(format!("manifest {} has an unusable media type", m.descriptor.digest)))?;
        client
            .push_manifest_raw(&reference, m.bytes, content_type)
            .await
            .map_err(|e| remote.error(e).during(&format!("uploading manifest {}", m.descriptor.digest)))?;
    }
    Ok(())
}
