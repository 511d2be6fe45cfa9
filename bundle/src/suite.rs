//! Eval suites as OCI artifacts (`alkictl eval push|inspect`): a suite directory read within the caps and
//! validated (`alki_shared::eval::suite`) before anything is written or sent, packed as a one-manifest OCI
//! layout (`alki_shared::eval::artifact`), pushed through the bundle push path (streamed, hashed), signed
//! like a bundle ([`crate::sign`]), and inspected: layers, sizes, the content checked against its digests and
//! the suite format, and its signatures against the keys given.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use alki_shared::digest::Digest;
use alki_shared::eval::artifact::{self, ANNOTATION_NAME, ANNOTATION_VERSION, EMPTY_CONFIG, SuiteLayers};
use alki_shared::eval::suite::{
    MAX_CORPUS_BYTES, MAX_PROMPTS_BYTES, MAX_SUITE_TOML_BYTES, SUITE_FILE, Suite, SuiteError, SuiteFiles, SuiteManifest,
};
use alki_shared::oci::{ANNOTATION_TITLE, Descriptor, ImageManifest, MEDIA_TYPE_IMAGE_MANIFEST, Manifest};
use alki_shared::signing::{self, PublicKey};
use serde::Serialize;

use crate::error::{Error, IoContext as _, ManifestContext as _, Result, refuse};
use crate::inspect::{LayerView, SignatureView};
use crate::layout::Layout;
use crate::progress::Progress;
use crate::push::Pushed;
use crate::reference::BundleRef;
use crate::registry::Remote;

/// A suite directory's three files as read, validated together.
#[derive(Debug)]
pub struct SuiteSource {
    pub dir: PathBuf,
    pub suite: Suite,
    /// `suite.toml`, the corpus and the prompts, byte for byte.
    pub manifest: Vec<u8>,
    pub corpus: Vec<u8>,
    pub prompts: Vec<u8>,
}

impl SuiteSource {
    /// Reads `dir/suite.toml` and the two files it names, each refused by its size before it is read, and
    /// validates the whole suite: a bad suite is refused with the file, the field and the fix.
    pub fn read(dir: &Path) -> Result<SuiteSource> {
        let refused = |e: SuiteError| Error::Refused(format!("eval suite {}: {e}", dir.display()));
        let manifest = read_capped(dir, SUITE_FILE, MAX_SUITE_TOML_BYTES)?;
        let parsed = SuiteManifest::parse(&manifest).map_err(refused)?;
        let corpus = read_capped(dir, &parsed.corpus, MAX_CORPUS_BYTES)?;
        let prompts = read_capped(dir, &parsed.prompts, MAX_PROMPTS_BYTES)?;
        let files = SuiteFiles { manifest: &manifest, corpus: &corpus, prompts: &prompts };
        let suite = Suite::parse(files).map_err(refused)?;
        Ok(SuiteSource { dir: dir.to_owned(), suite, manifest, corpus, prompts })
    }

    pub fn files(&self) -> SuiteFiles<'_> {
        SuiteFiles { manifest: &self.manifest, corpus: &self.corpus, prompts: &self.prompts }
    }

    /// The OCI manifest this suite is pushed as.
    pub fn oci_manifest(&self) -> ImageManifest {
        artifact::build_manifest(&self.suite, self.files())
    }
}

/// Reads `dir/name`, refusing a file over `max` bytes by its size before reading it (and a file that grows
/// past it while being read).
fn read_capped(dir: &Path, name: &str, max: usize) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let reading = || format!("reading eval suite file {}", path.display());
    let file = std::fs::File::open(&path).doing(reading)?;
    let len = file.metadata().doing(reading)?.len();
    let too_large = |len: u64| {
        let e = SuiteError::TooLarge { file: name.to_owned(), len: usize::try_from(len).unwrap_or(usize::MAX), max };
        Error::Refused(format!("eval suite {}: {e}", dir.display()))
    };
    if len > max as u64 {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max as u64 + 1).read_to_end(&mut bytes).doing(reading)?;
    if bytes.len() > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A suite written as an OCI layout.
#[derive(Debug, Serialize)]
pub struct PackedSuite {
    pub layout: PathBuf,
    pub tag: String,
    /// The manifest's digest: what `REPOSITORY@<digest>` pins.
    pub digest: Digest,
    pub summary: SuiteSummary,
}

/// What a suite holds, for tables and `-o json`.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteSummary {
    pub name: String,
    pub version: String,
    pub context_size: u32,
    pub chunks: u32,
    pub time_budget_seconds: u32,
    pub seed: u32,
    pub prompts: usize,
    /// The three files together, in bytes.
    pub size: u64,
}

impl SuiteSummary {
    fn of(suite: &Suite, size: u64) -> SuiteSummary {
        let m = &suite.manifest;
        SuiteSummary {
            name: m.name.clone(),
            version: m.version.clone(),
            context_size: m.context_size,
            chunks: m.chunks,
            time_budget_seconds: m.time_budget_seconds,
            seed: m.seed,
            prompts: suite.prompts.len(),
            size,
        }
    }
}

/// Writes `source` as an OCI layout at `out` (a new or empty directory): the empty config, the three files
/// as layers, the suite manifest, and `index.json` naming it under `tag`.
pub fn pack(source: &SuiteSource, out: &Path, tag: &str) -> Result<PackedSuite> {
    let layout = Layout::create(out)?;
    layout.write_blob(EMPTY_CONFIG)?;
    for bytes in [&source.manifest, &source.corpus, &source.prompts] {
        layout.write_blob(bytes)?;
    }
    let manifest = source.oci_manifest();
    let bytes = serde_json::to_vec(&manifest)?;
    let digest = layout.write_blob(&bytes)?;
    let mut entry = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, digest.clone(), bytes.len() as u64);
    entry.artifact_type = manifest.artifact_type.clone();
    layout.write_index(entry, tag)?;
    let size = manifest.layers.iter().map(|l| l.size).sum();
    Ok(PackedSuite {
        layout: out.to_owned(),
        tag: tag.to_owned(),
        digest,
        summary: SuiteSummary::of(&source.suite, size),
    })
}

/// What `alkictl eval push` did.
#[derive(Debug, Serialize)]
pub struct PushedSuite {
    /// `registry/repository:tag`, as pushed.
    pub reference: String,
    /// `registry/repository@sha256:...`: what rollouts and evaluations pin.
    pub pinned: String,
    pub digest: Digest,
    pub uploaded_bytes: u64,
    pub skipped_blobs: usize,
    pub summary: SuiteSummary,
}

/// Validates the suite in `dir`, packs it into a temporary layout and pushes it to `remote` under `tag`.
/// Nothing is sent when the suite is refused.
pub async fn push(dir: &Path, remote: &Remote, tag: &str, progress: &Progress) -> Result<PushedSuite> {
    let source = SuiteSource::read(dir)?;
    let scratch = tempfile::tempdir().doing(|| "creating a temporary directory for the suite layout".to_owned())?;
    let packed = pack(&source, &scratch.path().join("layout"), tag)?;
    let Pushed { reference, digest, uploaded_bytes, skipped_blobs } =
        crate::push::push(&packed.layout, remote, tag, progress).await?;
    let pinned = BundleRef::pinned(Some(&remote.registry), &remote.repository, &digest).to_string();
    Ok(PushedSuite { reference, pinned, digest, uploaded_bytes, skipped_blobs, summary: packed.summary })
}

/// A suite as `alkictl eval inspect` shows it.
#[derive(Debug, Serialize)]
pub struct InspectedSuite {
    /// The directory or `registry/repository` read.
    pub source: String,
    /// The manifest's digest (for a directory: the digest it is pushed as).
    pub digest: Digest,
    pub summary: SuiteSummary,
    pub layers: Vec<LayerView>,
    /// Why the content cannot be used (a layer that does not match its digest, a file the format refuses);
    /// None when every layer was read, verified and validated.
    pub content_problem: Option<String>,
    /// True when read from a registry (a directory holds no signatures).
    pub from_registry: bool,
    /// Signatures of the manifest (registry only).
    pub signatures: Vec<SignatureView>,
    /// Fingerprints of the keys signatures were checked against.
    pub keys: Vec<String>,
    /// True when a signature of the manifest verifies against one of `keys`.
    pub verified: bool,
}

/// Inspects a suite directory: validated as `eval push` would, with the digest it would be pushed as.
pub fn inspect_dir(dir: &Path) -> Result<InspectedSuite> {
    let source = SuiteSource::read(dir)?;
    let manifest = source.oci_manifest();
    let digest = Digest::of(&serde_json::to_vec(&manifest)?);
    let size = manifest.layers.iter().map(|l| l.size).sum();
    Ok(InspectedSuite {
        source: dir.display().to_string(),
        digest,
        summary: SuiteSummary::of(&source.suite, size),
        layers: manifest.layers.iter().map(layer_view).collect(),
        content_problem: None,
        from_registry: false,
        signatures: Vec::new(),
        keys: Vec::new(),
        verified: false,
    })
}

/// Inspects the suite `tag_or_digest` in `remote`: refused when it is not a suite or is over the caps (by
/// its manifest, before any download); otherwise its layers are downloaded (a few MB at most), checked
/// against their digests and validated, and its signatures checked against `keys`.
pub async fn inspect_remote(remote: &Remote, tag_or_digest: &str, keys: &[PublicKey]) -> Result<InspectedSuite> {
    let client = remote.client();
    let named = remote.named(tag_or_digest);
    let Some((bytes, digest)) = remote.manifest(&client, tag_or_digest).await? else {
        refuse!("{named} is not in the registry; push it with `alkictl eval push`");
    };
    let Manifest::Image(manifest) = Manifest::parse(&bytes, None).parsing(|| format!("manifest of {named}"))? else {
        refuse!("{named} is an index (a bundle?), not an eval suite; push suites with `alkictl eval push`");
    };
    let layers = artifact::read_manifest(&manifest).map_err(|e| Error::Refused(format!("{named}: {e}")))?;
    let (summary, content_problem) = match download(remote, &client, &layers).await {
        Ok((suite, size)) => (SuiteSummary::of(&suite, size), None),
        Err(problem) => (summary_from_annotations(&manifest, layers.total_size()), Some(problem)),
    };
    let signature_layers = remote.signatures(&client, &digest).await?;
    let signatures: Vec<SignatureView> = signing::check_each(&digest, &signature_layers, keys)
        .into_iter()
        .map(|check| SignatureView { of: "suite".into(), digest: digest.clone(), check })
        .collect();
    Ok(InspectedSuite {
        source: remote.docker_reference(),
        verified: signatures.iter().any(|s| s.check.verified),
        digest,
        summary,
        layers: manifest.layers.iter().map(layer_view).collect(),
        content_problem,
        from_registry: true,
        signatures,
        keys: keys.iter().map(|k| k.fingerprint().to_owned()).collect(),
    })
}

/// Downloads the three layers (each bounded by its declared size and checked against its digest) and
/// validates them as a suite; the problem as text when any step fails.
async fn download(
    remote: &Remote,
    client: &oci_client::Client,
    layers: &SuiteLayers,
) -> std::result::Result<(Suite, u64), String> {
    let fetch = async |d: &Descriptor| remote.small_blob(client, &d.digest, d.size).await.map_err(|e| e.to_string());
    let manifest = fetch(&layers.manifest).await?;
    let corpus = fetch(&layers.corpus).await?;
    let prompts = fetch(&layers.prompts).await?;
    let suite = Suite::parse(SuiteFiles { manifest: &manifest, corpus: &corpus, prompts: &prompts })
        .map_err(|e| e.to_string())?;
    Ok((suite, layers.total_size()))
}

/// What the manifest's `ai.alki.eval.*` annotations say, when the content itself cannot be read.
fn summary_from_annotations(manifest: &ImageManifest, size: u64) -> SuiteSummary {
    let text = |key: &str| manifest.annotations.get(key).cloned().unwrap_or_default();
    let number = |key: &str| manifest.annotations.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    SuiteSummary {
        name: text(ANNOTATION_NAME),
        version: text(ANNOTATION_VERSION),
        context_size: number(artifact::ANNOTATION_CONTEXT_SIZE),
        chunks: number(artifact::ANNOTATION_CHUNKS),
        time_budget_seconds: number(artifact::ANNOTATION_TIME_BUDGET),
        seed: 0,
        prompts: number(artifact::ANNOTATION_PROMPTS) as usize,
        size,
    }
}

fn layer_view(l: &Descriptor) -> LayerView {
    LayerView {
        media_type: l.media_type.clone(),
        digest: l.digest.clone(),
        size: l.size,
        title: l.annotation(ANNOTATION_TITLE).unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "name = \"smoke\"\nversion = \"1\"\ncorpus = \"corpus.txt\"\nprompts = \"prompts.jsonl\"\n\
                            context_size = 64\nchunks = 8\ntime_budget_seconds = 60\n";
    const PROMPTS: &str = "{\"id\":\"p1\",\"prompt\":\"1, 2, 3,\",\"max_tokens\":4,\"checks\":[{\"exact\":\" 4\"}]}\n";

    fn suite_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SUITE_FILE), MANIFEST).expect("write");
        std::fs::write(dir.path().join("corpus.txt"), "The quick brown fox. ".repeat(40)).expect("write");
        std::fs::write(dir.path().join("prompts.jsonl"), PROMPTS).expect("write");
        dir
    }

    fn refusal(dir: &Path) -> String {
        SuiteSource::read(dir).expect_err("refused").to_string()
    }

    #[test]
    fn a_suite_packs_as_a_layout_whose_manifest_reads_back_as_a_suite() {
        let dir = suite_dir();
        let source = SuiteSource::read(dir.path()).expect("valid suite");
        let out = dir.path().join("layout");
        let packed = pack(&source, &out, "v1").expect("pack");
        let layout = Layout::open(&out).expect("layout");
        let entries = layout.entries().expect("index");
        assert_eq!(entries[0].digest, packed.digest);
        assert_eq!(entries[0].artifact_type.as_deref(), Some(artifact::ARTIFACT_TYPE_EVAL_SUITE));
        let Manifest::Image(manifest) =
            Manifest::parse(&layout.read_blob(&packed.digest).expect("blob"), None).expect("manifest")
        else {
            panic!("a suite is an image manifest");
        };
        let layers = artifact::read_manifest(&manifest).expect("a suite");
        for (layer, bytes) in [(&layers.manifest, &source.manifest), (&layers.corpus, &source.corpus)] {
            assert_eq!(&layout.read_blob(&layer.digest).expect("layer"), bytes);
        }
        layout.read_blob(&manifest.config.digest).expect("the empty config is in the layout");
        assert_eq!((packed.summary.name.as_str(), packed.summary.prompts), ("smoke", 1));
        assert_eq!(inspect_dir(dir.path()).expect("inspect").digest, packed.digest, "the digest push will give");
    }

    #[test]
    fn a_bad_suite_is_refused_with_the_file_the_field_and_the_fix() {
        let dir = suite_dir();
        std::fs::write(dir.path().join(SUITE_FILE), MANIFEST.replace("chunks = 8", "chunks = 0")).expect("write");
        let err = refusal(dir.path());
        assert!(err.contains("suite.toml field chunks: 0 is outside 1..=1024"), "{err}");

        let dir = suite_dir();
        std::fs::write(dir.path().join("prompts.jsonl"), "{\"id\":\"p1\"}\n").expect("write");
        assert!(refusal(dir.path()).contains("prompts file line 1"), "names the line");

        let dir = suite_dir();
        std::fs::remove_file(dir.path().join("corpus.txt")).expect("rm");
        assert!(refusal(dir.path()).contains("corpus.txt"), "names the missing file");
    }

    #[test]
    fn an_oversized_file_is_refused_by_its_size_before_it_is_read() {
        let dir = suite_dir();
        // Sparse: the refusal must come from the size, not from reading 4 MiB.
        let corpus = std::fs::File::create(dir.path().join("corpus.txt")).expect("create");
        corpus.set_len(MAX_CORPUS_BYTES as u64 + 1).expect("set_len");
        let err = refusal(dir.path());
        assert!(
            err.contains(&format!(
                "corpus.txt is {} bytes, over the limit of {MAX_CORPUS_BYTES}",
                MAX_CORPUS_BYTES + 1
            )),
            "{err}"
        );
    }
}
