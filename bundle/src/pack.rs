//! Packing GGUF files as a bundle in an OCI layout (`alkictl bundle pack`): one ModelPack variant per
//! quantization (a split GGUF, `-00001-of-0000N.gguf`, is one variant with its parts as layers in order),
//! each with a runtime layer and doc layers: license text, README, and an SPDX JSON SBOM of every file with
//! its sha256.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alki_shared::bundle::{
    self, ARTIFACT_TYPE_MODEL, MEDIA_TYPE_DOC_RAW, MEDIA_TYPE_MODEL_CONFIG, MEDIA_TYPE_RUNTIME, MEDIA_TYPE_WEIGHT_RAW,
    ModelConfig, ModelDescriptor, ModelFormat, ModelFs, RuntimeDefaults,
};
use alki_shared::digest::Digest;
use alki_shared::gguf::{self, GgufInfo};
use alki_shared::oci::{
    ANNOTATION_CREATED, ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
};
use serde::Serialize;

use crate::error::{Error, IoContext as _, Result, refuse};
use crate::layout::Layout;
use crate::progress::Progress;
use crate::sbom::{SBOM_NAME, spdx_sbom};

pub struct PackOptions {
    pub files: Vec<PathBuf>,
    pub out: PathBuf,
    /// Model name; defaults to the GGUF's `general.name`.
    pub name: Option<String>,
    pub version: Option<String>,
    pub license: Option<String>,
    /// Default context for the runtime layer; capped by the model's training context.
    pub context: u32,
    pub tag: String,
}

/// Optional contents of a bundle beyond its GGUF files; [`PackExtras::default`] adds only the SBOM.
#[derive(Clone, Debug, Default)]
pub struct PackExtras {
    /// License text, as the doc layer `LICENSE`.
    pub license_file: Option<PathBuf>,
    /// A README, as the doc layer `README.md`.
    pub readme: Option<PathBuf>,
    /// Runtime defaults beyond the context: threads (`-t`), GPU layers (`-ngl`), a chat template file.
    pub threads: u32,
    pub gpu_layers: i32,
    pub chat_template: Option<PathBuf>,
    /// A runtime build pinned by digest (`registry/repository@sha256:...`), written into the runtime layer.
    pub runtime_build: Option<String>,
    /// Hard-link each GGUF file into the layout instead of copying it (`--link`): packing then only reads
    /// and hashes. The layout shares the file with its source, so the source must not be modified in place.
    pub link_weights: bool,
}

/// The doc layer's file names.
pub const LICENSE_NAME: &str = "LICENSE";
pub const README_NAME: &str = "README.md";
/// Doc files are text for people; anything larger is not one.
const MAX_DOC_BYTES: u64 = 16 << 20;

/// What was packed, for the table or `-o json`.
#[derive(Debug, Serialize)]
pub struct Packed {
    pub layout: PathBuf,
    pub tag: String,
    pub digest: Digest,
    pub variants: Vec<PackedVariant>,
}

#[derive(Debug, Serialize)]
pub struct PackedVariant {
    /// The GGUF file (the first part of a split model).
    pub file: PathBuf,
    /// Every part of a split model, in order (just `file` otherwise).
    pub parts: Vec<PathBuf>,
    pub digest: Digest,
    pub quantization: String,
    pub architecture: String,
    pub parameters: u64,
    pub context_length: u64,
    pub size: u64,
    pub memory_bytes: u64,
}

/// Packs `opts.files` with only the SBOM as extra content.
pub fn pack(opts: &PackOptions, progress: &Progress) -> Result<Packed> {
    pack_with(opts, &PackExtras::default(), progress)
}

/// [`pack`] with doc layers and runtime defaults beyond the context. Every input is read and checked
/// before anything is written, so a refused pack leaves no directory behind.
pub fn pack_with(opts: &PackOptions, extras: &PackExtras, progress: &Progress) -> Result<Packed> {
    let inputs = Inputs::read(opts, extras)?;
    progress.set_length(opts.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum());

    let layout = Layout::create(&opts.out)?;
    let created = now_rfc3339();
    let doc_layers = write_doc_layers(&layout, &inputs.docs)?;
    let mut entries = Vec::new();
    let mut variants = Vec::new();
    for (group, info) in inputs.groups.iter().zip(&inputs.infos) {
        let variant = VariantInput { group, info, doc_layers: &doc_layers, created: &created };
        let (entry, packed) = variant.pack(&layout, opts, extras, inputs.chat_template.as_deref(), progress)?;
        entries.push(entry);
        variants.push(packed);
    }

    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_INDEX.into()),
        artifact_type: Some(ARTIFACT_TYPE_MODEL.into()),
        manifests: entries,
        subject: None,
        annotations: BTreeMap::from([(ANNOTATION_CREATED.to_owned(), created)]),
    };
    let index_bytes = serde_json::to_vec(&index)?;
    let index_digest = layout.write_blob(&index_bytes)?;
    layout.write_index(
        Descriptor::new(MEDIA_TYPE_IMAGE_INDEX, index_digest.clone(), index_bytes.len() as u64),
        &opts.tag,
    )?;
    progress.finish();
    Ok(Packed { layout: opts.out.clone(), tag: opts.tag.clone(), digest: index_digest, variants })
}

/// Everything a pack reads before it writes: the GGUF files grouped by split set with their metadata
/// (headers only, never tensor data), the doc files and the chat template.
struct Inputs {
    groups: Vec<Vec<PathBuf>>,
    infos: Vec<GgufInfo>,
    docs: Vec<(&'static str, Vec<u8>)>,
    chat_template: Option<String>,
}

impl Inputs {
    fn read(opts: &PackOptions, extras: &PackExtras) -> Result<Inputs> {
        if opts.files.is_empty() {
            refuse!("name at least one GGUF file to pack");
        }
        let groups = group_split_files(&opts.files)?;
        let mut infos = Vec::new();
        for group in &groups {
            // The reader's errors name the file and say what is wrong with it.
            let mut info = gguf::read_file(&group[0])?.info();
            for part in &group[1..] {
                info.parameter_count =
                    info.parameter_count.saturating_add(gguf::read_file(part)?.info().parameter_count);
            }
            infos.push(info);
        }
        one_file_per_quantization(&groups, &infos)?;
        if let Some(build) = &extras.runtime_build {
            // Refused before anything is written: a tag could move under the fleet; a digest cannot.
            bundle::parse_runtime_build(build).map_err(|e| Error::Refused(format!("--runtime-build: {e}")))?;
        }
        let chat_template = match &extras.chat_template {
            Some(path) => Some(read_text(path, "chat template")?),
            None => None,
        };
        Ok(Inputs { groups, infos, docs: read_docs(extras)?, chat_template })
    }
}

fn one_file_per_quantization(groups: &[Vec<PathBuf>], infos: &[GgufInfo]) -> Result<()> {
    let mut seen = BTreeMap::new();
    for (group, info) in groups.iter().zip(infos) {
        let quantization = info.quantization.clone().unwrap_or_else(|| "unknown".into());
        if let Some(other) = seen.insert(quantization.clone(), &group[0]) {
            refuse!(
                "{} and {} are both {quantization}; a bundle holds one file (or split set) per quantization",
                other.display(),
                group[0].display()
            );
        }
    }
    Ok(())
}

/// The doc files as layers every variant shares.
fn write_doc_layers(layout: &Layout, docs: &[(&'static str, Vec<u8>)]) -> Result<Vec<Descriptor>> {
    let mut layers = Vec::new();
    for (name, bytes) in docs {
        let mut d = Descriptor::new(MEDIA_TYPE_DOC_RAW, layout.write_blob(bytes)?, bytes.len() as u64);
        d.annotations.insert(ANNOTATION_TITLE.into(), (*name).to_owned());
        d.annotations.insert(bundle::ANNOTATION_FILEPATH.into(), (*name).to_owned());
        layers.push(d);
    }
    Ok(layers)
}

/// One variant to pack: a GGUF file (or split set), its metadata, and what every variant shares.
struct VariantInput<'a> {
    group: &'a [PathBuf],
    info: &'a GgufInfo,
    doc_layers: &'a [Descriptor],
    created: &'a str,
}

impl VariantInput<'_> {
    /// Writes the variant's weights, runtime layer, SBOM, config and manifest; returns its index entry.
    fn pack(
        &self,
        layout: &Layout,
        opts: &PackOptions,
        extras: &PackExtras,
        chat_template: Option<&str>,
        progress: &Progress,
    ) -> Result<(Descriptor, PackedVariant)> {
        let info = self.info;
        let weights = store_weights(layout, self.group, extras.link_weights, progress)?;
        let size: u64 = weights.iter().map(|d| d.size).sum();
        let architecture = info.architecture.clone().unwrap_or_default();
        let quantization = info.quantization.clone().unwrap_or_else(|| "unknown".into());
        let first_name = file_name(&self.group[0])?;
        let name = opts.name.clone().or_else(|| info.name.clone()).unwrap_or(first_name);
        let trained = info.context_length.unwrap_or(u64::from(opts.context));
        let context = u64::from(opts.context).min(trained.max(1));
        let memory = size.saturating_add(info.kv_cache_bytes(context));

        let runtime = RuntimeDefaults {
            context_size: context as u32,
            threads: extras.threads,
            gpu_layers: extras.gpu_layers,
            chat_template: chat_template.map(str::to_owned),
            runtime_build: extras.runtime_build.clone(),
            ..RuntimeDefaults::default()
        };
        let runtime_layer = runtime_layer(layout, &runtime)?;
        let sbom_layer = self.sbom_layer(layout, opts, &name, &quantization, &weights, &runtime_layer)?;
        let config = ModelConfig {
            descriptor: ModelDescriptor {
                name: name.clone(),
                version: opts.version.clone(),
                licenses: opts.license.iter().cloned().collect(),
                created_at: Some(self.created.to_owned()),
            },
            config: ModelFormat {
                format: "gguf".into(),
                architecture: Some(architecture.clone()),
                quantization: Some(quantization.clone()),
                param_size: Some(info.parameter_count.to_string()),
            },
            modelfs: ModelFs { kind: "layers".into(), diff_ids: weights.iter().map(|d| d.digest.clone()).collect() },
        };
        let config_bytes = serde_json::to_vec(&config)?;
        let config_desc =
            Descriptor::new(MEDIA_TYPE_MODEL_CONFIG, layout.write_blob(&config_bytes)?, config_bytes.len() as u64);

        let mut layers = weights;
        layers.push(runtime_layer);
        layers.extend(self.doc_layers.iter().cloned());
        layers.push(sbom_layer);
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.into()),
            artifact_type: Some(ARTIFACT_TYPE_MODEL.into()),
            config: config_desc,
            layers,
            subject: None,
            annotations: BTreeMap::from([(ANNOTATION_CREATED.to_owned(), self.created.to_owned())]),
        };
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let manifest_digest = layout.write_blob(&manifest_bytes)?;
        let mut entry =
            Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, manifest_digest.clone(), manifest_bytes.len() as u64);
        entry.artifact_type = Some(ARTIFACT_TYPE_MODEL.into());
        entry.annotations = bundle::variant_annotations(
            &quantization,
            &architecture,
            &name,
            info.parameter_count,
            trained,
            size,
            memory,
        );
        let packed = PackedVariant {
            file: self.group[0].clone(),
            parts: self.group.to_vec(),
            digest: manifest_digest,
            quantization,
            architecture,
            parameters: info.parameter_count,
            context_length: trained,
            size,
            memory_bytes: memory,
        };
        Ok((entry, packed))
    }

    /// The SBOM listing every file of the variant (weights, runtime layer, docs) with its sha256.
    fn sbom_layer(
        &self,
        layout: &Layout,
        opts: &PackOptions,
        name: &str,
        quantization: &str,
        weights: &[Descriptor],
        runtime_layer: &Descriptor,
    ) -> Result<Descriptor> {
        let mut files: Vec<(&str, &Digest)> = weights
            .iter()
            .chain(self.doc_layers)
            .chain(std::iter::once(runtime_layer))
            .map(|d| (d.annotation(ANNOTATION_TITLE).unwrap_or_default(), &d.digest))
            .collect();
        files.sort();
        let sbom =
            spdx_sbom(name, opts.version.as_deref(), opts.license.as_deref(), quantization, &files, self.created);
        let bytes = serde_json::to_vec_pretty(&sbom)?;
        let mut d = Descriptor::new(MEDIA_TYPE_DOC_RAW, layout.write_blob(&bytes)?, bytes.len() as u64);
        d.annotations.insert(ANNOTATION_TITLE.into(), SBOM_NAME.into());
        d.annotations.insert(bundle::ANNOTATION_FILEPATH.into(), SBOM_NAME.into());
        Ok(d)
    }
}

/// Copies (or hard-links) each part of a variant into the layout as a weight layer, in part order.
fn store_weights(layout: &Layout, group: &[PathBuf], link: bool, progress: &Progress) -> Result<Vec<Descriptor>> {
    let mut layers = Vec::new();
    for part in group {
        let part_name = file_name(part)?;
        progress.set_message(&part_name);
        let (digest, size) = if link { layout.link_blob(part, progress)? } else { layout.copy_blob(part, progress)? };
        let mut d = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, digest, size);
        d.annotations.insert(ANNOTATION_TITLE.into(), part_name.clone());
        d.annotations.insert(bundle::ANNOTATION_FILEPATH.into(), part_name);
        layers.push(d);
    }
    Ok(layers)
}

/// The runtime defaults as the variant's `runtime.json` layer.
fn runtime_layer(layout: &Layout, runtime: &RuntimeDefaults) -> Result<Descriptor> {
    let bytes = serde_json::to_vec(runtime)?;
    let mut d = Descriptor::new(MEDIA_TYPE_RUNTIME, layout.write_blob(&bytes)?, bytes.len() as u64);
    d.annotations.insert(ANNOTATION_TITLE.into(), "runtime.json".into());
    Ok(d)
}

/// `(stem, part, total)` of a split GGUF name: `model-00002-of-00003.gguf` → `("model", 2, 3)`.
pub fn split_part(name: &str) -> Option<(&str, u32, u32)> {
    let rest = name.strip_suffix(".gguf")?;
    let (rest, total) = rest.rsplit_once("-of-")?;
    let (stem, part) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(part) || !digits(total) || stem.is_empty() {
        return None;
    }
    let (part, total) = (part.parse().ok()?, total.parse().ok()?);
    (part >= 1 && part <= total).then_some((stem, part, total))
}

/// Groups the files of split models (every part present once, in part order); other files stand alone.
/// Groups keep the order in which their first file was named.
pub fn group_split_files(files: &[PathBuf]) -> Result<Vec<Vec<PathBuf>>> {
    /// (directory/stem, part count) of a split set, None for a single file; then (part number, path).
    type Group = (Option<(String, u32)>, Vec<(u32, PathBuf)>);
    let mut groups: Vec<Group> = Vec::new();
    for file in files {
        let name = file_name(file)?;
        match split_part(&name) {
            Some((stem, part, total)) => {
                let key = Some((format!("{}/{stem}", file.parent().unwrap_or(Path::new("")).display()), total));
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, parts)) => parts.push((part, file.clone())),
                    None => groups.push((key, vec![(part, file.clone())])),
                }
            }
            None => groups.push((None, vec![(1, file.clone())])),
        }
    }
    let mut out = Vec::new();
    for (key, mut parts) in groups {
        if let Some((stem, total)) = key {
            parts.sort_by_key(|(n, _)| *n);
            let numbers: Vec<u32> = parts.iter().map(|(n, _)| *n).collect();
            if numbers != (1..=total).collect::<Vec<_>>() {
                refuse!(
                    "split model {stem}: parts {numbers:?} given but it has {total}; name every part \
                     (-00001-of-{total:05}.gguf to -{total:05}-of-{total:05}.gguf) exactly once"
                );
            }
        }
        out.push(parts.into_iter().map(|(_, p)| p).collect());
    }
    Ok(out)
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    let size = std::fs::metadata(path).doing(|| format!("reading {what} {}", path.display()))?.len();
    if size > MAX_DOC_BYTES {
        refuse!("{what} {} is {size} bytes; a doc file may be at most {MAX_DOC_BYTES}", path.display());
    }
    std::fs::read_to_string(path).doing(|| format!("reading {what} {} (it must be UTF-8 text)", path.display()))
}

fn read_docs(extras: &PackExtras) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut docs = Vec::new();
    if let Some(path) = &extras.license_file {
        docs.push((LICENSE_NAME, read_text(path, "license file")?.into_bytes()));
    }
    if let Some(path) = &extras.readme {
        docs.push((README_NAME, read_text(path, "README")?.into_bytes()));
    }
    Ok(docs)
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::Refused(format!("{} has no usable file name", path.display())))
}

/// RFC 3339 UTC timestamp, as OCI's `created` annotation wants.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(files: Vec<PathBuf>, out: PathBuf) -> PackOptions {
        PackOptions { files, out, name: None, version: None, license: None, context: 512, tag: "v1".into() }
    }

    #[test]
    fn split_names_are_recognised_and_every_part_is_required() {
        assert_eq!(split_part("qwen-00002-of-00003.gguf"), Some(("qwen", 2, 3)));
        assert_eq!(split_part("qwen-Q4_K_M.gguf"), None);
        assert_eq!(split_part("qwen-00004-of-00003.gguf"), None);
        assert_eq!(split_part("qwen-2-of-3.gguf"), None);
        let p = |n: &str| PathBuf::from(format!("/m/{n}"));
        let groups =
            group_split_files(&[p("a-00002-of-00002.gguf"), p("b.gguf"), p("a-00001-of-00002.gguf")]).expect("ok");
        assert_eq!(groups, vec![vec![p("a-00001-of-00002.gguf"), p("a-00002-of-00002.gguf")], vec![p("b.gguf")]]);
        let err = group_split_files(&[p("a-00001-of-00003.gguf"), p("a-00003-of-00003.gguf")]).expect_err("gap");
        assert!(err.to_string().contains("exactly once"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_gguf_is_named_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("notes.gguf");
        std::fs::write(&bad, b"this is not a model").expect("write");
        let out = dir.path().join("bundle");
        let err = pack(&options(vec![bad], out.clone()), &Progress::none()).expect_err("refused");
        let text = format!("{err:#}");
        assert!(text.contains("notes.gguf") && text.contains("not a GGUF file"), "{text}");
        assert!(!out.exists(), "nothing may be written for a refused pack");
    }

    #[test]
    fn a_truncated_gguf_with_absurd_counts_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("liar.gguf");
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend((1u64 << 62).to_le_bytes());
        bytes.extend((1u64 << 62).to_le_bytes());
        std::fs::write(&bad, bytes).expect("write");
        let err = pack(&options(vec![bad], dir.path().join("b")), &Progress::none());
        assert!(format!("{:#}", err.expect_err("refused")).contains("liar.gguf"));
    }
}
