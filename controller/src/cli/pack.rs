//! `alkictl bundle pack`: GGUF files become a bundle in an OCI layout, one ModelPack variant per file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alki_shared::bundle::{
    self, ARTIFACT_TYPE_MODEL, MEDIA_TYPE_MODEL_CONFIG, MEDIA_TYPE_RUNTIME, MEDIA_TYPE_WEIGHT_RAW, ModelConfig,
    ModelDescriptor, ModelFormat, ModelFs, RuntimeDefaults,
};
use alki_shared::digest::Digest;
use alki_shared::gguf;
use alki_shared::oci::{
    ANNOTATION_CREATED, ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
};
use anyhow::{Context as _, bail};
use serde::Serialize;

use super::layout::Layout;

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
    pub file: PathBuf,
    pub digest: Digest,
    pub quantization: String,
    pub architecture: String,
    pub parameters: u64,
    pub context_length: u64,
    pub size: u64,
    pub memory_bytes: u64,
}

pub fn pack(opts: &PackOptions, progress: &indicatif::ProgressBar) -> anyhow::Result<Packed> {
    if opts.files.is_empty() {
        bail!("name at least one GGUF file to pack");
    }
    // Read every file's metadata first: a bad file fails the pack before anything is written.
    let mut infos = Vec::new();
    for file in &opts.files {
        // The reader's errors name the file and say what is wrong with it.
        let info = gguf::read_file(file)?.info();
        infos.push(info);
    }
    let mut seen = BTreeMap::new();
    for (file, info) in opts.files.iter().zip(&infos) {
        let quantization = info.quantization.clone().unwrap_or_else(|| "unknown".into());
        if let Some(other) = seen.insert(quantization.clone(), file) {
            bail!(
                "{} and {} are both {quantization}; a bundle holds one file per quantization",
                other.display(),
                file.display()
            );
        }
    }
    progress.set_length(opts.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum());

    let layout = Layout::create(&opts.out)?;
    let created = humantime_now();
    let mut entries = Vec::new();
    let mut variants = Vec::new();
    let mut done_before = 0;
    for (file, info) in opts.files.iter().zip(&infos) {
        let file_name = file_name(file)?;
        progress.set_message(file_name.clone());
        let (weights, size) = layout.copy_blob(file, |n| progress.set_position(done_before + n))?;
        done_before += size;
        let architecture = info.architecture.clone().unwrap_or_default();
        let quantization = info.quantization.clone().unwrap_or_else(|| "unknown".into());
        let name = opts.name.clone().or_else(|| info.name.clone()).unwrap_or_else(|| file_name.clone());
        let trained = info.context_length.unwrap_or(u64::from(opts.context));
        let context = u64::from(opts.context).min(trained.max(1));
        let memory = size.saturating_add(info.kv_cache_bytes(context));

        let runtime = RuntimeDefaults { context_size: context as u32, ..RuntimeDefaults::default() };
        let runtime_bytes = serde_json::to_vec(&runtime)?;
        let runtime_desc =
            Descriptor::new(MEDIA_TYPE_RUNTIME, layout.write_blob(&runtime_bytes)?, runtime_bytes.len() as u64);

        let config = ModelConfig {
            descriptor: ModelDescriptor {
                name: name.clone(),
                version: opts.version.clone(),
                licenses: opts.license.iter().cloned().collect(),
                created_at: Some(created.clone()),
            },
            config: ModelFormat {
                format: "gguf".into(),
                architecture: Some(architecture.clone()),
                quantization: Some(quantization.clone()),
                param_size: Some(info.parameter_count.to_string()),
            },
            modelfs: ModelFs { kind: "layers".into(), diff_ids: vec![weights.clone()] },
        };
        let config_bytes = serde_json::to_vec(&config)?;
        let config_desc =
            Descriptor::new(MEDIA_TYPE_MODEL_CONFIG, layout.write_blob(&config_bytes)?, config_bytes.len() as u64);

        let mut weight_desc = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, weights.clone(), size);
        weight_desc.annotations.insert(ANNOTATION_TITLE.into(), file_name.clone());
        weight_desc.annotations.insert(bundle::ANNOTATION_FILEPATH.into(), file_name.clone());
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.into()),
            artifact_type: Some(ARTIFACT_TYPE_MODEL.into()),
            config: config_desc,
            layers: vec![weight_desc, runtime_desc],
            subject: None,
            annotations: BTreeMap::from([(ANNOTATION_CREATED.to_owned(), created.clone())]),
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
        entries.push(entry);
        variants.push(PackedVariant {
            file: file.clone(),
            digest: manifest_digest,
            quantization,
            architecture,
            parameters: info.parameter_count,
            context_length: trained,
            size,
            memory_bytes: memory,
        });
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
    progress.finish_and_clear();
    Ok(Packed { layout: opts.out.clone(), tag: opts.tag.clone(), digest: index_digest, variants })
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no usable file name", path.display()))
}

/// RFC 3339 UTC timestamp, as OCI's `created` annotation wants.
fn humantime_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(files: Vec<PathBuf>, out: PathBuf) -> PackOptions {
        PackOptions { files, out, name: None, version: None, license: None, context: 512, tag: "v1".into() }
    }

    #[test]
    fn a_file_that_is_not_gguf_is_named_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("notes.gguf");
        std::fs::write(&bad, b"this is not a model").expect("write");
        let out = dir.path().join("bundle");
        let err = pack(&options(vec![bad], out.clone()), &indicatif::ProgressBar::hidden()).expect_err("refused");
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
        let err = pack(&options(vec![bad], dir.path().join("b")), &indicatif::ProgressBar::hidden());
        assert!(format!("{:#}", err.expect_err("refused")).contains("liar.gguf"));
    }
}
