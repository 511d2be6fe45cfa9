//! Eval suites as rollouts and insight commands name them: a reference parsed (`repo:tag`, `repo@sha256:…`,
//! with a configured external registry's `host:port/` in front for an external one), pinned by digest,
//! and checked to be an eval suite within its size caps (`alki_shared::eval::artifact::read_manifest`)
//! before any device is told to fetch it; and its cosign signature checked against the fleet's trusted
//! keys, as a rollout candidate's is (`trust`).

use std::sync::Arc;

use alki_shared::digest::Digest;
use alki_shared::eval::artifact::{ArtifactError, read_manifest};
use alki_shared::oci::Manifest;
use alki_shared::proto;
use alki_shared::signing::PublicKey;

use crate::config::ExternalRegistry;
use crate::registry::Registry;
use crate::rollout::external::{self, ExternalError};
use crate::trust::{self, Artifact, CandidateError};

/// Why a suite reference cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("eval suite {0:?}: name it as repository:tag or repository@sha256:<digest>")]
    BadReference(String),
    #[error("eval suite {0} is not in the registry; push it with `alkictl eval push` or check the name")]
    NotFound(String),
    #[error("eval suite {reference} ({digest}) is refused: {problem}")]
    NotASuite { reference: String, digest: String, problem: ArtifactError },
    /// An external registry could not be read or served wrong bytes; the message says which and what to check.
    #[error("{0}")]
    External(String),
    #[error("cannot read eval suite {0} from the embedded registry: {1}")]
    Registry(String, String),
}

/// Where suites come from: the pieces of the controller's `Sources` this module reads.
#[derive(Clone)]
pub struct SuiteSources<'a> {
    pub registry: &'a Arc<Registry>,
    /// host:port agents use to reach the embedded registry.
    pub registry_host: &'a str,
    pub externals: &'a [ExternalRegistry],
}

/// `repo:tag` → (repo, tag); `repo@sha256:…` → (repo, digest). A registry host with a port stays in the
/// repository (`127.0.0.1:5000/acme/suite:v1` → `127.0.0.1:5000/acme/suite`, `v1`).
pub fn parse_reference(reference: &str) -> Option<(&str, &str)> {
    let r = reference.trim();
    if let Some((repository, digest)) = r.split_once('@') {
        return (!repository.is_empty() && digest.parse::<Digest>().is_ok()).then_some((repository, digest));
    }
    let name_start = r.rfind('/').map(|i| i + 1).unwrap_or(0);
    let colon = name_start + r[name_start..].rfind(':')?;
    let (repository, tag) = (&r[..colon], &r[colon + 1..]);
    (!repository.is_empty() && !tag.is_empty()).then_some((repository, tag))
}

/// Pins `reference` to a suite by digest (the embedded registry, or the external one its host names) and
/// checks its manifest is an eval suite within the size caps. The reference agents are given.
pub async fn pin(sources: &SuiteSources<'_>, reference: &str) -> Result<proto::BundleRef, SuiteError> {
    let (repository, tag_or_digest) =
        parse_reference(reference).ok_or_else(|| SuiteError::BadReference(reference.to_owned()))?;
    let (suite, manifest) = match external::split(sources.externals, repository) {
        Some((registry, inner)) => {
            let pinned = external::fetch(registry, inner, tag_or_digest).await.map_err(|e| match e {
                ExternalError::NotFound { .. } => SuiteError::NotFound(reference.to_owned()),
                ExternalError::Invalid(why) | ExternalError::Unreachable(why) => SuiteError::External(why),
            })?;
            (pinned.bundle, pinned.manifest)
        }
        None => {
            let (registry, host) = (sources.registry.clone(), sources.registry_host.to_owned());
            let (repo, reference_in) = (repository.to_owned(), tag_or_digest.to_owned());
            let shown = reference.to_owned();
            tokio::task::spawn_blocking(move || embedded(&registry, &host, &repo, &reference_in, &shown))
                .await
                .map_err(|e| SuiteError::Registry(reference.to_owned(), e.to_string()))??
        }
    };
    let not_a_suite =
        |problem| SuiteError::NotASuite { reference: reference.to_owned(), digest: suite.digest.clone(), problem };
    match &manifest {
        Manifest::Image(image) => read_manifest(image).map_err(not_a_suite)?,
        Manifest::Index(_) => return Err(not_a_suite(ArtifactError::NotASuite(Some("an image index".into())))),
    };
    Ok(suite)
}

/// The suite in the embedded registry, with its manifest. Blocking (the index and a small file).
fn embedded(
    registry: &Registry,
    host: &str,
    repository: &str,
    reference: &str,
    shown: &str,
) -> Result<(proto::BundleRef, Manifest), SuiteError> {
    let stored = registry
        .resolve(repository, reference)
        .map_err(|e| SuiteError::Registry(shown.to_owned(), e.to_string()))?
        .ok_or_else(|| SuiteError::NotFound(shown.to_owned()))?;
    let manifest = Manifest::parse(&stored.bytes, Some(&stored.media_type)).map_err(|e| SuiteError::NotASuite {
        reference: shown.to_owned(),
        digest: stored.digest.to_string(),
        problem: ArtifactError::Malformed(format!("does not parse: {e}")),
    })?;
    let suite = proto::BundleRef {
        registry: host.to_owned(),
        repository: repository.to_owned(),
        digest: stored.digest.to_string(),
        tag: if reference.starts_with("sha256:") { String::new() } else { reference.to_owned() },
    };
    Ok((suite, manifest))
}

/// Checks a pinned suite's signature against the fleet's keys (in the registry it was pinned in).
pub async fn check_signature(
    sources: &SuiteSources<'_>,
    suite: &proto::BundleRef,
    keys: &[PublicKey],
) -> Result<(), CandidateError> {
    let digest: Digest = suite.digest.parse().map_err(|_| CandidateError::Read {
        what: Artifact::EvalSuite,
        repository: suite.repository.clone(),
        digest: Digest::of(b""),
        reason: format!("{:?} is not a digest", suite.digest),
    })?;
    if let Some(external) = sources.externals.iter().find(|r| r.host == suite.registry) {
        return trust::check_external(external, Artifact::EvalSuite, &suite.repository, &digest, keys).await.map(drop);
    }
    let (registry, repository, keys) = (sources.registry.clone(), suite.repository.clone(), keys.to_vec());
    let check = tokio::task::spawn_blocking(move || {
        trust::check_embedded(&registry, Artifact::EvalSuite, &repository, &digest, &keys)
    });
    check
        .await
        .map_err(|e| CandidateError::Read {
            what: Artifact::EvalSuite,
            repository: suite.repository.clone(),
            digest: Digest::of(b""),
            reason: e.to_string(),
        })?
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_repository_and_a_tag_or_digest() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(parse_reference("acme/suite:v1"), Some(("acme/suite", "v1")));
        assert_eq!(parse_reference(&format!("acme/suite@{digest}")), Some(("acme/suite", digest.as_str())));
        assert_eq!(parse_reference("127.0.0.1:5000/acme/suite:v1"), Some(("127.0.0.1:5000/acme/suite", "v1")));
        for bad in ["acme/suite", "127.0.0.1:5000/acme/suite", "acme/suite:", ":v1", "acme/suite@sha256:zz", ""] {
            assert_eq!(parse_reference(bad), None, "{bad}");
        }
    }
}
