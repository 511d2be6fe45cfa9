//! The signature check an artifact passes before anything its manifests say is acted on: cosign signatures at
//! its `sha256-<hex>.sig` tag verified against the trust policy for its repository, fetched from a registry
//! (and kept in the content store, recorded as the artifact's signature) or read back from the store and
//! checked again with the same code, so an activation from the store alone re-verifies offline.

use alki_shared::digest::Digest;
use alki_shared::oci::{
    ImageManifest, MAX_MANIFEST_BYTES, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_IMAGE_MANIFEST, Manifest,
};
use alki_shared::signing::{self, SignatureLayer, SignatureProblem, Verified};
use futures::StreamExt;
use oci_client::Reference;

use super::blob::is_stream_digest_error;
use super::error::{PullError, Pushed};
use super::manifest::read_small;
use super::registry::{RegistryAccess, Source, is_not_found};
use crate::reference::{BundleLocation, short};
use crate::store::ContentStore;
use crate::trust::RepositoryTrust;

/// Checks the artifact's signature against `trust`, before anything else is fetched. `Ok(None)`: the policy
/// lets unsigned artifacts through and none verified.
///
/// From a registry, the signature manifest and payloads are kept in the store and, once they verify, recorded
/// as the artifact's signature; from the store, that record is read back and every byte checked again
/// (digests, then the signatures against the policy as it is now, so a key removed since refuses).
pub async fn check_signature(
    from: Source<'_>,
    store: &ContentStore,
    artifact: &BundleLocation,
    trust: &RepositoryTrust,
) -> Result<Option<Verified>, PullError> {
    if !trust.required && trust.keys.is_empty() {
        return Ok(None);
    }
    let (layers, manifest) = match from {
        Source::Registry(registry) => fetch_signatures(registry, store, artifact).await?,
        Source::Store => stored_signatures(store, artifact, trust.required).await?,
    };
    match signing::verify(&artifact.digest, &layers, &trust.keys) {
        Ok(verified) => {
            tracing::info!(bundle = %artifact, key = %verified.key_fingerprint, policy = %trust.source, "Signature verified.");
            if let (Source::Registry(_), Some(manifest)) = (from, manifest)
                && let Err(e) = store.set_signature_of(&artifact.digest, &manifest).await
            {
                // Only offline re-verification is lost: the next activation fetches the signature again.
                tracing::warn!(bundle = %artifact, error = %e, "Cannot record the verified signature in the content store.");
            }
            Ok(Some(verified))
        }
        Err(problem) if trust.required => Err(PullError::Signature { problem, policy: trust.source.clone() }),
        Err(problem) => {
            tracing::warn!(bundle = %artifact, %problem, policy = %trust.source, "Signature does not verify; the trust policy does not require one.");
            Ok(None)
        }
    }
}

/// [`check_signature`] for an artifact checked on its own (a runtime build): a signature recorded in the store
/// when it was pulled (or staged) is checked first, against the policy as it is now, so the artifact needs no
/// registry; the registry is asked when none is recorded, or when the recorded one no longer satisfies the
/// policy (the registry may hold a newer signature) and can be reached.
pub async fn check_signature_store_first(
    registry: &RegistryAccess,
    store: &ContentStore,
    artifact: &BundleLocation,
    trust: &RepositoryTrust,
) -> Result<Option<Verified>, PullError> {
    let from_registry = || check_signature(Source::Registry(registry), store, artifact, trust);
    if store.signature_of(&artifact.digest).await.is_none() {
        return from_registry().await;
    }
    match check_signature(Source::Store, store, artifact, trust).await {
        Err(PullError::NotInStore(_)) => from_registry().await,
        Err(refusal @ PullError::Signature { .. }) => match from_registry().await {
            Err(unreachable) if unreachable.is_unreachable() => Err(refusal),
            other => other,
        },
        stored => stored,
    }
}

/// The signatures at the artifact's `sha256-<hex>.sig` tag (none when the tag does not exist), each payload
/// bounded and checked against its digest, and the signature manifest's digest. The manifest and payloads are
/// kept in the store so the signature can be checked again without the registry.
async fn fetch_signatures(
    registry: &RegistryAccess,
    store: &ContentStore,
    artifact: &BundleLocation,
) -> Result<(Vec<SignatureLayer>, Option<Digest>), PullError> {
    let tag = signing::signature_tag(&artifact.digest);
    let origin = registry.registry_of(artifact).to_owned();
    let reference = Reference::with_tag(origin.clone(), artifact.repository.clone(), tag.clone());
    let accepted = [MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST];
    let bytes = match registry.client().pull_manifest_raw(&reference, &registry.auth(artifact), &accepted).await {
        Ok((bytes, _)) => bytes,
        Err(e) if is_not_found(&e) => return Ok((Vec::new(), None)),
        Err(source) => {
            let what = format!("signature manifest {tag}");
            return Err(PullError::Registry {
                what,
                registry: origin,
                source: Box::new(source),
                pushed: Pushed::Bundle,
            });
        }
    };
    let manifest = signature_manifest(&bytes, &tag)?;
    let mut payloads = Vec::new();
    for d in signing::signature_descriptors(&manifest) {
        payloads.push(fetch_payload(registry, artifact, d, &tag).await?);
    }
    let layers = signature_layers(&manifest, payloads.clone(), &tag)?;
    // Kept as fetched (each checked against its digest above), for verifying again without the registry.
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Ok((layers, None));
    }
    let digest = Digest::of(&bytes);
    store.write_bytes(&digest, &bytes).await.map_err(PullError::Store)?;
    for (d, payload) in signing::signature_descriptors(&manifest).into_iter().zip(&payloads) {
        store.write_bytes(&d.digest, payload).await.map_err(PullError::Store)?;
    }
    Ok((layers, Some(digest)))
}

/// One signature payload, bounded by [`signing::MAX_PAYLOAD_BYTES`] while it streams.
async fn fetch_payload(
    registry: &RegistryAccess,
    artifact: &BundleLocation,
    d: &alki_shared::oci::Descriptor,
    tag: &str,
) -> Result<Vec<u8>, PullError> {
    let origin = registry.registry_of(artifact).to_owned();
    let reference = registry.reference(artifact, &d.digest);
    let mut stream = registry.client().pull_blob_stream(&reference, d.digest.as_str()).await.map_err(|source| {
        PullError::Registry {
            what: format!("signature payload {}", short(&d.digest)),
            registry: origin.clone(),
            source: Box::new(source),
            pushed: Pushed::Bundle,
        }
    })?;
    let mut payload = Vec::new();
    while let Some(chunk) = stream.stream.next().await {
        match chunk {
            Ok(chunk) if (payload.len() + chunk.len()) as u64 <= signing::MAX_PAYLOAD_BYTES => {
                payload.extend_from_slice(&chunk)
            }
            Ok(_) => {
                return Err(invalid_signature(tag, format!("payload {} is larger than it says", short(&d.digest))));
            }
            // The payload's digest is checked against its descriptor with the others (`signature_layers`).
            Err(e) if is_stream_digest_error(&e) => break,
            Err(source) => {
                return Err(PullError::Transfer {
                    layer: d.digest.clone(),
                    registry: origin,
                    bytes_on_disk: 0,
                    size: d.size,
                    source,
                });
            }
        }
    }
    Ok(payload)
}

/// The signatures recorded for the artifact in the store (see [`ContentStore::signature_of`]), every byte
/// checked against its digest again with the same code as bytes from a registry. Without a record: none when
/// the policy does not require a signature, else [`PullError::NotInStore`] (the registry may have one).
async fn stored_signatures(
    store: &ContentStore,
    artifact: &BundleLocation,
    required: bool,
) -> Result<(Vec<SignatureLayer>, Option<Digest>), PullError> {
    let tag = signing::signature_tag(&artifact.digest);
    let not_here = || PullError::NotInStore(format!("the signature at {tag}"));
    let Some(digest) = store.signature_of(&artifact.digest).await else {
        return if required { Err(not_here()) } else { Ok((Vec::new(), None)) };
    };
    let bytes = read_small(store, &digest, MAX_MANIFEST_BYTES as u64).await.ok_or_else(not_here)?;
    if Digest::of(&bytes) != digest {
        // Damaged on disk: dropped, so the registry path fetches it again.
        let _ = store.remove(&digest).await;
        return Err(not_here());
    }
    let manifest = signature_manifest(&bytes, &tag)?;
    let mut payloads = Vec::new();
    for d in signing::signature_descriptors(&manifest) {
        let payload = read_small(store, &d.digest, signing::MAX_PAYLOAD_BYTES).await.ok_or_else(not_here)?;
        payloads.push(payload);
    }
    Ok((signature_layers(&manifest, payloads, &tag)?, Some(digest)))
}

fn invalid_signature(tag: &str, reason: String) -> PullError {
    PullError::Signature { problem: SignatureProblem::Invalid { reason }, policy: String::from("signature tag ") + tag }
}

/// A signature manifest, parsed strictly (from a registry or from the store alike).
fn signature_manifest(bytes: &[u8], tag: &str) -> Result<ImageManifest, PullError> {
    match Manifest::parse(bytes, None) {
        Ok(Manifest::Image(m)) => Ok(m),
        Ok(Manifest::Index(_)) => Err(invalid_signature(tag, "the signature tag holds an index".to_owned())),
        Err(e) => Err(invalid_signature(tag, format!("the signature manifest is malformed ({e})"))),
    }
}

/// The signature layers of `manifest` with their payloads (in descriptor order), each payload checked against
/// its descriptor's digest (from a registry or from the store alike).
fn signature_layers(
    manifest: &ImageManifest,
    payloads: Vec<Vec<u8>>,
    tag: &str,
) -> Result<Vec<SignatureLayer>, PullError> {
    let mut layers = Vec::new();
    for (d, payload) in signing::signature_descriptors(manifest).into_iter().zip(payloads) {
        if payload.len() as u64 > signing::MAX_PAYLOAD_BYTES {
            return Err(invalid_signature(tag, format!("payload {} is larger than it says", short(&d.digest))));
        }
        if Digest::of(&payload) != d.digest {
            return Err(invalid_signature(tag, format!("payload {} does not match its digest", short(&d.digest))));
        }
        layers.extend(SignatureLayer::new(d, payload));
    }
    Ok(layers)
}

/// The signature manifest and payload blobs recorded for `artifact`, as far as they are stored: kept with it.
pub async fn signature_blobs(store: &ContentStore, artifact: &Digest) -> Vec<Digest> {
    let Some(signature) = store.signature_of(artifact).await else { return Vec::new() };
    let mut blobs = Vec::new();
    if let Some(bytes) = read_small(store, &signature, MAX_MANIFEST_BYTES as u64).await
        && let Ok(Manifest::Image(m)) = Manifest::parse(&bytes, None)
    {
        blobs.extend(signing::signature_descriptors(&m).into_iter().map(|d| d.digest.clone()));
    }
    blobs.push(signature);
    blobs
}
