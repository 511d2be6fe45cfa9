//! The bundle format: ModelPack media types, `ai.alki.` annotations, the runtime layer, and choosing a variant.
//!
//! A bundle is an OCI image index with one ModelPack manifest per variant (quantization). Each variant
//! manifest carries the GGUF files as raw layers (digest = the file's sha256) and a small runtime layer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::oci::{Descriptor, ImageIndex, ImageManifest};

pub const ARTIFACT_TYPE_MODEL: &str = "application/vnd.cncf.model.manifest.v1+json";
pub const MEDIA_TYPE_MODEL_CONFIG: &str = "application/vnd.cncf.model.config.v1+json";
pub const MEDIA_TYPE_WEIGHT_RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
pub const MEDIA_TYPE_WEIGHT_CONFIG_RAW: &str = "application/vnd.cncf.model.weight.config.v1.raw";
pub const MEDIA_TYPE_DOC_RAW: &str = "application/vnd.cncf.model.doc.v1.raw";
pub const MEDIA_TYPE_RUNTIME: &str = "application/vnd.alki.runtime.v1+json";

pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";
pub const ANNOTATION_QUANTIZATION: &str = "ai.alki.quantization";
pub const ANNOTATION_ARCHITECTURE: &str = "ai.alki.architecture";
pub const ANNOTATION_PARAMETERS: &str = "ai.alki.parameters";
pub const ANNOTATION_CONTEXT_LENGTH: &str = "ai.alki.context-length";
pub const ANNOTATION_WEIGHTS_BYTES: &str = "ai.alki.weights-bytes";
/// Memory needed for the weights plus the KV cache at the runtime layer's default context.
pub const ANNOTATION_MEMORY_BYTES: &str = "ai.alki.memory-bytes";
pub const ANNOTATION_MODEL_NAME: &str = "ai.alki.model-name";

/// ModelPack's model config (`application/vnd.cncf.model.config.v1+json`), the fields we write and read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    pub descriptor: ModelDescriptor,
    pub config: ModelFormat,
    pub modelfs: ModelFs,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelDescriptor {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub licenses: Vec<String>,
    #[serde(default, rename = "createdAt", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelFormat {
    pub format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_size: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<crate::digest::Digest>,
}

/// The runtime layer (`application/vnd.alki.runtime.v1+json`): how to run the variant by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeDefaults {
    /// Context size passed to llama-server (`-c`).
    pub context_size: u32,
    /// CPU threads (`-t`); 0 lets llama-server decide.
    #[serde(default)]
    pub threads: u32,
    /// Layers offloaded to a GPU (`-ngl`); 0 on CPU-only devices.
    #[serde(default)]
    pub gpu_layers: i32,
    /// Parallel slots (`-np`).
    #[serde(default = "default_slots")]
    pub parallel_slots: u32,
    /// Chat template override; empty uses the one inside the GGUF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Path polled for readiness.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// A llama.cpp build to run this variant with (`registry/repository@sha256:...` of a runtime build index
    /// pushed by `alkictl runtime push`); None runs the agent's configured llama-server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_build: Option<String>,
}

fn default_slots() -> u32 {
    1
}

fn default_health_path() -> String {
    "/health".to_owned()
}

impl Default for RuntimeDefaults {
    fn default() -> Self {
        RuntimeDefaults {
            context_size: 2048,
            threads: 0,
            gpu_layers: 0,
            parallel_slots: default_slots(),
            chat_template: None,
            health_path: default_health_path(),
            runtime_build: None,
        }
    }
}

/// A runtime build (`alkictl runtime push`): an OCI image index with one manifest per platform (`platform`
/// os/architecture/variant, annotation [`ANNOTATION_ACCELERATOR`]), each with a [`RuntimeBuildConfig`] config
/// and one tar layer holding `llama-server` and the shared libraries beside it.
pub const ARTIFACT_TYPE_RUNTIME_BUILD: &str = "application/vnd.alki.runtime.build.v1";
pub const MEDIA_TYPE_RUNTIME_BUILD_CONFIG: &str = "application/vnd.alki.runtime.build.config.v1+json";
pub const MEDIA_TYPE_RUNTIME_BUILD_TAR: &str = "application/vnd.alki.runtime.build.v1.tar";
/// `cpu` or `cuda`, on each platform entry of a runtime build index.
pub const ANNOTATION_ACCELERATOR: &str = "ai.alki.accelerator";
/// The CPU features a runtime build's platform entry needs (comma-separated `/proc/cpuinfo` names, e.g.
/// `asimddp,asimdhp` for a build tuned with dotprod and fp16): a device chooses the entry it has every feature
/// of, the most tuned first. Absent: the architecture's baseline, which every device of it runs.
pub const ANNOTATION_CPU_FEATURES: &str = "ai.alki.cpu-features";
/// The CPU features the agent reports and a runtime build may require, by their `/proc/cpuinfo` names (x86
/// `flags`, arm `Features`): the ones llama.cpp's kernels are built for.
pub const CPU_FEATURES: [&str; 20] = [
    "avx",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_int8",
    "fma",
    "f16c",
    "neon",
    "asimd",
    "asimdhp",
    "asimddp",
    "i8mm",
    "sve",
    "sve2",
    "bf16",
    "vfpv4",
];

/// How `alkictl runtime push` and the agent name a runtime build's platform entry: `linux/amd64`,
/// `linux/arm/v7`, `linux/arm64/cuda`, `linux/arm64+asimddp+asimdhp` (accelerator `cpu` is left out).
pub fn runtime_platform_label(
    os: &str,
    architecture: &str,
    variant: Option<&str>,
    accelerator: &str,
    cpu_features: &[String],
) -> String {
    let mut label = format!("{os}/{architecture}");
    for part in variant.into_iter().chain((accelerator != "cpu").then_some(accelerator)) {
        label = label + "/" + part;
    }
    for feature in cpu_features {
        label = label + "+" + feature;
    }
    label
}

/// The comma-separated form of [`ANNOTATION_CPU_FEATURES`] as a list (empty names dropped).
pub fn parse_cpu_features(annotation: &str) -> Vec<String> {
    annotation.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect()
}

/// The program a runtime build must hold at the top of its tar layer.
pub const RUNTIME_BUILD_SERVER: &str = "llama-server";

/// A runtime build's per-platform config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeBuildConfig {
    /// The build's version as the operator names it (e.g. the llama.cpp release).
    pub version: String,
    /// `llama-server --version` output, when it could be read at pack time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build_info: String,
    /// `cpu` or `cuda`.
    pub accelerator: String,
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The CPU features the build needs ([`ANNOTATION_CPU_FEATURES`]); empty for the baseline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
}

/// A runtime build reference pinned by digest: `[registry/]repository@sha256:<hex>` → (registry, repository,
/// digest). The registry is the first path component when it looks like a host (has `.` or `:`, or is
/// `localhost`); otherwise it is empty (the controller's embedded registry). The error says what to do.
pub fn parse_runtime_build(reference: &str) -> Result<(String, String, crate::digest::Digest), String> {
    let Some((name, digest)) = reference.split_once('@') else {
        return Err(format!(
            "runtime build {reference:?} names no digest; a bundle pins its build by digest so every device runs \
             the same bytes: use the pinned reference `alkictl runtime push` printed (REGISTRY/REPOSITORY@sha256:...)"
        ));
    };
    let digest: crate::digest::Digest = digest
        .parse()
        .map_err(|e| format!("runtime build {reference:?}: {e}; copy the digest `alkictl runtime push` printed"))?;
    // A tag before the digest (`repo:tag@sha256:`) is informational: drop it.
    let name = match name.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') && n.contains('/') => n,
        _ => name,
    };
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if is_registry_host(first) => (first, rest),
        _ => ("", name),
    };
    if repository.is_empty() {
        return Err(format!("runtime build {reference:?} names no repository"));
    }
    Ok((registry.to_owned(), repository.to_owned(), digest))
}

/// True when the first path component of a reference names a registry rather than a repository: it has a
/// `.` or `:` (`registry.example.com`, `127.0.0.1:7080`) or is `localhost`, as Docker decides.
pub fn is_registry_host(component: &str) -> bool {
    component.contains(['.', ':']) || component == "localhost"
}

/// Rust's architecture names (`std::env::consts::ARCH`) to OCI's platform architectures.
pub fn oci_architecture(rust: &str) -> &str {
    match rust {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// What the agent needs to know about one variant to choose it, read from the index entry's annotations.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariantInfo {
    pub descriptor: Descriptor,
    pub quantization: String,
    pub architecture: String,
    pub model_name: String,
    pub weights_bytes: u64,
    pub memory_bytes: u64,
}

impl VariantInfo {
    pub fn from_descriptor(d: &Descriptor) -> VariantInfo {
        let number = |key| d.annotation(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let text = |key| d.annotation(key).unwrap_or_default().to_owned();
        VariantInfo {
            descriptor: d.clone(),
            quantization: text(ANNOTATION_QUANTIZATION),
            architecture: text(ANNOTATION_ARCHITECTURE),
            model_name: text(ANNOTATION_MODEL_NAME),
            weights_bytes: number(ANNOTATION_WEIGHTS_BYTES),
            memory_bytes: number(ANNOTATION_MEMORY_BYTES),
        }
    }
}

/// The variants an index offers, in index order.
pub fn variants(index: &ImageIndex) -> Vec<VariantInfo> {
    index.manifests.iter().map(VariantInfo::from_descriptor).collect()
}

/// Chooses the variant to run: the largest (most faithful) whose memory need fits `memory_available`.
/// A variant that does not state its memory need is taken to need its weights' size.
/// Returns `None` when nothing fits.
pub fn choose_variant(index: &ImageIndex, memory_available: u64) -> Option<VariantInfo> {
    variants(index)
        .into_iter()
        .filter(|v| v.memory_bytes.max(v.weights_bytes) <= memory_available)
        .max_by_key(|v| (v.weights_bytes, std::cmp::Reverse(v.descriptor.digest.clone())))
}

/// The variant the controller asked for (a rollout's "recommended per class" policy) when the index lists it
/// and it fits in `memory_available`; otherwise the device's own choice, as [`choose_variant`].
pub fn choose_preferred_variant(
    index: &ImageIndex,
    memory_available: u64,
    preferred: Option<&crate::digest::Digest>,
) -> Option<VariantInfo> {
    let fits = |v: &VariantInfo| v.memory_bytes.max(v.weights_bytes) <= memory_available;
    preferred
        .and_then(|want| variants(index).into_iter().find(|v| &v.descriptor.digest == want && fits(v)))
        .or_else(|| choose_variant(index, memory_available))
}

/// The GGUF layers of a variant manifest, in order (split files come in their file order).
pub fn weight_layers(manifest: &ImageManifest) -> Vec<&Descriptor> {
    manifest.layers.iter().filter(|l| l.media_type == MEDIA_TYPE_WEIGHT_RAW).collect()
}

/// The runtime layer's descriptor, if the variant has one.
pub fn runtime_layer(manifest: &ImageManifest) -> Option<&Descriptor> {
    manifest.layers.iter().find(|l| l.media_type == MEDIA_TYPE_RUNTIME)
}

/// A file name from a layer's annotations that is safe to create inside a bundle directory:
/// one plain path component, no separators, no `..`, no leading dot.
pub fn safe_file_name(layer: &Descriptor) -> Option<&str> {
    let name = layer.annotation(crate::oci::ANNOTATION_TITLE).or(layer.annotation(ANNOTATION_FILEPATH))?;
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name != "..";
    plain.then_some(name)
}

/// Annotations for an index entry describing a variant.
pub fn variant_annotations(
    quantization: &str,
    architecture: &str,
    model_name: &str,
    parameters: u64,
    context_length: u64,
    weights_bytes: u64,
    memory_bytes: u64,
) -> BTreeMap<String, String> {
    [
        (ANNOTATION_QUANTIZATION, quantization.to_owned()),
        (ANNOTATION_ARCHITECTURE, architecture.to_owned()),
        (ANNOTATION_MODEL_NAME, model_name.to_owned()),
        (ANNOTATION_PARAMETERS, parameters.to_string()),
        (ANNOTATION_CONTEXT_LENGTH, context_length.to_string()),
        (ANNOTATION_WEIGHTS_BYTES, weights_bytes.to_string()),
        (ANNOTATION_MEMORY_BYTES, memory_bytes.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::oci::MEDIA_TYPE_IMAGE_MANIFEST;

    fn entry(name: &str, weights: u64, memory: u64) -> Descriptor {
        let mut d = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, Digest::of(name.as_bytes()), 100);
        d.annotations = variant_annotations(name, "llama", "tiny", 1, 2048, weights, memory);
        d
    }

    fn index(entries: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            manifests: entries,
            subject: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn chooses_the_largest_variant_that_fits() {
        let idx = index(vec![entry("Q4_K_M", 400, 600), entry("Q8_0", 800, 1000), entry("F16", 1600, 1800)]);
        assert_eq!(choose_variant(&idx, 1200).map(|v| v.quantization), Some("Q8_0".to_owned()));
        assert_eq!(choose_variant(&idx, 10_000).map(|v| v.quantization), Some("F16".to_owned()));
        assert_eq!(choose_variant(&idx, 599), None);
    }

    #[test]
    fn a_preferred_variant_wins_when_it_fits_and_only_then() {
        let idx = index(vec![entry("Q4_K_M", 400, 600), entry("Q8_0", 800, 1000), entry("F16", 1600, 1800)]);
        let q4 = Digest::of(b"Q4_K_M");
        let f16 = Digest::of(b"F16");
        let other = Digest::of(b"other");
        let chosen = |memory, preferred| choose_preferred_variant(&idx, memory, preferred).map(|v| v.quantization);
        assert_eq!(chosen(10_000, Some(&q4)), Some("Q4_K_M".to_owned()));
        // Too big for this device: its own choice instead.
        assert_eq!(chosen(1200, Some(&f16)), Some("Q8_0".to_owned()));
        // Not in the index: its own choice instead.
        assert_eq!(chosen(10_000, Some(&other)), Some("F16".to_owned()));
        assert_eq!(chosen(10_000, None), Some("F16".to_owned()));
    }

    #[test]
    fn file_names_that_leave_the_bundle_are_refused() {
        let mut layer = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, Digest::of(b"x"), 1);
        for bad in ["../evil.gguf", "/etc/passwd", "a/b.gguf", "..", ".hidden", ""] {
            layer.annotations.insert(crate::oci::ANNOTATION_TITLE.to_owned(), bad.to_owned());
            assert_eq!(safe_file_name(&layer), None, "{bad}");
        }
        layer.annotations.insert(crate::oci::ANNOTATION_TITLE.to_owned(), "model-q4.gguf".to_owned());
        assert_eq!(safe_file_name(&layer), Some("model-q4.gguf"));
    }

    #[test]
    fn runtime_defaults_without_a_build_still_parse_and_round_trip_with_one() {
        let old: RuntimeDefaults = serde_json::from_str(r#"{"context_size":512,"threads":2}"#).expect("old layer");
        assert_eq!(old.runtime_build, None);
        assert!(!serde_json::to_string(&old).expect("json").contains("runtime_build"), "absent stays absent");
        let with = RuntimeDefaults { runtime_build: Some("r:5000/a/llama@sha256:00".into()), ..old };
        let back: RuntimeDefaults = serde_json::from_slice(&serde_json::to_vec(&with).expect("json")).expect("parse");
        assert_eq!(back, with);
    }

    #[test]
    fn runtime_build_references_must_be_pinned() {
        let hex = "a".repeat(64);
        let (registry, repository, digest) =
            parse_runtime_build(&format!("127.0.0.1:7080/acme/llama@sha256:{hex}")).expect("pinned");
        assert_eq!((registry.as_str(), repository.as_str()), ("127.0.0.1:7080", "acme/llama"));
        assert_eq!(digest.hex(), hex);
        let (registry, repository, _) = parse_runtime_build(&format!("acme/llama:b1@sha256:{hex}")).expect("tag");
        assert_eq!((registry.as_str(), repository.as_str()), ("", "acme/llama"));
        let err = parse_runtime_build("127.0.0.1:7080/acme/llama:b1").expect_err("tag only");
        assert!(err.contains("alkictl runtime push"), "{err}");
        assert!(parse_runtime_build("acme/llama@sha256:zz").is_err());
    }

    #[test]
    fn runtime_defaults_reject_unknown_fields() {
        let ok: RuntimeDefaults = serde_json::from_str(r#"{"context_size":512}"#).expect("minimal");
        assert_eq!(ok.health_path, "/health");
        assert!(serde_json::from_str::<RuntimeDefaults>(r#"{"context_size":512,"bogus":1}"#).is_err());
    }
}
