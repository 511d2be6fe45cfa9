//! `alkictl bundle push`: uploads a packed bundle's blobs and manifests to a registry, streaming every blob.

use std::path::Path;

use alki_shared::digest::Digest;
use alki_shared::oci::{Descriptor, Manifest};
use anyhow::{Context as _, bail};
use futures::TryStreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Serialize;

use super::layout::Layout;

pub struct PushTarget {
    /// host:port of the registry.
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// From [`super::Cli::registry_auth`].
    pub auth: RegistryAuth,
    pub plain_http: bool,
}

#[derive(Serialize)]
pub struct Pushed {
    pub reference: String,
    pub digest: Digest,
    pub uploaded_bytes: u64,
    pub skipped_blobs: usize,
}

pub fn client(registry: &str, plain_http: bool) -> Client {
    let protocol =
        if plain_http { ClientProtocol::HttpsExcept(vec![registry.to_owned()]) } else { ClientProtocol::Https };
    let extra_root_certificates = super::ca_roots()
        .into_iter()
        .map(|data| oci_client::client::Certificate { encoding: oci_client::client::CertificateEncoding::Pem, data })
        .collect();
    Client::new(ClientConfig { protocol, extra_root_certificates, ..Default::default() })
}

pub async fn push(dir: &Path, target: &PushTarget, progress: &indicatif::ProgressBar) -> anyhow::Result<Pushed> {
    let layout = Layout::open(dir)?;
    let entries = layout.entries()?;
    let Some(top) = entries.first() else { bail!("{} has no bundle in index.json", dir.display()) };
    let top_bytes = layout.read_blob(&top.digest)?;
    let top_manifest = Manifest::parse(&top_bytes, Some(&top.media_type))?;

    // Children first: a registry refuses a manifest whose references it does not hold yet.
    let mut manifests: Vec<(Descriptor, Vec<u8>, Manifest)> = Vec::new();
    if let Manifest::Index(index) = &top_manifest {
        for entry in &index.manifests {
            let bytes = layout.read_blob(&entry.digest)?;
            let parsed = Manifest::parse(&bytes, Some(&entry.media_type))?;
            manifests.push((entry.clone(), bytes, parsed));
        }
    }
    manifests.push((top.clone(), top_bytes, top_manifest));

    let client = client(&target.registry, target.plain_http);
    let auth = target.auth.clone();
    let by_digest =
        |d: &Digest| Reference::with_digest(target.registry.clone(), target.repository.clone(), d.to_string());
    let first_ref = by_digest(&top.digest);
    client
        .auth(&first_ref, &auth, oci_client::RegistryOperation::Push)
        .await
        .map_err(|e| explain(e, &target.registry))?;

    let blobs: Vec<Descriptor> = manifests
        .iter()
        .filter_map(|(_, _, m)| match m {
            Manifest::Image(image) => Some(std::iter::once(image.config.clone()).chain(image.layers.clone())),
            Manifest::Index(_) => None,
        })
        .flatten()
        .collect();
    progress.set_length(blobs.iter().map(|b| b.size).sum());
    let (mut uploaded, mut skipped) = (0u64, 0usize);
    let mut done = std::collections::HashSet::new();
    for blob in blobs {
        if !done.insert(blob.digest.clone()) {
            continue;
        }
        let reference = by_digest(&blob.digest);
        if client.blob_exists(&reference, blob.digest.as_str()).await.map_err(|e| explain(e, &target.registry))? {
            progress.inc(blob.size);
            skipped += 1;
            continue;
        }
        let path = layout.blob_path(&blob.digest);
        let file = tokio::fs::File::open(&path).await.with_context(|| format!("opening {}", path.display()))?;
        let bar = progress.clone();
        // oci-client sends chunks of 4 MiB; reading in 4 MiB keeps each PATCH full without buffering more.
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 4 << 20)
            .inspect_ok(move |chunk| bar.inc(chunk.len() as u64))
            .map_err(OciDistributionError::IoError);
        client
            .push_blob_stream(&reference, stream, blob.digest.as_str(), Some(blob.size))
            .await
            .map_err(|e| explain(e, &target.registry))
            .with_context(|| format!("uploading blob {}", blob.digest))?;
        uploaded += blob.size;
    }

    let last = manifests.len() - 1;
    for (i, (desc, bytes, manifest)) in manifests.into_iter().enumerate() {
        let reference = if i == last {
            Reference::with_tag(target.registry.clone(), target.repository.clone(), target.tag.clone())
        } else {
            by_digest(&desc.digest)
        };
        let content_type = http::HeaderValue::from_str(manifest.media_type())?;
        client
            .push_manifest_raw(&reference, bytes, content_type)
            .await
            .map_err(|e| explain(e, &target.registry))
            .with_context(|| format!("uploading manifest {}", desc.digest))?;
    }
    progress.finish_and_clear();
    Ok(Pushed {
        reference: format!("{}/{}:{}", target.registry, target.repository, target.tag),
        digest: top.digest.clone(),
        uploaded_bytes: uploaded,
        skipped_blobs: skipped,
    })
}

/// The controller's token as a Basic password (the embedded registry's scheme); anonymous without one.
pub fn token_auth(token: Option<String>) -> RegistryAuth {
    match token {
        Some(token) => RegistryAuth::Basic("alkictl".into(), token),
        None => RegistryAuth::Anonymous,
    }
}

/// Turns the client's errors into sentences that say what to do.
pub fn explain(error: OciDistributionError, registry: &str) -> anyhow::Error {
    let text = error.to_string();
    if text.contains("error sending request") || text.contains("connect") {
        anyhow::anyhow!(
            "cannot reach the registry at {registry}: {text}; is the controller running and --registry right?"
        )
    } else if text.contains("401") || text.contains("Unauthorized") || text.contains("UNAUTHORIZED") {
        anyhow::anyhow!("the registry at {registry} refused the credentials: {text}; pass a push or operator token")
    } else {
        anyhow::anyhow!("registry {registry}: {text}")
    }
}
