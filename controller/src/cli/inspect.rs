//! `alkictl bundle inspect REF|DIR`: a bundle's variants, layers, sizes, metadata and signatures (and whether
//! they verify against the keys given), from a packed OCI layout or a registry.

use std::path::{Path, PathBuf};

use alki_shared::bundle::{self, ANNOTATION_CONTEXT_LENGTH, ANNOTATION_PARAMETERS, RuntimeDefaults};
use alki_shared::digest::Digest;
use alki_shared::oci::{ANNOTATION_TITLE, MAX_MANIFEST_BYTES, Manifest};
use alki_shared::signing::{self, PublicKey, SignatureCheck};
use anyhow::{Context as _, bail};
use serde::Serialize;

use super::layout::Layout;
use super::sign::Remote;

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

enum Source {
    Layout(Layout),
    Remote(Remote, oci_client::Client),
}

impl Source {
    async fn blob(&self, digest: &Digest, limit: u64) -> anyhow::Result<Vec<u8>> {
        match self {
            Source::Layout(layout) => {
                let size = std::fs::metadata(layout.blob_path(digest)).map(|m| m.len()).unwrap_or(0);
                if size > limit {
                    bail!("blob {digest} is {size} bytes, more than the {limit} expected");
                }
                layout.read_blob(digest)
            }
            Source::Remote(remote, client) => remote.small_blob(client, digest, limit).await,
        }
    }
}

/// Inspects `target`: an existing directory is read as an OCI layout, anything else as a registry reference.
pub async fn inspect(
    cli: &super::Cli,
    target: &str,
    key_files: &[PathBuf],
    plain_http: bool,
) -> anyhow::Result<Inspected> {
    let keys = key_files.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let (source, digest, bytes, shown) = if Path::new(target).is_dir() {
        let layout = Layout::open(Path::new(target))?;
        let entries = layout.entries()?;
        let Some(top) = entries.first() else { bail!("{target} has no bundle in index.json") };
        let bytes = layout.read_blob(&top.digest)?;
        (Source::Layout(layout), top.digest.clone(), bytes, target.to_owned())
    } else {
        let (repository, reference) = super::split_bundle_ref(target)?;
        let remote = Remote::new(cli.registry.clone(), repository, cli.registry_auth()?, plain_http);
        let client = remote.client();
        let Some((bytes, digest)) = remote.manifest(&client, &reference).await? else {
            bail!("{target} is not in the registry at {}; check the name or push it", remote.registry);
        };
        let shown = remote.docker_reference();
        (Source::Remote(remote, client), digest, bytes, shown)
    };
    let manifest = Manifest::parse(&bytes, None).with_context(|| format!("parsing {digest}"))?;
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
                if let Manifest::Image(m) = Manifest::parse(&child, None)? {
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
            for check in signing::check_each(&d, &layers, &keys) {
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

/// The table for people.
pub fn render(r: &Inspected) -> String {
    let mut out = format!("bundle {} in {} ({})\n", r.digest, r.source, r.media_type);
    let mut t = super::table(["VARIANT", "QUANT", "ARCH", "PARAMS", "CONTEXT", "WEIGHTS", "MEMORY", "LAYERS"]);
    for v in &r.variants {
        t.add_row([
            super::short(v.digest.as_str()),
            v.quantization.clone(),
            v.architecture.clone(),
            v.parameters.to_string(),
            v.context_length.to_string(),
            super::bytes(v.weights_bytes),
            super::bytes(v.memory_bytes),
            v.layers.iter().map(|l| l.title.as_str()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" "),
        ]);
    }
    out.push_str(&t.to_string());
    out.push('\n');
    if r.signatures.is_empty() {
        out.push_str("signatures: none found (a packed directory holds none; sign with `alkictl bundle sign`)\n");
    } else {
        let mut t = super::table(["SIGNED", "DIGEST", "KEY", "VERIFIED", "PROBLEM"]);
        for s in &r.signatures {
            t.add_row([
                s.of.clone(),
                super::short(s.digest.as_str()),
                s.check.key_fingerprint.as_deref().map(signing::short_fingerprint).unwrap_or_else(|| "-".into()),
                if s.check.verified { "yes".into() } else { "no".into() },
                s.check.problem.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if r.keys.is_empty() && !r.signatures.is_empty() {
        out.push_str("no --key given: signatures were read but none could be verified\n");
    }
    out.push_str(if r.verified { "verified: yes" } else { "verified: no" });
    out
}
