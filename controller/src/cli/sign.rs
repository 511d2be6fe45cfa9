//! `alkictl bundle sign`: signs a pushed bundle's index digest and each variant manifest with cosign's
//! classic key-based scheme, appending to any signatures already at each `sha256-<hex>.sig` tag; and the
//! registry reads (`manifest`, `signatures`) that `bundle inspect` shares.

use alki_shared::digest::Digest;
use alki_shared::oci::{
    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, Manifest,
};
use alki_shared::signing::{
    self, MAX_PAYLOAD_BYTES, SignatureLayer, SigningKey, signature_descriptors, signature_layer, signature_manifest,
    signature_tag,
};
use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Serialize;

use super::push::explain;

const ACCEPTED: [&str; 4] =
    [MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST];

/// A registry repository and how to reach it.
pub struct Remote {
    pub registry: String,
    pub repository: String,
    pub auth: RegistryAuth,
    pub plain_http: bool,
}

impl Remote {
    /// The controller's token as a Basic password, as the embedded registry expects; anonymous without one.
    pub fn with_token(registry: String, repository: String, token: Option<String>, plain_http: bool) -> Remote {
        Remote::new(registry, repository, super::push::token_auth(token), plain_http)
    }

    /// `auth` comes from [`super::Cli::registry_auth`].
    pub fn new(registry: String, repository: String, auth: RegistryAuth, plain_http: bool) -> Remote {
        Remote { registry, repository, auth, plain_http }
    }

    pub fn client(&self) -> Client {
        super::push::client(&self.registry, self.plain_http)
    }

    pub fn auth(&self) -> RegistryAuth {
        self.auth.clone()
    }

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

    /// A manifest by tag or digest: its bytes (checked against the digest when one was named) and digest.
    pub async fn manifest(&self, client: &Client, reference: &str) -> anyhow::Result<Option<(Vec<u8>, Digest)>> {
        match client.pull_manifest_raw(&self.reference(reference), &self.auth(), &ACCEPTED).await {
            Ok((bytes, _)) => {
                let digest = Digest::of(&bytes);
                if reference.starts_with("sha256:") && digest.as_str() != reference {
                    bail!("the registry served {digest} for {reference}; it is corrupt or not the one you meant");
                }
                Ok(Some((bytes.to_vec(), digest)))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(explain(e, &self.registry)),
        }
    }

    /// The signatures stored for `digest` (empty when it has none), each payload fetched and size-bounded.
    pub async fn signatures(&self, client: &Client, digest: &Digest) -> anyhow::Result<Vec<SignatureLayer>> {
        let Some((bytes, _)) = self.manifest(client, &signature_tag(digest)).await? else { return Ok(Vec::new()) };
        let Manifest::Image(manifest) = Manifest::parse(&bytes, None)? else {
            bail!("the signature tag {} holds an index, not a signature manifest", signature_tag(digest));
        };
        let mut layers = Vec::new();
        for d in signature_descriptors(&manifest) {
            let payload = self.small_blob(client, &d.digest, MAX_PAYLOAD_BYTES).await?;
            layers.extend(SignatureLayer::new(d, payload));
        }
        Ok(layers)
    }

    /// A small blob (at most `limit` bytes), checked against its digest.
    pub async fn small_blob(&self, client: &Client, digest: &Digest, limit: u64) -> anyhow::Result<Vec<u8>> {
        let reference = self.reference(digest.as_str());
        let mut stream =
            client.pull_blob_stream(&reference, digest.as_str()).await.map_err(|e| explain(e, &self.registry))?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.with_context(|| format!("reading blob {digest}"))?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > limit {
                bail!("blob {digest} is larger than {limit} bytes; it is not what it claims to be");
            }
        }
        if &Digest::of(&out) != digest {
            bail!("blob {digest} does not match its digest; the registry copy is corrupt");
        }
        Ok(out)
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

#[derive(Debug, Serialize)]
pub struct Signed {
    pub reference: String,
    pub key_fingerprint: String,
    pub signatures: Vec<SignedDigest>,
}

#[derive(Debug, Serialize)]
pub struct SignedDigest {
    /// `index` or `variant <quantization>`.
    pub what: String,
    pub digest: Digest,
    pub tag: String,
    /// Signatures at the tag after this one was added.
    pub signatures_at_tag: usize,
}

/// Signs `reference` (tag or digest) in `remote` and, when it is an index, every manifest it lists.
pub async fn sign(remote: &Remote, reference: &str, key: &SigningKey) -> anyhow::Result<Signed> {
    let client = remote.client();
    let first = remote.reference(reference);
    client
        .auth(&first, &remote.auth(), oci_client::RegistryOperation::Push)
        .await
        .map_err(|e| explain(e, &remote.registry))?;
    let Some((bytes, digest)) = remote.manifest(&client, reference).await? else {
        bail!(
            "{}:{reference} is not in the registry at {}; push it first with `alkictl bundle push`",
            remote.repository,
            remote.registry
        );
    };
    let mut targets = vec![("index".to_owned(), digest.clone())];
    if let Manifest::Index(index) = Manifest::parse(&bytes, None)? {
        for v in alki_shared::bundle::variants(&index) {
            targets.push((format!("variant {}", v.quantization), v.descriptor.digest.clone()));
        }
    } else {
        targets[0].0 = "manifest".to_owned();
    }
    let mut signed = Vec::new();
    for (what, d) in targets {
        let count = sign_digest(&client, remote, &d, key).await.with_context(|| format!("signing {what} {d}"))?;
        signed.push(SignedDigest { what, tag: signature_tag(&d), digest: d, signatures_at_tag: count });
    }
    Ok(Signed {
        reference: format!("{}@{}", remote.docker_reference(), digest),
        key_fingerprint: key.public_key().fingerprint().to_owned(),
        signatures: signed,
    })
}

/// Adds `key`'s signature of `digest` to the signature manifest at its tag (created when missing; a
/// signature already there from the same key for the same payload is not added twice). Returns how many
/// signatures the tag holds now.
pub async fn sign_digest(client: &Client, remote: &Remote, digest: &Digest, key: &SigningKey) -> anyhow::Result<usize> {
    let payload = signing::payload(&remote.docker_reference(), digest);
    let signature = key.sign(&payload)?;
    let tag = signature_tag(digest);
    let mut layers = match remote.manifest(client, &tag).await? {
        Some((bytes, _)) => match Manifest::parse(&bytes, None)? {
            Manifest::Image(m) => m.layers,
            Manifest::Index(_) => bail!("tag {tag} holds an index, not a signature manifest; delete it first"),
        },
        None => Vec::new(),
    };
    let already = layers.iter().any(|l| {
        l.digest == Digest::of(&payload)
            && l.annotation(signing::ANNOTATION_SIGNATURE).is_some_and(|s| key.public_key().verifies(&payload, s))
    });
    if !already {
        layers.push(signature_layer(&payload, &signature));
    }
    let (manifest, config) = signature_manifest(layers);
    let at = |d: &Digest| remote.reference(d.as_str());
    for (bytes, d) in [(payload.clone(), Digest::of(&payload)), (config.clone(), manifest.config.digest.clone())] {
        if !client.blob_exists(&at(&d), d.as_str()).await.map_err(|e| explain(e, &remote.registry))? {
            client.push_blob(&at(&d), bytes, d.as_str()).await.map_err(|e| explain(e, &remote.registry))?;
        }
    }
    let body = serde_json::to_vec(&manifest)?;
    let content_type = http::HeaderValue::from_static(MEDIA_TYPE_IMAGE_MANIFEST);
    client
        .push_manifest_raw(&remote.reference(&tag), body, content_type)
        .await
        .map_err(|e| explain(e, &remote.registry))?;
    Ok(manifest.layers.len())
}
