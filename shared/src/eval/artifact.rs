//! An eval suite as an OCI artifact, pushed, pulled and signed like a bundle: its artifact and media types,
//! its `ai.alki.eval.*` annotations, and the pure building and checking of its manifest.
//!
//! The manifest is an OCI image manifest with `artifactType` [`ARTIFACT_TYPE_EVAL_SUITE`], the empty config
//! (OCI 1.1's artifact guidance), and three layers: `suite.toml`, the corpus and the prompts, each titled
//! with its file name. Cosign signs the manifest's digest, as for bundles. A device checks the manifest
//! with [`read_manifest`] before it downloads anything, so an oversized suite is refused by its sizes.

use std::collections::BTreeMap;

use super::suite::{MAX_CORPUS_BYTES, MAX_PROMPTS_BYTES, MAX_SUITE_TOML_BYTES, SUITE_FILE, Suite, SuiteFiles};
use crate::digest::Digest;
use crate::oci::{ANNOTATION_TITLE, Descriptor, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_MANIFEST};

pub const ARTIFACT_TYPE_EVAL_SUITE: &str = "application/vnd.alki.eval.suite.v1";
/// `suite.toml`.
pub const MEDIA_TYPE_SUITE_TOML: &str = "application/vnd.alki.eval.suite.v1+toml";
/// The perplexity corpus (UTF-8 text).
pub const MEDIA_TYPE_CORPUS: &str = "application/vnd.alki.eval.corpus.v1.text";
/// The golden prompts (JSON lines).
pub const MEDIA_TYPE_PROMPTS: &str = "application/vnd.alki.eval.prompts.v1+jsonl";

pub const ANNOTATION_NAME: &str = "ai.alki.eval.name";
pub const ANNOTATION_VERSION: &str = "ai.alki.eval.version";
pub const ANNOTATION_CONTEXT_SIZE: &str = "ai.alki.eval.context-size";
pub const ANNOTATION_CHUNKS: &str = "ai.alki.eval.chunks";
/// How many golden prompts the suite holds.
pub const ANNOTATION_PROMPTS: &str = "ai.alki.eval.prompts";
pub const ANNOTATION_TIME_BUDGET: &str = "ai.alki.eval.time-budget-seconds";

/// The OCI empty config blob (`{}`) every suite manifest points at.
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// Why a manifest is not a usable eval suite.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactError {
    #[error(
        "not an eval suite: artifactType is {0:?}, not {ARTIFACT_TYPE_EVAL_SUITE}; push suites with alkictl eval push"
    )]
    NotASuite(Option<String>),
    #[error("eval suite manifest {0}; push the suite again with alkictl eval push")]
    Malformed(String),
    #[error("eval suite layer {file} is {size} bytes, over the limit of {max}; an eval suite is kilobytes to a few MB")]
    TooLarge { file: String, size: u64, max: u64 },
}

/// The descriptors of a suite's three files, found by media type.
#[derive(Clone, Debug, PartialEq)]
pub struct SuiteLayers {
    pub manifest: Descriptor,
    pub corpus: Descriptor,
    pub prompts: Descriptor,
}

impl SuiteLayers {
    /// Bytes to download for the whole suite.
    pub fn total_size(&self) -> u64 {
        self.manifest.size + self.corpus.size + self.prompts.size
    }
}

/// The manifest to push for a validated suite and its files (the bytes `suite` was parsed from).
pub fn build_manifest(suite: &Suite, files: SuiteFiles<'_>) -> ImageManifest {
    let layer = |media_type: &str, bytes: &[u8], title: &str| {
        let mut d = Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64);
        d.annotations.insert(ANNOTATION_TITLE.to_owned(), title.to_owned());
        d
    };
    let m = &suite.manifest;
    ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        artifact_type: Some(ARTIFACT_TYPE_EVAL_SUITE.to_owned()),
        config: Descriptor::new(MEDIA_TYPE_EMPTY, Digest::of(EMPTY_CONFIG), EMPTY_CONFIG.len() as u64),
        layers: vec![
            layer(MEDIA_TYPE_SUITE_TOML, files.manifest, SUITE_FILE),
            layer(MEDIA_TYPE_CORPUS, files.corpus, &m.corpus),
            layer(MEDIA_TYPE_PROMPTS, files.prompts, &m.prompts),
        ],
        subject: None,
        annotations: suite_annotations(suite),
    }
}

/// The `ai.alki.eval.*` annotations: what `alkictl eval list` shows without downloading the suite.
pub fn suite_annotations(suite: &Suite) -> BTreeMap<String, String> {
    let m = &suite.manifest;
    [
        (ANNOTATION_NAME, m.name.clone()),
        (ANNOTATION_VERSION, m.version.clone()),
        (ANNOTATION_CONTEXT_SIZE, m.context_size.to_string()),
        (ANNOTATION_CHUNKS, m.chunks.to_string()),
        (ANNOTATION_PROMPTS, suite.prompts.len().to_string()),
        (ANNOTATION_TIME_BUDGET, m.time_budget_seconds.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Checks a pulled manifest is an eval suite within the size caps and finds its three layers. Called
/// before any layer is downloaded; the files are validated again by [`Suite::parse`] once they are.
pub fn read_manifest(manifest: &ImageManifest) -> Result<SuiteLayers, ArtifactError> {
    if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE_EVAL_SUITE) {
        return Err(ArtifactError::NotASuite(manifest.artifact_type.clone()));
    }
    if manifest.config.media_type != MEDIA_TYPE_EMPTY {
        return Err(ArtifactError::Malformed(format!(
            "has a config of type {:?}; a suite's config is the empty descriptor ({MEDIA_TYPE_EMPTY})",
            manifest.config.media_type
        )));
    }
    if manifest.layers.len() != 3 {
        return Err(ArtifactError::Malformed(format!("has {} layers; a suite has exactly 3", manifest.layers.len())));
    }
    let layers = SuiteLayers {
        manifest: one_layer(manifest, MEDIA_TYPE_SUITE_TOML, MAX_SUITE_TOML_BYTES)?,
        corpus: one_layer(manifest, MEDIA_TYPE_CORPUS, MAX_CORPUS_BYTES)?,
        prompts: one_layer(manifest, MEDIA_TYPE_PROMPTS, MAX_PROMPTS_BYTES)?,
    };
    if layers.manifest.annotation(ANNOTATION_TITLE) != Some(SUITE_FILE) {
        return Err(ArtifactError::Malformed(format!(
            "names its {MEDIA_TYPE_SUITE_TOML} layer other than {SUITE_FILE}"
        )));
    }
    Ok(layers)
}

/// The one layer of `media_type`, with a plain file name as its title and a size under `max`.
fn one_layer(manifest: &ImageManifest, media_type: &str, max: usize) -> Result<Descriptor, ArtifactError> {
    let mut found = manifest.layers.iter().filter(|l| l.media_type == media_type);
    let (Some(layer), None) = (found.next(), found.next()) else {
        return Err(ArtifactError::Malformed(format!("does not have exactly one {media_type} layer")));
    };
    let Some(title) = crate::bundle::safe_file_name(layer) else {
        return Err(ArtifactError::Malformed(format!(
            "has a {media_type} layer without a plain file name as its title"
        )));
    };
    if layer.size > max as u64 {
        return Err(ArtifactError::TooLarge { file: title.to_owned(), size: layer.size, max: max as u64 });
    }
    Ok(layer.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Manifest;

    const MANIFEST: &[u8] = br#"name = "smoke"
version = "2"
corpus = "wiki.txt"
prompts = "golden.jsonl"
context_size = 64
chunks = 8
time_budget_seconds = 120
"#;
    const PROMPTS: &[u8] = br#"{"id":"p1","prompt":"a","max_tokens":8,"checks":[{"contains":"b"}]}"#;

    fn files(corpus: &[u8]) -> SuiteFiles<'_> {
        SuiteFiles { manifest: MANIFEST, corpus, prompts: PROMPTS }
    }

    fn built() -> ImageManifest {
        let corpus = "word ".repeat(100);
        let suite = Suite::parse(files(corpus.as_bytes())).expect("suite");
        build_manifest(&suite, files(corpus.as_bytes()))
    }

    #[test]
    fn a_built_manifest_reads_back_and_survives_json() {
        let manifest = built();
        assert_eq!(manifest.annotations[ANNOTATION_NAME], "smoke");
        assert_eq!(manifest.annotations[ANNOTATION_PROMPTS], "1");
        assert_eq!(manifest.annotations[ANNOTATION_CONTEXT_SIZE], "64");
        assert_eq!(manifest.config.digest, Digest::of(b"{}"));
        let json = serde_json::to_vec(&manifest).expect("json");
        let Manifest::Image(parsed) = Manifest::parse(&json, None).expect("an OCI manifest") else {
            panic!("a suite is an image manifest");
        };
        let layers = read_manifest(&parsed).expect("a suite");
        assert_eq!(layers.manifest.digest, Digest::of(MANIFEST));
        assert_eq!(layers.corpus.annotation(ANNOTATION_TITLE), Some("wiki.txt"));
        assert_eq!(layers.prompts.annotation(ANNOTATION_TITLE), Some("golden.jsonl"));
        assert_eq!(layers.total_size(), (MANIFEST.len() + 500 + PROMPTS.len()) as u64);
    }

    #[test]
    fn other_artifacts_and_malformed_suites_are_refused() {
        let mut bundle = built();
        bundle.artifact_type = Some(crate::bundle::ARTIFACT_TYPE_MODEL.to_owned());
        assert!(matches!(read_manifest(&bundle), Err(ArtifactError::NotASuite(Some(_)))));
        let mut no_type = built();
        no_type.artifact_type = None;
        assert_eq!(read_manifest(&no_type), Err(ArtifactError::NotASuite(None)));

        let mutations: [fn(&mut ImageManifest); 5] = [
            |m| m.config.media_type = "application/json".into(),
            |m| drop(m.layers.pop()),
            |m| m.layers[2].media_type = MEDIA_TYPE_CORPUS.into(),
            |m| drop(m.layers[1].annotations.remove(ANNOTATION_TITLE)),
            |m| drop(m.layers[0].annotations.insert(ANNOTATION_TITLE.into(), "other.toml".into())),
        ];
        for mutate in mutations {
            let mut m = built();
            mutate(&mut m);
            let err = read_manifest(&m).expect_err("malformed");
            assert!(matches!(err, ArtifactError::Malformed(_)), "{err}");
            assert!(err.to_string().ends_with("push the suite again with alkictl eval push"), "{err}");
        }
    }

    #[test]
    fn oversized_layers_are_refused_by_their_declared_size() {
        let mut m = built();
        m.layers[1].size = MAX_CORPUS_BYTES as u64 + 1;
        let err = read_manifest(&m).expect_err("too large");
        assert_eq!(
            err,
            ArtifactError::TooLarge {
                file: "wiki.txt".into(),
                size: MAX_CORPUS_BYTES as u64 + 1,
                max: MAX_CORPUS_BYTES as u64
            }
        );
        let mut m = built();
        m.layers[2].size = u64::MAX;
        assert!(matches!(read_manifest(&m), Err(ArtifactError::TooLarge { .. })));
    }
}
