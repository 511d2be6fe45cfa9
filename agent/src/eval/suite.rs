//! Eval suites on the device: acquired by digest through the pull layer (the signature checked against the
//! trust policy for the suite's repository before anything else, the manifest refused by its declared sizes
//! before any layer is downloaded, the layers into the content store), then read back bounded and parsed.

use std::path::PathBuf;

use alki_shared::digest::Digest;
use alki_shared::eval::artifact::read_manifest;
use alki_shared::eval::suite::{MAX_CORPUS_BYTES, MAX_PROMPTS_BYTES, MAX_SUITE_TOML_BYTES, Suite, SuiteFiles};
use alki_shared::oci::{Descriptor, Manifest};

use crate::pull::manifest::read_small;
use crate::pull::{Acquirer, PullError, PullOptions};
use crate::reference::BundleLocation;
use crate::store::BlobLease;

/// A suite ready to run: parsed, its corpus a verified blob in the content store, leased (never evicted)
/// while the suite is held.
#[derive(Debug)]
pub struct AcquiredSuite {
    pub location: BundleLocation,
    pub suite: Suite,
    /// The corpus blob, passed to llama-perplexity as it is.
    pub corpus: PathBuf,
    _leases: Vec<BlobLease>,
}

impl AcquiredSuite {
    /// The suite's manifest digest.
    pub fn digest(&self) -> &Digest {
        &self.location.digest
    }
}

/// Why a suite cannot be used: its reason, for the report.
#[derive(Debug, thiserror::Error)]
pub enum SuiteRefused {
    #[error("eval suite {suite}: {source}")]
    Pull { suite: String, source: PullError },
    #[error("eval suite {suite}: {reason}; push the suite again with alkictl eval push")]
    Invalid { suite: String, reason: String },
}

/// Acquires the suite at `location`: signature, manifest checks and layers through `acquirer`, then parsed.
pub async fn acquire(
    acquirer: &Acquirer,
    location: &BundleLocation,
    options: &PullOptions,
) -> Result<AcquiredSuite, SuiteRefused> {
    let pulled = acquirer.acquire_artifact(location, None, &suite_layers, options).await;
    let refused = |source: PullError| SuiteRefused::Pull { suite: location.to_string(), source: source.about_suite() };
    let (_, layers) = pulled.map_err(refused)?;
    let store = &acquirer.store;
    // Leased at once: the device loop's eviction must not take the files between the pull and their use.
    let leases: Vec<BlobLease> = layers.iter().map(|d| store.lease(&d.digest)).collect();
    let invalid = |reason: String| SuiteRefused::Invalid { suite: location.to_string(), reason };
    let [toml, corpus, prompts] = layers.as_slice() else {
        return Err(invalid(format!("{} layers where a suite has 3", layers.len())));
    };
    let mut files = Vec::new();
    for (d, cap) in [(toml, MAX_SUITE_TOML_BYTES), (corpus, MAX_CORPUS_BYTES), (prompts, MAX_PROMPTS_BYTES)] {
        let bytes = read_small(store, &d.digest, cap as u64).await;
        files.push(bytes.ok_or_else(|| invalid(format!("layer {} is not readable in the content store", d.digest)))?);
    }
    let suite = Suite::parse(SuiteFiles { manifest: &files[0], corpus: &files[1], prompts: &files[2] })
        .map_err(|e| invalid(e.to_string()))?;
    tracing::info!(suite = %location, name = %suite.manifest.name, prompts = suite.prompts.len(), "Eval suite ready.");
    Ok(AcquiredSuite { location: location.clone(), suite, corpus: store.path(&corpus.digest), _leases: leases })
}

/// The three layers of an eval suite's manifest, refused (unknown artifact, malformed, or a layer over its
/// size cap) before any of them is downloaded.
fn suite_layers(manifest: &Manifest) -> Result<Vec<Descriptor>, PullError> {
    match manifest {
        Manifest::Image(m) => match read_manifest(m) {
            Ok(layers) => Ok(vec![layers.manifest, layers.corpus, layers.prompts]),
            Err(e) => Err(PullError::Unusable(e.to_string())),
        },
        Manifest::Index(_) => Err(PullError::Unusable(
            "not an eval suite: it is an image index; push suites with alkictl eval push".to_owned(),
        )),
    }
}
