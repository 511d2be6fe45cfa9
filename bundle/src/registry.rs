//! The registry client every bundle operation shares: a repository in a registry and how to reach it
//! ([`Remote`]: address, login, plain HTTP or TLS with extra trusted roots), manifest and small-blob reads
//! checked against their digests, the cosign signatures stored for a digest, and registry errors as
//! [`Error::Registry`] with advice.

use alki_shared::digest::Digest;
use alki_shared::oci::{
    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, Manifest,
};
use alki_shared::signing::{MAX_PAYLOAD_BYTES, SignatureLayer, signature_descriptors, signature_tag};
use futures::StreamExt as _;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::error::{Error, ManifestContext as _, RegistryFailure, Result, refuse};
use crate::reference::BundleRef;

/// Manifest media types a read accepts.
const ACCEPTED: [&str; 4] =
    [MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST];

/// A registry repository and how to reach it.
#[derive(Clone)]
pub struct Remote {
    /// `host:port` of the registry.
    pub registry: String,
    pub repository: String,
    pub auth: RegistryAuth,
    /// Plain HTTP instead of TLS (a registry on loopback in tests, or one without TLS yet).
    pub plain_http: bool,
    /// PEM certificates trusted for TLS besides the system's (the controller's CA).
    pub extra_roots: Vec<Vec<u8>>,
}

impl Remote {
    /// `repository` in `registry`, logging in with `auth`, trusting the system's roots only.
    pub fn new(registry: String, repository: String, auth: RegistryAuth, plain_http: bool) -> Remote {
        Remote { registry, repository, auth, plain_http, extra_roots: Vec::new() }
    }

    /// The controller's token as a Basic password, as the embedded registry expects; anonymous without one.
    pub fn with_token(registry: String, repository: String, token: Option<String>, plain_http: bool) -> Remote {
        Remote::new(registry, repository, token_auth(token), plain_http)
    }

    /// Also trusts these PEM certificates for TLS (e.g. the controller's CA).
    pub fn trusting(mut self, roots: Vec<Vec<u8>>) -> Remote {
        self.extra_roots = roots;
        self
    }

    /// The same registry and login, another repository.
    pub fn in_repository(&self, repository: &str) -> Remote {
        Remote { repository: repository.to_owned(), ..self.clone() }
    }

    /// A client for this registry: plain HTTP only to it when asked, the extra roots trusted.
    pub fn client(&self) -> Client {
        let protocol = if self.plain_http {
            ClientProtocol::HttpsExcept(vec![self.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let extra_root_certificates = self
            .extra_roots
            .iter()
            .map(|data| Certificate { encoding: CertificateEncoding::Pem, data: data.clone() })
            .collect();
        Client::new(ClientConfig { protocol, extra_root_certificates, ..Default::default() })
    }

    pub fn auth(&self) -> RegistryAuth {
        self.auth.clone()
    }

    /// The client's reference to `tag_or_digest` in this repository.
    pub fn reference(&self, tag_or_digest: &str) -> Reference {
        if tag_or_digest.starts_with("sha256:") {
            Reference::with_digest(self.registry.clone(), self.repository.clone(), tag_or_digest.to_owned())
        } else {
            Reference::with_tag(self.registry.clone(), self.repository.clone(), tag_or_digest.to_owned())
        }
    }

    /// `registry/repository`, the identity cosign writes into payloads.
    pub fn docker_reference(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `tag_or_digest` in this repository as a reference people can pass back to alkictl.
    pub fn named(&self, tag_or_digest: &str) -> BundleRef {
        match tag_or_digest.parse::<Digest>() {
            Ok(digest) => BundleRef::pinned(Some(&self.registry), &self.repository, &digest),
            Err(_) => BundleRef::tagged(Some(&self.registry), &self.repository, tag_or_digest),
        }
    }

    /// Turns a client error into [`Error::Registry`] naming this registry.
    pub fn error(&self, error: OciDistributionError) -> Error {
        registry_error(error, &self.registry)
    }

    /// A manifest by tag or digest: its bytes (checked against the digest when one was named) and digest;
    /// None when the registry does not have it.
    pub async fn manifest(&self, client: &Client, reference: &str) -> Result<Option<(Vec<u8>, Digest)>> {
        match client.pull_manifest_raw(&self.reference(reference), &self.auth(), &ACCEPTED).await {
            Ok((bytes, _)) => {
                let digest = Digest::of(&bytes);
                if reference.starts_with("sha256:") && digest.as_str() != reference {
                    return Err(Error::Corrupt(format!(
                        "the registry served {digest} for {reference}; it is corrupt or not the one you meant"
                    )));
                }
                Ok(Some((bytes.to_vec(), digest)))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    /// The signatures stored for `digest` (empty when it has none), each payload fetched and size-bounded.
    pub async fn signatures(&self, client: &Client, digest: &Digest) -> Result<Vec<SignatureLayer>> {
        let tag = signature_tag(digest);
        let Some((bytes, _)) = self.manifest(client, &tag).await? else { return Ok(Vec::new()) };
        let Manifest::Image(manifest) = Manifest::parse(&bytes, None).parsing(|| format!("signature tag {tag}"))?
        else {
            refuse!("the signature tag {tag} holds an index, not a signature manifest");
        };
        let mut layers = Vec::new();
        for d in signature_descriptors(&manifest) {
            let payload = self.small_blob(client, &d.digest, MAX_PAYLOAD_BYTES).await?;
            layers.extend(SignatureLayer::new(d, payload));
        }
        Ok(layers)
    }

    /// A small blob (at most `limit` bytes), checked against its digest.
    pub async fn small_blob(&self, client: &Client, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let reference = self.reference(digest.as_str());
        let mut stream = client.pull_blob_stream(&reference, digest.as_str()).await.map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| Error::Registry {
                registry: self.registry.clone(),
                failure: RegistryFailure::Other,
                detail: format!("reading blob {digest}: {e}"),
            })?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > limit {
                return Err(Error::Corrupt(format!(
                    "blob {digest} is larger than {limit} bytes; it is not what it claims to be"
                )));
            }
        }
        if &Digest::of(&out) != digest {
            return Err(Error::Corrupt(format!(
                "blob {digest} does not match its digest; the registry copy is corrupt"
            )));
        }
        Ok(out)
    }
}

/// The controller's token as a Basic password (the embedded registry's scheme); anonymous without one.
pub fn token_auth(token: Option<String>) -> RegistryAuth {
    match token {
        Some(token) => RegistryAuth::Basic("alkictl".into(), token),
        None => RegistryAuth::Anonymous,
    }
}

/// True when the registry said the manifest or repository does not exist.
pub fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown))
        }
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

/// Sorts a client error into unreachable, refused credentials or anything else, keeping its text.
pub fn registry_error(error: OciDistributionError, registry: &str) -> Error {
    let detail = error.to_string();
    let failure = if detail.contains("error sending request") || detail.contains("connect") {
        RegistryFailure::Unreachable
    } else if detail.contains("401") || detail.contains("Unauthorized") || detail.contains("UNAUTHORIZED") {
        RegistryFailure::Unauthorized
    } else {
        RegistryFailure::Other
    };
    Error::Registry { registry: registry.to_owned(), failure, detail }
}
