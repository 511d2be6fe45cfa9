//! Bundles in external registries: which rollouts name one, and pinning the candidate there by digest
//! ([`pin`]; [`fetch`] reads any manifest there, e.g. an eval suite's).
//!
//! A rollout names an external registry by prefixing the repository with its `host:port` exactly as
//! configured (`127.0.0.1:5000/acme/qwen:v2`). Any other repository is the embedded registry's, unchanged.

use alki_shared::bundle::{variants, weight_layers};
use alki_shared::digest::Digest;
use alki_shared::oci::{
    MAX_MANIFEST_BYTES, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST, Manifest,
};
use alki_shared::proto;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::config::ExternalRegistry;

/// Why a bundle could not be pinned in an external registry.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error(
        "bundle {repository}:{reference} is not in the registry; push it with `alkictl bundle push` or check the name"
    )]
    NotFound { repository: String, reference: String },
    /// The reference or what it names is not a bundle; the message says why.
    #[error("{0}")]
    Invalid(String),
    /// The registry could not be read or served wrong bytes; the message says which and what to check.
    #[error("{0}")]
    Unreachable(String),
}

/// A bundle pinned by digest in an external registry.
#[derive(Clone, Debug)]
pub struct Pinned {
    /// The reference agents are given (its tag is empty when the rollout named a digest).
    pub bundle: proto::BundleRef,
    /// The bundle's manifest, checked against the digest.
    pub manifest: Manifest,
}

const ACCEPTED_MANIFESTS: [&str; 4] =
    [MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST];

/// The configured external registry `repository` starts with, and the repository inside it.
pub fn split<'a>(registries: &'a [ExternalRegistry], repository: &'a str) -> Option<(&'a ExternalRegistry, &'a str)> {
    let (host, rest) = repository.split_once('/')?;
    let registry = registries.iter().find(|r| r.host == host)?;
    (!rest.is_empty()).then_some((registry, rest))
}

/// Resolves `reference` (a tag or a digest) in `repository` of `registry` to a digest, checks the bytes
/// against it and that the manifest is a bundle (an index with variants, or a manifest with GGUF layers),
/// and returns the bundle reference agents are given with its manifest.
pub async fn pin(registry: &ExternalRegistry, repository: &str, reference: &str) -> Result<Pinned, ExternalError> {
    let pinned = fetch(registry, repository, reference).await?;
    let digest = &pinned.bundle.digest;
    let not_bundle = |why: &str| {
        ExternalError::Invalid(format!(
            "{}/{repository}:{reference} ({digest}) is not a bundle: {why}; push one made by alkictl bundle pack",
            registry.host
        ))
    };
    match &pinned.manifest {
        Manifest::Index(index) if variants(index).is_empty() => return Err(not_bundle("its index lists no variants")),
        Manifest::Image(m) if weight_layers(m).is_empty() => return Err(not_bundle("it has no GGUF weight layer")),
        _ => {}
    }
    Ok(pinned)
}

/// Resolves `reference` (a tag or a digest) in `repository` of `registry` to a digest and reads its
/// manifest, checked against the digest and parsed, whatever artifact it is (bundles, eval suites).
pub async fn fetch(registry: &ExternalRegistry, repository: &str, reference: &str) -> Result<Pinned, ExternalError> {
    let not_found = || ExternalError::NotFound {
        repository: format!("{}/{repository}", registry.host),
        reference: reference.to_owned(),
    };
    let protocol = if registry.plain_http {
        ClientProtocol::HttpsExcept(vec![registry.host.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(30)),
        ..Default::default()
    });
    let expected = if reference.starts_with("sha256:") {
        Some(reference.parse::<Digest>().map_err(|e| ExternalError::Invalid(format!("candidate {reference:?}: {e}")))?)
    } else {
        None
    };
    let oci_ref = match &expected {
        Some(d) => Reference::with_digest(registry.host.clone(), repository.to_owned(), d.to_string()),
        None => Reference::with_tag(registry.host.clone(), repository.to_owned(), reference.to_owned()),
    };
    let auth = match &registry.credentials {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let (bytes, _) = client.pull_manifest_raw(&oci_ref, &auth, &ACCEPTED_MANIFESTS).await.map_err(|e| match e {
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown | oci_client::errors::OciErrorCode::NameUnknown
                )
            }) =>
        {
            not_found()
        }
        other => ExternalError::Unreachable(format!(
            "cannot read {}/{repository}:{reference} from external registry {}: {other}; check that it is \
             reachable from the controller and the controller's credentials for it",
            registry.host, registry.host
        )),
    })?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ExternalError::Invalid(format!(
            "the manifest of {repository}:{reference} is too large for a bundle"
        )));
    }
    let digest = Digest::of(&bytes);
    if let Some(expected) = &expected
        && expected != &digest
    {
        return Err(ExternalError::Unreachable(format!(
            "external registry {} served {repository}@{expected} with bytes of digest {digest}; the registry copy \
             is corrupt",
            registry.host
        )));
    }
    let manifest = Manifest::parse(&bytes, None).map_err(|e| {
        ExternalError::Invalid(format!(
            "{}/{repository}:{reference} ({digest}) is not an OCI manifest: {e}; push it again",
            registry.host
        ))
    })?;
    let tag = if expected.is_some() { String::new() } else { reference.to_owned() };
    let bundle = proto::BundleRef {
        registry: registry.host.clone(),
        repository: repository.to_owned(),
        digest: digest.to_string(),
        tag,
    };
    Ok(Pinned { bundle, manifest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_out_of_debug_output() {
        let registry = ExternalRegistry {
            credentials: Some(("ci".to_owned(), "hunter2".to_owned())),
            ..ExternalRegistry::new("reg.example:5000")
        };
        let shown = format!("{registry:?}");
        assert!(shown.contains("ci") && !shown.contains("hunter2"), "{shown}");
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_named_with_what_to_check() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let host = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let registry = ExternalRegistry { plain_http: true, ..ExternalRegistry::new(host.clone()) };
        let err = pin(&registry, "acme/tiny", "v1").await.expect_err("nothing listens");
        assert!(matches!(err, ExternalError::Unreachable(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&host) && text.contains("reachable from the controller"), "{text}");
    }

    #[test]
    fn only_configured_hosts_name_an_external_registry() {
        let registries = [ExternalRegistry::new("127.0.0.1:5000"), ExternalRegistry::new("reg.example")];
        let (r, repo) = split(&registries, "127.0.0.1:5000/acme/qwen").expect("configured");
        assert_eq!((r.host.as_str(), repo), ("127.0.0.1:5000", "acme/qwen"));
        assert_eq!(split(&registries, "reg.example/a").map(|(r, p)| (r.host.as_str(), p)), Some(("reg.example", "a")));
        assert!(split(&registries, "acme/qwen").is_none(), "embedded");
        assert!(split(&registries, "other.example:5000/acme/qwen").is_none(), "not configured: embedded");
        assert!(split(&registries, "127.0.0.1:5000/").is_none());
        assert!(split(&[], "127.0.0.1:5000/acme/qwen").is_none());
    }
}
