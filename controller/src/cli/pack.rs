//! `alkictl bundle pack`: GGUF files become a bundle in an OCI layout, one ModelPack variant per quantization
//! (a split GGUF, `-00001-of-0000N.gguf`, is one variant with its parts as layers in order), each with a
//! runtime layer and doc layers: license text, README, and an SPDX JSON SBOM of every file with its sha256.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alki_shared::bundle::{
    self, ARTIFACT_TYPE_MODEL, MEDIA_TYPE_DOC_RAW, MEDIA_TYPE_MODEL_CONFIG, MEDIA_TYPE_RUNTIME, MEDIA_TYPE_WEIGHT_RAW,
    ModelConfig, ModelDescriptor, ModelFormat, ModelFs, RuntimeDefaults,
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
pub const SBOM_NAME: &str = "sbom.spdx.json";
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

pub fn pack(opts: &PackOptions, progress: &indicatif::ProgressBar) -> anyhow::Result<Packed> {
    pack_with(opts, &PackExtras::default(), progress)
}

/// [`pack`] with doc layers and runtime defaults beyond the context.
pub fn pack_with(opts: &PackOptions, extras: &PackExtras, progress: &indicatif::ProgressBar) -> anyhow::Result<Packed> {
    if opts.files.is_empty() {
        bail!("name at least one GGUF file to pack");
    }
    let groups = group_split_files(&opts.files)?;
    // Read every file's metadata first (headers only, never tensor data): a bad file fails the pack before
    // anything is written.
    let mut infos = Vec::new();
    for group in &groups {
        // The reader's errors name the file and say what is wrong with it.
        let mut info = gguf::read_file(&group[0])?.info();
        for part in &group[1..] {
            info.parameter_count = info.parameter_count.saturating_add(gguf::read_file(part)?.info().parameter_count);
        }
        infos.push(info);
    }
    let mut seen = BTreeMap::new();
    for (group, info) in groups.iter().zip(&infos) {
        let quantization = info.quantization.clone().unwrap_or_else(|| "unknown".into());
        if let Some(other) = seen.insert(quantization.clone(), &group[0]) {
            bail!(
                "{} and {} are both {quantization}; a bundle holds one file (or split set) per quantization",
                other.display(),
                group[0].display()
            );
        }
    }
    if let Some(build) = &extras.runtime_build {
        // Refused before anything is written: a tag could move under the fleet; a digest cannot.
        bundle::parse_runtime_build(build).map_err(|e| anyhow::anyhow!("--runtime-build: {e}"))?;
    }
    let docs = read_docs(extras)?;
    let chat_template = match &extras.chat_template {
        Some(path) => Some(read_text(path, "chat template")?),
        None => None,
    };
    progress.set_length(opts.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum());

    let layout = Layout::create(&opts.out)?;
    let created = humantime_now();
    let mut doc_layers = Vec::new();
    for (name, bytes) in &docs {
        let mut d = Descriptor::new(MEDIA_TYPE_DOC_RAW, layout.write_blob(bytes)?, bytes.len() as u64);
        d.annotations.insert(ANNOTATION_TITLE.into(), (*name).to_owned());
        d.annotations.insert(bundle::ANNOTATION_FILEPATH.into(), (*name).to_owned());
        doc_layers.push(d);
    }
    let mut entries = Vec::new();
    let mut variants = Vec::new();
    let mut done_before = 0;
    for (group, info) in groups.iter().zip(&infos) {
        let first_name = file_name(&group[0])?;
        let mut weight_descs = Vec::new();
        for part in group {
            let part_name = file_name(part)?;
            progress.set_message(part_name.clone());
            let (digest, size) = if extras.link_weights {
                layout.link_blob(part, |n| progress.set_position(done_before + n))?
            } else {
                layout.copy_blob(part, |n| progress.set_position(done_before + n))?
            };
            done_before += size;
            let mut d = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, digest, size);
            d.annotations.insert(ANNOTATION_TITLE.into(), part_name.clone());
            d.annotations.insert(bundle::ANNOTATION_FILEPATH.into(), part_name);
            weight_descs.push(d);
        }
        let size: u64 = weight_descs.iter().map(|d| d.size).sum();
        let architecture = info.architecture.clone().unwrap_or_default();
        let quantization = info.quantization.clone().unwrap_or_else(|| "unknown".into());
        let name = opts.name.clone().or_else(|| info.name.clone()).unwrap_or_else(|| first_name.clone());
        let trained = info.context_length.unwrap_or(u64::from(opts.context));
        let context = u64::from(opts.context).min(trained.max(1));
        let memory = size.saturating_add(info.kv_cache_bytes(context));

        let runtime = RuntimeDefaults {
            context_size: context as u32,
            threads: extras.threads,
            gpu_layers: extras.gpu_layers,
            chat_template: chat_template.clone(),
            runtime_build: extras.runtime_build.clone(),
            ..RuntimeDefaults::default()
        };
        let runtime_bytes = serde_json::to_vec(&runtime)?;
        let mut runtime_desc =
            Descriptor::new(MEDIA_TYPE_RUNTIME, layout.write_blob(&runtime_bytes)?, runtime_bytes.len() as u64);
        runtime_desc.annotations.insert(ANNOTATION_TITLE.into(), "runtime.json".into());

        // The SBOM lists every file of the variant with its sha256.
        let mut files: Vec<(&str, &Digest)> = weight_descs
            .iter()
            .chain(&doc_layers)
            .chain(std::iter::once(&runtime_desc))
            .map(|d| (d.annotation(ANNOTATION_TITLE).unwrap_or_default(), &d.digest))
            .collect();
        files.sort();
        let sbom = spdx_sbom(&name, opts.version.as_deref(), opts.license.as_deref(), &quantization, &files, &created);
        let sbom_bytes = serde_json::to_vec_pretty(&sbom)?;
        let mut sbom_desc =
            Descriptor::new(MEDIA_TYPE_DOC_RAW, layout.write_blob(&sbom_bytes)?, sbom_bytes.len() as u64);
        sbom_desc.annotations.insert(ANNOTATION_TITLE.into(), SBOM_NAME.into());
        sbom_desc.annotations.insert(bundle::ANNOTATION_FILEPATH.into(), SBOM_NAME.into());

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
            modelfs: ModelFs {
                kind: "layers".into(),
                diff_ids: weight_descs.iter().map(|d| d.digest.clone()).collect(),
            },
        };
        let config_bytes = serde_json::to_vec(&config)?;
        let config_desc =
            Descriptor::new(MEDIA_TYPE_MODEL_CONFIG, layout.write_blob(&config_bytes)?, config_bytes.len() as u64);

        let mut layers = weight_descs;
        layers.push(runtime_desc);
        layers.extend(doc_layers.iter().cloned());
        layers.push(sbom_desc);
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.into()),
            artifact_type: Some(ARTIFACT_TYPE_MODEL.into()),
            config: config_desc,
            layers,
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
            file: group[0].clone(),
            parts: group.clone(),
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
pub fn group_split_files(files: &[PathBuf]) -> anyhow::Result<Vec<Vec<PathBuf>>> {
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
                bail!(
                    "split model {stem}: parts {numbers:?} given but it has {total}; name every part \
                     (-00001-of-{total:05}.gguf to -{total:05}-of-{total:05}.gguf) exactly once"
                );
            }
        }
        out.push(parts.into_iter().map(|(_, p)| p).collect());
    }
    Ok(out)
}

fn read_text(path: &Path, what: &str) -> anyhow::Result<String> {
    let size = std::fs::metadata(path).with_context(|| format!("reading {what} {}", path.display()))?.len();
    if size > MAX_DOC_BYTES {
        bail!("{what} {} is {size} bytes; a doc file may be at most {MAX_DOC_BYTES}", path.display());
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {what} {} (it must be UTF-8 text)", path.display()))
}

fn read_docs(extras: &PackExtras) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut docs = Vec::new();
    if let Some(path) = &extras.license_file {
        docs.push((LICENSE_NAME, read_text(path, "license file")?.into_bytes()));
    }
    if let Some(path) = &extras.readme {
        docs.push((README_NAME, read_text(path, "README")?.into_bytes()));
    }
    Ok(docs)
}

/// An SPDX 2.3 JSON document for one variant: the model as a package containing every file, each with
/// its SHA-256.
pub fn spdx_sbom(
    name: &str,
    version: Option<&str>,
    license: Option<&str>,
    quantization: &str,
    files: &[(&str, &Digest)],
    created: &str,
) -> serde_json::Value {
    let license = license.unwrap_or("NOASSERTION");
    let spdx_files: Vec<serde_json::Value> = files
        .iter()
        .enumerate()
        .map(|(i, (file, digest))| {
            serde_json::json!({
                "SPDXID": format!("SPDXRef-File-{}", i + 1),
                "fileName": format!("./{file}"),
                "checksums": [{"algorithm": "SHA256", "checksumValue": digest.hex()}],
                "licenseConcluded": "NOASSERTION",
                "copyrightText": "NOASSERTION",
            })
        })
        .collect();
    let mut relationships = vec![serde_json::json!({
        "spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-Model"
    })];
    relationships.extend((1..=files.len()).map(|i| {
        serde_json::json!({
            "spdxElementId": "SPDXRef-Model", "relationshipType": "CONTAINS",
            "relatedSpdxElement": format!("SPDXRef-File-{i}")
        })
    }));
    let namespace_seed: String = files.iter().map(|(_, d)| d.hex()).collect();
    serde_json::json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{name} {quantization}"),
        "documentNamespace": format!("https://spdx.alki.invalid/bundle/{}", Digest::of(namespace_seed.as_bytes()).hex()),
        "creationInfo": {"created": created, "creators": [concat!("Tool: alkictl-", env!("CARGO_PKG_VERSION"))]},
        "packages": [{
            "SPDXID": "SPDXRef-Model",
            "name": name,
            "versionInfo": version.unwrap_or("NOASSERTION"),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": license,
            "licenseDeclared": license,
            "copyrightText": "NOASSERTION",
        }],
        "files": spdx_files,
        "relationships": relationships,
    })
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

    fn tiny(path: &Path, seed: u64) {
        use alki_e2e::tiny_model::{TinyModelOptions, synthetic_tokenizer, write_tiny_model};
        write_tiny_model(path, &TinyModelOptions { name: "tiny".into(), seed }, &synthetic_tokenizer(16))
            .expect("model");
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
    fn a_split_model_is_one_variant_with_ordered_layers_docs_and_an_sbom_of_every_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (one, two) = (dir.path().join("m-00001-of-00002.gguf"), dir.path().join("m-00002-of-00002.gguf"));
        tiny(&one, 1);
        tiny(&two, 2);
        let license = dir.path().join("LICENSE.txt");
        std::fs::write(&license, "Apache License 2.0 text").expect("write");
        let readme = dir.path().join("README.md");
        std::fs::write(&readme, "# tiny").expect("write");
        let out = dir.path().join("bundle");
        let extras = PackExtras {
            license_file: Some(license),
            readme: Some(readme),
            threads: 4,
            gpu_layers: 0,
            chat_template: None,
            runtime_build: None,
            link_weights: false,
        };
        // Named out of order: the layers still come in part order.
        let packed = pack_with(
            &options(vec![two.clone(), one.clone()], out.clone()),
            &extras,
            &indicatif::ProgressBar::hidden(),
        )
        .expect("pack");
        assert_eq!(packed.variants.len(), 1);
        let v = &packed.variants[0];
        assert_eq!(v.parts, vec![one.clone(), two.clone()]);
        let sizes = std::fs::metadata(&one).expect("meta").len() + std::fs::metadata(&two).expect("meta").len();
        assert_eq!(v.size, sizes);
        let single = gguf::read_file(&one).expect("gguf").info().parameter_count;
        assert_eq!(v.parameters, 2 * single, "parameters of every part");

        let layout = Layout::open(&out).expect("layout");
        let manifest: ImageManifest =
            serde_json::from_slice(&layout.read_blob(&v.digest).expect("manifest")).expect("json");
        let titles: Vec<&str> = manifest.layers.iter().filter_map(|l| l.annotation(ANNOTATION_TITLE)).collect();
        assert_eq!(
            titles,
            ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "runtime.json", LICENSE_NAME, README_NAME, SBOM_NAME]
        );
        let runtime = bundle::runtime_layer(&manifest).expect("runtime layer");
        let runtime: RuntimeDefaults =
            serde_json::from_slice(&layout.read_blob(&runtime.digest).expect("blob")).expect("json");
        assert_eq!(runtime.threads, 4);
        let sbom_desc =
            manifest.layers.iter().find(|l| l.annotation(ANNOTATION_TITLE) == Some(SBOM_NAME)).expect("sbom");
        let sbom: serde_json::Value =
            serde_json::from_slice(&layout.read_blob(&sbom_desc.digest).expect("blob")).expect("json");
        assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
        let files = sbom["files"].as_array().expect("files");
        assert_eq!(files.len(), 5, "two GGUF parts, runtime, license, readme: {sbom}");
        for layer in manifest.layers.iter().filter(|l| l.annotation(ANNOTATION_TITLE) != Some(SBOM_NAME)) {
            let name = format!("./{}", layer.annotation(ANNOTATION_TITLE).expect("title"));
            let listed = files.iter().find(|f| f["fileName"] == name.as_str()).expect("listed");
            assert_eq!(listed["checksums"][0]["checksumValue"], layer.digest.hex());
        }
        let gguf_hex = Digest::of(&std::fs::read(&one).expect("read")).hex().to_owned();
        assert!(sbom.to_string().contains(&gguf_hex));
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
