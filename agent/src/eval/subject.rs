//! A bundle variant to evaluate, resolved on the device: the bundle's signature checked and its index read
//! (store first), the variant chosen (the one asked for, or the one this device would run), the memory probe
//! (what is loaded must fit beside what is served, with the reserve), then acquired through the one acquire
//! path (its runtime build too) into the evaluation's own directory, and made a [`Model`] to measure.

use std::path::Path;

use alki_shared::bundle::{VariantInfo, choose_variant, variants, weight_layers};
use alki_shared::digest::Digest;
use alki_shared::eval::quality::CouldNotRun;
use alki_shared::oci::Manifest;

use super::measure::Model;
use super::tool;
use crate::pull::{Acquirer, PullOptions, PulledBundle, Want};
use crate::reference::{BundleLocation, short};
use crate::settings::RuntimeOverrides;

/// Memory an evaluation may use: what is available now (the serving model already loaded) less the reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub available: u64,
    pub reserve: u64,
}

impl Memory {
    /// The memory available now, less `reserve`.
    pub async fn probe(reserve: u64) -> Memory {
        let available = tokio::task::spawn_blocking(crate::inventory::memory_available).await.unwrap_or_default();
        Memory { available, reserve }
    }

    pub fn budget(&self) -> u64 {
        self.available.saturating_sub(self.reserve)
    }

    /// DoesNotFit for a variant needing `needs` bytes, when it does not fit.
    pub fn fit(&self, needs: u64) -> Result<(), CouldNotRun> {
        if needs <= self.budget() {
            return Ok(());
        }
        Err(CouldNotRun::DoesNotFit {
            needed_bytes: needs.saturating_add(self.reserve),
            available_bytes: self.available,
        })
    }
}

/// A variant chosen for an evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub bundle: BundleLocation,
    /// The variant manifest's digest (the bundle's own for a single-manifest bundle).
    pub variant: Digest,
    /// Memory it needs, from the index's annotations (0 when unknown: checked again once acquired).
    pub needs: u64,
}

/// What a bundle offers: its variants, or one manifest needing `weights` bytes.
pub enum Offer {
    Index(Vec<VariantInfo>),
    Single { weights: u64 },
}

/// Reads what `bundle` offers: its signature checked against the trust policy first, then its index (or
/// single manifest), from the content store when there, else from its registry. Nothing else is fetched.
pub async fn offer(acquirer: &Acquirer, bundle: &BundleLocation, options: &PullOptions) -> Result<Offer, CouldNotRun> {
    let read = acquirer.acquire_artifact(bundle, None, &|_| Ok(Vec::new()), options).await;
    match read.map_err(|e| CouldNotRun::Failed { problem: e.about_bundle(bundle).to_string() })? {
        (Manifest::Index(index), _) => Ok(Offer::Index(variants(&index))),
        (Manifest::Image(m), _) => {
            Ok(Offer::Single { weights: weight_layers(&m).iter().map(|l| l.size).fold(0, u64::saturating_add) })
        }
    }
}

/// The variant of `bundle` to evaluate: `requested`, or the one this device would run within the memory
/// budget (refused with the numbers when none fits). A requested variant is not checked against the memory:
/// whether it must fit (a baseline whose logits are cached is never loaded) is the caller's to say.
pub async fn choose(
    acquirer: &Acquirer,
    bundle: &BundleLocation,
    requested: Option<&Digest>,
    memory: Memory,
    options: &PullOptions,
) -> Result<Choice, CouldNotRun> {
    let choice = |variant: Digest, needs: u64| Choice { bundle: bundle.clone(), variant, needs };
    let chosen = match offer(acquirer, bundle, options).await? {
        Offer::Single { weights } => choice(bundle.digest.clone(), weights),
        Offer::Index(offered) => {
            let need = |v: &VariantInfo| v.memory_bytes.max(v.weights_bytes);
            let found = match requested {
                Some(want) => offered.iter().find(|v| &v.descriptor.digest == want).cloned().ok_or_else(|| {
                    CouldNotRun::Failed {
                        problem: format!("bundle {bundle} has no variant {}; name one of its index", short(want)),
                    }
                })?,
                None => pick(&offered, memory)?,
            };
            choice(found.descriptor.digest.clone(), need(&found))
        }
    };
    Ok(chosen)
}

/// The variant this device would run: the largest that fits; DoesNotFit with the smallest's need when none.
fn pick(offered: &[VariantInfo], memory: Memory) -> Result<VariantInfo, CouldNotRun> {
    let index = alki_shared::oci::ImageIndex {
        schema_version: 2,
        media_type: None,
        artifact_type: None,
        manifests: offered.iter().map(|v| v.descriptor.clone()).collect(),
        subject: None,
        annotations: Default::default(),
    };
    if let Some(v) = choose_variant(&index, memory.budget()) {
        return Ok(v);
    }
    let smallest = offered.iter().map(|v| v.memory_bytes.max(v.weights_bytes)).min().unwrap_or(u64::MAX);
    Err(memory.fit(smallest).err().unwrap_or(CouldNotRun::Failed { problem: "the bundle lists no variant".into() }))
}

/// Acquires the chosen variant (and its runtime build) into `into`, then checks its files fit in memory.
pub async fn acquire(
    acquirer: &Acquirer,
    choice: &Choice,
    into: &Path,
    memory: Memory,
    options: &PullOptions,
) -> Result<PulledBundle, CouldNotRun> {
    let options = PullOptions { preferred_variant: Some(choice.variant.clone()), ..options.clone() };
    // The variant was chosen already: the pull must take exactly it, whatever the memory says now.
    let want = Want { bundle: &choice.bundle, into, memory: Some(u64::MAX), trust: None, options };
    let pulled =
        acquirer.acquire(want, &mut |_| {}).await.map_err(|e| CouldNotRun::Failed { problem: e.to_string() })?;
    if pulled.variant_digest != choice.variant {
        let problem = format!("bundle {}: the pull took variant {}", choice.bundle, short(&pulled.variant_digest));
        return Err(CouldNotRun::Failed { problem });
    }
    if choice.needs == 0 {
        memory.fit(pulled.memory_needs().await)?;
    }
    Ok(pulled)
}

/// An acquired variant as a model to measure: its launch spec, its build's llama-perplexity, its vocabulary.
pub async fn model(
    pulled: &PulledBundle,
    bundle: &BundleLocation,
    configured_server: &Path,
) -> Result<Model, CouldNotRun> {
    let spec = pulled
        .launch_spec(&bundle.digest, &RuntimeOverrides::default())
        .ok_or_else(|| CouldNotRun::Failed { problem: format!("bundle {bundle}: the variant has no GGUF file") })?;
    let tool = tool::find(&spec.settings, configured_server).await?;
    let vocab = super::vocab::read(&spec.model_path).await;
    Ok(Model { digest: pulled.variant_digest.clone(), spec, tool, vocab })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::oci::{Descriptor, MEDIA_TYPE_IMAGE_MANIFEST};

    fn variant(name: &str, weights: u64, memory: u64) -> VariantInfo {
        let mut d = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, Digest::of(name.as_bytes()), 100);
        d.annotations = alki_shared::bundle::variant_annotations(name, "llama", "m", 1, 1, weights, memory);
        VariantInfo::from_descriptor(&d)
    }

    #[test]
    fn the_variant_this_device_would_run_fits_or_the_refusal_has_the_numbers() {
        let offered = [variant("Q4_K_M", 400, 500), variant("Q8_0", 800, 900), variant("F16", 1600, 1700)];
        let memory = Memory { available: 1200, reserve: 200 };
        assert_eq!(pick(&offered, memory).expect("Q8 fits 1000").quantization, "Q8_0");
        let tight = Memory { available: 600, reserve: 200 };
        let refused = pick(&offered, tight).expect_err("nothing fits 400");
        assert_eq!(refused, CouldNotRun::DoesNotFit { needed_bytes: 700, available_bytes: 600 });
        assert_eq!(refused.to_string(), "does not fit: needs 0 MiB beside what is served, 0 MiB available");
        assert_eq!(memory.fit(1000), Ok(()));
        assert!(memory.fit(1001).is_err());
    }
}
