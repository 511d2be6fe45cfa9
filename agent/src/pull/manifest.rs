//! Manifests (and other small documents) of an artifact: read from the content store or fetched from a
//! registry, always checked against the digest that names them, kept in the store once they match.

use alki_shared::digest::Digest;
use alki_shared::oci::{
    MAX_MANIFEST_BYTES, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST, Manifest,
};
use oci_client::errors::OciDistributionError;

use super::error::{PullError, Pushed};
use super::registry::{RegistryAccess, Source};
use crate::reference::{BundleLocation, short};
use crate::store::ContentStore;

const ACCEPTED_MANIFESTS: [&str; 4] =
    [MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST];

/// A manifest from the store if present (verified when it was stored), else from the registry, checked
/// against `digest` and stored.
pub async fn fetch_manifest(
    registry: &RegistryAccess,
    store: &ContentStore,
    artifact: &BundleLocation,
    digest: &Digest,
    what: &str,
) -> Result<Manifest, PullError> {
    let bytes = match read_small(store, digest, MAX_MANIFEST_BYTES as u64).await {
        Some(bytes) => bytes,
        None => fetch_and_store(registry, store, artifact, digest, what).await?,
    };
    parse(&bytes, digest, what)
}

/// The manifest's bytes from the registry, checked against `digest` and kept in the store.
async fn fetch_and_store(
    registry: &RegistryAccess,
    store: &ContentStore,
    artifact: &BundleLocation,
    digest: &Digest,
    what: &str,
) -> Result<Vec<u8>, PullError> {
    let reference = registry.reference(artifact, digest);
    let pulled = registry.client().pull_manifest_raw(&reference, &registry.auth(artifact), &ACCEPTED_MANIFESTS).await;
    let (bytes, _) = pulled.map_err(|source| match source {
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError { actual, .. }) => {
            PullError::ManifestDigest {
                what: what.to_owned(),
                expected: digest.clone(),
                actual,
                pushed: Pushed::Bundle,
            }
        }
        source => PullError::Registry {
            what: format!("{what} {}", short(digest)),
            registry: registry.registry_of(artifact).to_owned(),
            source: Box::new(source),
            pushed: Pushed::Bundle,
        },
    })?;
    let actual = Digest::of(&bytes);
    if &actual != digest {
        return Err(PullError::ManifestDigest {
            what: what.to_owned(),
            expected: digest.clone(),
            actual: actual.to_string(),
            pushed: Pushed::Bundle,
        });
    }
    if bytes.len() <= MAX_MANIFEST_BYTES {
        store.write_bytes(digest, &bytes).await.map_err(PullError::Store)?;
    }
    Ok(bytes.to_vec())
}

/// A manifest from `from`: [`fetch_manifest`] from a registry; from the store alone, the stored bytes hashed
/// again and checked against `digest` (a damaged copy is removed, so the registry path fetches it anew).
pub async fn manifest_from(
    from: Source<'_>,
    store: &ContentStore,
    artifact: &BundleLocation,
    digest: &Digest,
    what: &str,
) -> Result<Manifest, PullError> {
    match from {
        Source::Registry(registry) => fetch_manifest(registry, store, artifact, digest, what).await,
        Source::Store => {
            let not_here = || PullError::NotInStore(format!("{what} {}", short(digest)));
            let bytes = read_small(store, digest, MAX_MANIFEST_BYTES as u64).await.ok_or_else(not_here)?;
            if &Digest::of(&bytes) != digest {
                let _ = store.remove(digest).await;
                return Err(not_here());
            }
            parse(&bytes, digest, what)
        }
    }
}

fn parse(bytes: &[u8], digest: &Digest, what: &str) -> Result<Manifest, PullError> {
    Manifest::parse(bytes, None).map_err(|source| PullError::Manifest {
        what: what.to_owned(),
        digest: digest.clone(),
        source,
    })
}

/// A stored blob's bytes when present and at most `limit` bytes long.
pub async fn read_small(store: &ContentStore, digest: &Digest, limit: u64) -> Option<Vec<u8>> {
    let size = store.size(digest).await?;
    if size > limit {
        return None;
    }
    tokio::fs::read(store.path(digest)).await.ok()
}

/// A stored manifest parsed, when present (no digest check: for bookkeeping, never for what is served).
pub async fn stored_manifest(store: &ContentStore, digest: &Digest) -> Option<Manifest> {
    let bytes = read_small(store, digest, MAX_MANIFEST_BYTES as u64).await?;
    Manifest::parse(&bytes, None).ok()
}
