//! The fleet's trusted signing keys: checking a rollout candidate's cosign signature before the rollout is
//! created (whether a failed check may be overridden is the rollout's creation rule, `rollout::create`),
//! and reading the signatures the embedded registry holds for a digest (ListBundles shows them).
//!
//! Signatures live in the same registry as the bundle (`sha256-<hex>.sig`); the embedded registry is read
//! directly, an external one over OCI.

use alki_shared::digest::Digest;
use alki_shared::oci::{MAX_MANIFEST_BYTES, Manifest};
use alki_shared::proto;
use alki_shared::signing::{self, PublicKey, SignatureLayer, SignatureProblem, Verified};

use crate::config::ExternalRegistry;
use crate::registry::Registry;

/// Why a rollout's candidate is refused.
#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    #[error(
        "{what} {repository}@{digest} cannot be rolled out: {problem}; the controller trusts {trusted} (--trusted-key). \
         Sign it with `alkictl bundle sign {repository}@{digest} --key KEY` using a key the controller and the \
         agents trust, or pass --override-signature-check --reason \"...\" to alkictl rollout create (agents \
         still enforce their own trust policy)"
    )]
    Signature { what: Artifact, repository: String, digest: Digest, problem: SignatureProblem, trusted: String },
    #[error("cannot read the signatures of {what} {repository}@{digest}: {reason}; check the registry and retry")]
    Read { what: Artifact, repository: String, digest: Digest, reason: String },
}

/// What a rollout names that must be signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    Bundle,
    EvalSuite,
}

impl std::fmt::Display for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Artifact::Bundle => "bundle",
            Artifact::EvalSuite => "eval suite",
        })
    }
}

impl CandidateError {
    pub fn problem(&self) -> Option<&SignatureProblem> {
        match self {
            CandidateError::Signature { problem, .. } => Some(problem),
            CandidateError::Read { .. } => None,
        }
    }
}

/// The signatures stored in the embedded registry for `digest` in `repository` (blocking: small file reads).
pub fn embedded_signatures(registry: &Registry, repository: &str, digest: &Digest) -> Vec<SignatureLayer> {
    let tag = signing::signature_tag(digest);
    let Ok(Some(stored)) = registry.resolve(repository, &tag) else { return Vec::new() };
    let Ok(Manifest::Image(manifest)) = Manifest::parse(&stored.bytes, Some(&stored.media_type)) else {
        return Vec::new();
    };
    let mut layers = Vec::new();
    for d in signing::signature_descriptors(&manifest) {
        let Some(path) = registry.blob_path(&d.digest) else { continue };
        let Ok(bytes) = std::fs::read(&path) else { continue };
        // The registry verified the blob when it was pushed; a file changed on disk since is not trusted.
        if Digest::of(&bytes) == d.digest {
            layers.extend(SignatureLayer::new(d, bytes));
        }
    }
    layers
}

/// Checks `digest` (a candidate or an eval suite) in `repository` (embedded registry) against the fleet's keys.
pub fn check_embedded(
    registry: &Registry,
    what: Artifact,
    repository: &str,
    digest: &Digest,
    keys: &[PublicKey],
) -> Result<Verified, CandidateError> {
    let layers = embedded_signatures(registry, repository, digest);
    signing::verify(digest, &layers, keys).map_err(|problem| refused(what, repository, digest, problem, keys))
}

/// Checks a candidate or an eval suite in an external registry, reading its signature tag there.
pub async fn check_external(
    external: &ExternalRegistry,
    what: Artifact,
    repository: &str,
    digest: &Digest,
    keys: &[PublicKey],
) -> Result<Verified, CandidateError> {
    let auth = match &external.credentials {
        Some((user, password)) => oci_client::secrets::RegistryAuth::Basic(user.clone(), password.clone()),
        None => oci_client::secrets::RegistryAuth::Anonymous,
    };
    let remote = alki_bundle::Remote::new(external.host.clone(), repository.to_owned(), auth, external.plain_http);
    let shown = format!("{}/{repository}", external.host);
    let layers = remote.signatures(&remote.client(), digest).await.map_err(|e| CandidateError::Read {
        what,
        repository: shown.clone(),
        digest: digest.clone(),
        reason: format!("{e:#}"),
    })?;
    signing::verify(digest, &layers, keys).map_err(|problem| refused(what, &shown, digest, problem, keys))
}

fn refused(
    what: Artifact,
    repository: &str,
    digest: &Digest,
    problem: SignatureProblem,
    keys: &[PublicKey],
) -> CandidateError {
    let trusted = if keys.is_empty() {
        "no key".to_owned()
    } else {
        keys.iter().map(|k| signing::short_fingerprint(k.fingerprint())).collect::<Vec<_>>().join(", ")
    };
    CandidateError::Signature { what, repository: repository.to_owned(), digest: digest.clone(), problem, trusted }
}

/// The digest a candidate reference resolves to in the embedded registry, if it is there.
pub fn resolve_embedded(registry: &Registry, repository: &str, reference: &str) -> Option<Digest> {
    let stored = registry.resolve(repository, reference).ok()??;
    (stored.bytes.len() <= MAX_MANIFEST_BYTES).then_some(stored.digest)
}

/// Checks a rollout spec's candidate against the fleet's keys before the rollout is created. `Ok(None)`
/// when the candidate cannot be found: creating the rollout then reports that with its own message.
pub async fn check_candidate(
    registry: &std::sync::Arc<Registry>,
    externals: &[ExternalRegistry],
    keys: &[PublicKey],
    spec: &proto::RolloutSpec,
) -> Result<Option<Verified>, CandidateError> {
    if let Some((external, repository)) = crate::rollout::external::split(externals, &spec.repository) {
        let Ok(pinned) = crate::rollout::external::pin(external, repository, &spec.candidate).await else {
            return Ok(None);
        };
        let Ok(digest) = pinned.bundle.digest.parse::<Digest>() else { return Ok(None) };
        return check_external(external, Artifact::Bundle, repository, &digest, keys).await.map(Some);
    }
    let (registry, repository, candidate, keys) =
        (registry.clone(), spec.repository.clone(), spec.candidate.clone(), keys.to_vec());
    // Reading the index and small blobs is blocking I/O.
    tokio::task::spawn_blocking(move || {
        let Some(digest) = resolve_embedded(&registry, &repository, &candidate) else { return Ok(None) };
        check_embedded(&registry, Artifact::Bundle, &repository, &digest, &keys).map(Some)
    })
    .await
    .unwrap_or_else(|join| {
        Err(CandidateError::Read {
            what: Artifact::Bundle,
            repository: spec.repository.clone(),
            digest: Digest::of(b""),
            reason: join.to_string(),
        })
    })
}
