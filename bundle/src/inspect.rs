//! Inspecting a bundle (`alkictl bundle inspect REF|DIR`): its variants, layers, sizes, metadata and
//! signatures (and whether they verify against the keys given), from a packed OCI layout or a registry.

use std::path::PathBuf;

use alki_shared::bundle::{self, ANNOTATION_CONTEXT_LENGTH, ANNOTATION_PARAMETERS, RuntimeDefaults};
use alki_shared::digest::Digest;
use alki_shared::oci::{ANNOTATION_TITLE, MAX_MANIFEST_BYTES, Manifest};
use alki_shared::signing::{self, PublicKey, SignatureCheck};
use serde::Serialize;

use crate::error::{ManifestContext as _, Result, refuse};
use crate::layout::Layout;
use crate::registry::Remote;

#[derive(Debug, Serialize)]
pub struct Inspected {
    /// The directory or `registry/repository` read.
    pub source: String,
    pub digest: Digest,
    pub media_type: String,
    pub variants: Vec<VariantView>,
    /// Signatures of the index and of each variant manifest (registry only: a layout holds none).
    pub signatures: Vec<SignatureView>,
    /// Fingerprints of the keys signatures were checked against.
    pub keys: Vec<String>,
    /// True when the bundle's own digest has a signature that verifies against one of `keys`.
    pub verified: bool,
}

#[derive(Debug, Serialize)]
pub struct VariantView {
    pub digest: Digest,
    pub quantization: String,
    pub architecture: String,
    pub model_name: String,
    pub parameters: u64,
    pub context_length: u64,
    pub weights_bytes: u64,
    pub memory_bytes: u64,
    pub layers: Vec<LayerView>,
    pub runtime: Option<RuntimeDefaults>,
}

#[derive(Debug, Serialize)]
pub struct LayerView {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub title: String,
}

#[derive(Debug, Serialize)]
pub struct SignatureView {
    /// `index` or `variant <quantization>`.
    pub of: String,
    pub digest: Digest,
    #[serde(flatten)]
    pub check: SignatureCheck,
}

/// What to inspect.
pub enum Target {
    /// A packed OCI layout directory.
    Layout(PathBuf),
    /// A tag or digest (`tag_or_digest`) in a registry repository.
    Registry { remote: Remote, tag_or_digest: String },
}

/// Where the blobs are read from.
enum Source {
    Layout(Layout),
    Remote(Remote, oci_client::Client),
}

impl Source {
    async fn blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        match self {
            Source::Layout(layout) => {
                let size = std::fs::metadata(layout.blob_path(digest)).map(|m| m.len()).unwrap_or(0);
                if size > limit {
                    refuse!("blob {digest} is {size} bytes, more than the {limit} expected");
                }
                layout.read_blob(digest)
            }
            Source::Remote(remote, client) => remote.small_blob(client, digest, limit).await,
        }
    }
}

/// The top manifest of a target: where it was read, its digest, its bytes and how to show where it is.
async fn open(target: Target) -> Result<(Source, Digest, Vec<u8>, String)> {
    match target {
        Target::Layout(dir) => {
            let layout = Layout::open(&dir)?;
            let entries = layout.entries()?;
            let Some(top) = entries.first() else { refuse!("{} has no bundle in index.json", dir.display()) };
            let bytes = layout.read_blob(&top.digest)?;
            Ok((Source::Layout(layout), top.digest.clone(), bytes, dir.display().to_string()))
        }
        Target::Registry { remote, tag_or_digest } => {
            let client = remote.client();
            let Some((bytes, digest)) = remote.manifest(&client, &tag_or_digest).await? else {
                refuse!("{} is not in the registry; check the name or push it", remote.named(&tag_or_digest));
            };
            let shown = remote.docker_reference();
            Ok((Source::Remote(remote, client), digest, bytes, shown))
        }
    }
}

/// Inspects `target`, checking every signature found against `keys`.
pub async fn inspect(target: Target, keys: &[PublicKey]) -> Result<Inspected> {
    let (source, digest, bytes, shown) = open(target).await?;
    let manifest = Manifest::parse(&bytes, None).parsing(|| format!("parsing {digest}"))?;
    let mut variants = Vec::new();
    let mut signed = vec![("index".to_owned(), digest.clone())];
    match &manifest {
        Manifest::Index(index) => {
            for v in bundle::variants(index) {
                let d = &v.descriptor;
                let number = |key| d.annotation(key).and_then(|s| s.parse().ok()).unwrap_or(0);
                let mut view = VariantView {
                    digest: d.digest.clone(),
                    quantization: v.quantization.clone(),
                    architecture: v.architecture.clone(),
                    model_name: v.model_name.clone(),
                    parameters: number(ANNOTATION_PARAMETERS),
                    context_length: number(ANNOTATION_CONTEXT_LENGTH),
                    weights_bytes: v.weights_bytes,
                    memory_bytes: v.memory_bytes,
                    layers: Vec::new(),
                    runtime: None,
                };
                let child = source.blob(&d.digest, MAX_MANIFEST_BYTES as u64).await?;
                if let Manifest::Image(m) = Manifest::parse(&child, None).parsing(|| format!("variant {}", d.digest))? {
                    view.layers = m.layers.iter().map(layer_view).collect();
                    if let Some(runtime) = bundle::runtime_layer(&m) {
                        let bytes = source.blob(&runtime.digest, 64 << 10).await?;
                        view.runtime = serde_json::from_slice(&bytes).ok();
                    }
                }
                signed.push((format!("variant {}", v.quantization), d.digest.clone()));
                variants.push(view);
            }
        }
        Manifest::Image(m) => {
            signed[0].0 = "manifest".to_owned();
            variants.push(VariantView {
                digest: digest.clone(),
                quantization: m.config.annotation(bundle::ANNOTATION_QUANTIZATION).unwrap_or_default().to_owned(),
                architecture: String::new(),
                model_name: String::new(),
                parameters: 0,
                context_length: 0,
                weights_bytes: bundle::weight_layers(m).iter().map(|l| l.size).sum(),
                memory_bytes: 0,
                layers: m.layers.iter().map(layer_view).collect(),
                runtime: None,
            });
        }
    }
    let mut signatures = Vec::new();
    if let Source::Remote(remote, client) = &source {
        for (of, d) in signed {
            let layers = remote.signatures(client, &d).await?;
            for check in signing::check_each(&d, &layers, keys) {
                signatures.push(SignatureView { of: of.clone(), digest: d.clone(), check });
            }
        }
    }
    let verified = signatures.iter().any(|s| s.digest == digest && s.check.verified);
    Ok(Inspected {
        source: shown,
        media_type: manifest.media_type().to_owned(),
        digest,
        variants,
        signatures,
        keys: keys.iter().map(|k| k.fingerprint().to_owned()).collect(),
        verified,
    })
}

fn layer_view(l: &alki_shared::oci::Descriptor) -> LayerView {
    LayerView {
        media_type: l.media_type.clone(),
        digest: l.digest.clone(),
        size: l.size,
        title: l.annotation(ANNOTATION_TITLE).unwrap_or_default().to_owned(),
    }
}
