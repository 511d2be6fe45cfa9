//! Signing a pushed bundle (`alkictl bundle sign`): its index digest and each variant manifest with cosign's
//! classic key-based scheme, appending to any signatures already at each `sha256-<hex>.sig` tag. A single
//! manifest (an eval suite, a runtime build's platform manifest) is signed alone, the same way.

use alki_shared::digest::Digest;
use alki_shared::eval::artifact::ARTIFACT_TYPE_EVAL_SUITE;
use alki_shared::oci::{MEDIA_TYPE_IMAGE_MANIFEST, Manifest};
use alki_shared::signing::{self, SigningKey, signature_layer, signature_manifest, signature_tag};
use oci_client::Client;
use serde::Serialize;

use crate::error::{ManifestContext as _, Result, refuse};
use crate::reference::BundleRef;
use crate::registry::Remote;

#[derive(Debug, Serialize)]
pub struct Signed {
    /// `registry/repository@sha256:...`, a reference every alkictl command accepts.
    pub reference: String,
    pub key_fingerprint: String,
    pub signatures: Vec<SignedDigest>,
}

#[derive(Debug, Serialize)]
pub struct SignedDigest {
    /// `index`, `variant <quantization>`, `suite` or `manifest`.
    pub what: String,
    pub digest: Digest,
    pub tag: String,
    /// Signatures at the tag after this one was added.
    pub signatures_at_tag: usize,
}

/// Signs `reference` (tag or digest) in `remote` and, when it is an index, every manifest it lists.
pub async fn sign(remote: &Remote, reference: &str, key: &SigningKey) -> Result<Signed> {
    let client = remote.client();
    client
        .auth(&remote.reference(reference), &remote.auth(), oci_client::RegistryOperation::Push)
        .await
        .map_err(|e| remote.error(e))?;
    let Some((bytes, digest)) = remote.manifest(&client, reference).await? else {
        refuse!("{} is not in the registry; push it first with `alkictl bundle push`", remote.named(reference));
    };
    let mut targets = vec![("index".to_owned(), digest.clone())];
    match Manifest::parse(&bytes, None).parsing(|| format!("manifest {digest}"))? {
        Manifest::Index(index) => {
            for v in alki_shared::bundle::variants(&index) {
                targets.push((format!("variant {}", v.quantization), v.descriptor.digest.clone()));
            }
        }
        Manifest::Image(image) if image.artifact_type.as_deref() == Some(ARTIFACT_TYPE_EVAL_SUITE) => {
            targets[0].0 = "suite".to_owned();
        }
        Manifest::Image(_) => targets[0].0 = "manifest".to_owned(),
    }
    let mut signed = Vec::new();
    for (what, d) in targets {
        let count =
            sign_digest(&client, remote, &d, key).await.map_err(|e| e.during(&format!("signing {what} {d}")))?;
        signed.push(SignedDigest { what, tag: signature_tag(&d), digest: d, signatures_at_tag: count });
    }
    Ok(Signed {
        reference: BundleRef::pinned(Some(&remote.registry), &remote.repository, &digest).to_string(),
        key_fingerprint: key.public_key().fingerprint().to_owned(),
        signatures: signed,
    })
}

/// Adds `key`'s signature of `digest` to the signature manifest at its tag (created when missing; a
/// signature already there from the same key for the same payload is not added twice). Returns how many
/// signatures the tag holds now.
pub async fn sign_digest(client: &Client, remote: &Remote, digest: &Digest, key: &SigningKey) -> Result<usize> {
    let payload = signing::payload(&remote.docker_reference(), digest);
    let signature = key.sign(&payload)?;
    let tag = signature_tag(digest);
    let mut layers = match remote.manifest(client, &tag).await? {
        Some((bytes, _)) => match Manifest::parse(&bytes, None).parsing(|| format!("signature tag {tag}"))? {
            Manifest::Image(m) => m.layers,
            Manifest::Index(_) => refuse!("tag {tag} holds an index, not a signature manifest; delete it first"),
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
        if !client.blob_exists(&at(&d), d.as_str()).await.map_err(|e| remote.error(e))? {
            client.push_blob(&at(&d), bytes, d.as_str()).await.map_err(|e| remote.error(e))?;
        }
    }
    let body = serde_json::to_vec(&manifest)?;
    let content_type = http::HeaderValue::from_static(MEDIA_TYPE_IMAGE_MANIFEST);
    client.push_manifest_raw(&remote.reference(&tag), body, content_type).await.map_err(|e| remote.error(e))?;
    Ok(manifest.layers.len())
}
