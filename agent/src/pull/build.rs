//! Runtime builds: the llama.cpp build a bundle's runtime layer names (`runtime_build`, pinned by digest),
//! pulled for this device's platform and extracted, so llama-server runs the build the bundle was made for.
//!
//! A build is an OCI image index pushed by `alkictl runtime push`: one manifest per platform (`platform`
//! os/architecture, annotation `ai.alki.accelerator` cpu or cuda) with one tar layer holding `llama-server`
//! and its shared libraries. Its signature is checked against the trust policy for the build's repository
//! before anything else is fetched; the tar layer goes through the content store like model layers and is
//! extracted ([`super::extract`]) into `<data_dir>/runtime-builds/<layer hex>/`, from where llama-server is
//! started with `LD_LIBRARY_PATH` set to it, so the libraries beside it are the ones it loads.

use std::path::{Path, PathBuf};

use alki_shared::bundle::{
    ANNOTATION_ACCELERATOR, ANNOTATION_CPU_FEATURES, MEDIA_TYPE_RUNTIME_BUILD_CONFIG, MEDIA_TYPE_RUNTIME_BUILD_TAR,
    parse_cpu_features, parse_runtime_build, runtime_platform_label,
};
use alki_shared::digest::Digest;
use alki_shared::oci::{Descriptor, ImageIndex, ImageManifest, Manifest};
use alki_shared::proto;

use super::blob::{Pace, PullProgress, Reporter, check_disk, fetch_blob};
use super::bundle::{PullOptions, PulledBundle};
use super::error::PullError;
use super::extract::install;
use super::manifest::fetch_manifest;
use super::registry::{Attempt, RegistryAccess};
use super::signature::check_signature_store_first;
use crate::reference::{BundleLocation, short};
use crate::store::ContentStore;
use crate::trust::TrustStore;

/// The directory under the data dir that holds extracted builds.
pub const DIR_NAME: &str = "runtime-builds";
/// A build's config is a small JSON document.
const MAX_CONFIG_BYTES: u64 = 64 << 10;

/// What this device runs: OCI os and architecture, its CPU features, and whether it has an NVIDIA GPU for a
/// CUDA build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlatform {
    pub os: String,
    pub architecture: String,
    /// `/proc/cpuinfo` names ([`alki_shared::bundle::CPU_FEATURES`]).
    pub cpu_features: Vec<String>,
    pub nvidia_gpu: bool,
}

impl DevicePlatform {
    /// This machine: the compiled-in OS and architecture, the CPU features the process may use, and the GPUs
    /// the inventory finds (driver files and the Jetson device tree; nvidia-smi is not run for this).
    pub fn detect() -> DevicePlatform {
        let board = crate::inventory::read_board(Path::new("/"), false, 0);
        let cpuinfo = crate::inventory::read_small(Path::new("/proc/cpuinfo")).unwrap_or_default();
        DevicePlatform {
            nvidia_gpu: !board.gpus.is_empty(),
            cpu_features: crate::inventory::live_cpu_features(&cpuinfo),
            ..DevicePlatform::compiled()
        }
    }

    /// The platform an inventory describes (a device's report, or a fixture board's).
    pub fn of_inventory(inventory: &proto::Inventory) -> DevicePlatform {
        DevicePlatform {
            os: std::env::consts::OS.to_owned(),
            architecture: oci_architecture(&inventory.arch).to_owned(),
            cpu_features: inventory.cpu_features.clone(),
            nvidia_gpu: !inventory.gpus.is_empty(),
        }
    }

    /// The compiled-in OS and architecture, without a GPU or features.
    fn compiled() -> DevicePlatform {
        DevicePlatform {
            os: std::env::consts::OS.to_owned(),
            architecture: oci_architecture(std::env::consts::ARCH).to_owned(),
            cpu_features: Vec::new(),
            nvidia_gpu: false,
        }
    }

    fn label(&self) -> String {
        let gpu = if self.nvidia_gpu { " with an NVIDIA GPU" } else { "" };
        let features = if self.cpu_features.is_empty() { "none".to_owned() } else { self.cpu_features.join(" ") };
        format!("{}/{}{gpu} (CPU features: {features})", self.os, self.architecture)
    }
}

/// Rust's architecture names (`std::env::consts::ARCH`) to OCI's: the one mapping alkictl packs builds by.
pub use alki_shared::bundle::oci_architecture;

fn accelerator(entry: &Descriptor) -> &str {
    entry.annotation(ANNOTATION_ACCELERATOR).unwrap_or("cpu")
}

/// The CPU features an entry needs (none: the architecture's baseline).
fn required_features(entry: &Descriptor) -> Vec<String> {
    entry.annotation(ANNOTATION_CPU_FEATURES).map(parse_cpu_features).unwrap_or_default()
}

/// `linux/arm64/cuda` or `linux/arm64+asimddp+asimdhp` for an index entry, as `alkictl runtime push` names it.
pub fn entry_label(entry: &Descriptor) -> String {
    let Some(p) = &entry.platform else { return "(no platform)".to_owned() };
    runtime_platform_label(&p.os, &p.architecture, p.variant.as_deref(), accelerator(entry), &required_features(entry))
}

/// The entry of `index` this device runs: of its os and architecture, one whose every required CPU feature
/// the device has; CUDA first when it has an NVIDIA GPU, else CPU; among those the most tuned (most features
/// required), so a Pi 5 takes the dotprod/fp16 build and a Pi 4 the baseline. Err: the platforms the build
/// has, for the refusal.
pub fn choose_platform<'a>(index: &'a ImageIndex, device: &DevicePlatform) -> Result<&'a Descriptor, String> {
    let runnable: Vec<(&Descriptor, usize)> = index
        .manifests
        .iter()
        .filter(|e| e.platform.as_ref().is_some_and(|p| p.os == device.os && p.architecture == device.architecture))
        .filter_map(|e| {
            let needs = required_features(e);
            needs.iter().all(|f| device.cpu_features.contains(f)).then_some((e, needs.len()))
        })
        .collect();
    // The most tuned entry of an accelerator; among equals the first pushed (`max_by_key` keeps the last).
    let best = |acc: &str| {
        runnable.iter().filter(|(e, _)| accelerator(e) == acc).rev().max_by_key(|(_, needs)| *needs).map(|(e, _)| *e)
    };
    let chosen = if device.nvidia_gpu { best("cuda").or_else(|| best("cpu")) } else { best("cpu") };
    chosen.ok_or_else(|| {
        let offered: Vec<String> = index.manifests.iter().map(entry_label).collect();
        if offered.is_empty() { "no platform at all".to_owned() } else { offered.join(", ") }
    })
}

/// Where runtime builds come from and go, and the policy they are checked against.
#[derive(Clone, Copy)]
pub struct Builds<'a> {
    pub registry: &'a RegistryAccess,
    pub store: &'a ContentStore,
    /// `<data_dir>/runtime-builds`.
    pub dir: &'a Path,
    pub trust: &'a TrustStore,
}

/// When the pulled variant's runtime layer names a build: pulls this device's entry of it (signature checked
/// against the trust policy for the build's repository before anything else is fetched), extracts it and sets
/// `pulled.runtime_server`. A variant naming no build is left as it is. Failures are about the build
/// ([`PullError::RuntimeBuild`]); `options` gives the disk reserve and bandwidth limit.
pub async fn attach(
    pulled: &mut PulledBundle,
    builds: &Builds<'_>,
    options: &PullOptions,
    progress: &mut (dyn FnMut(PullProgress) + Send),
) -> Result<(), PullError> {
    let Some(reference) = pulled.runtime_defaults.as_ref().and_then(|d| d.runtime_build.clone()) else {
        return Ok(());
    };
    let (registry, repository, digest) =
        parse_runtime_build(&reference).map_err(|reason| PullError::NotABuild(reason).about_build(&reference))?;
    let build = BundleLocation { registry, repository, digest, tag: String::new() };
    let trust = builds.trust.for_repository_off_thread(&build.repository).await;
    let options = PullOptions { trust, ..options.clone() };
    let device =
        tokio::task::spawn_blocking(DevicePlatform::detect).await.unwrap_or_else(|_| DevicePlatform::compiled());
    let pull = BuildPull { builds, build: &build, device: &device, options: &options };
    let mut attempt = WithProgress { pull: &pull, progress };
    let (server, platform) =
        builds.registry.from_each_endpoint(&build, &mut attempt).await.map_err(|e| e.about_build(&build))?;
    tracing::info!(build = %build, %platform, server = %server.display(), "Runtime build ready.");
    pulled.runtime_server = Some(server);
    pulled.runtime_platform = Some(platform);
    Ok(())
}

/// One build pull for this device.
struct BuildPull<'a> {
    builds: &'a Builds<'a>,
    /// The build as the bundle names it (shown in logs).
    build: &'a BundleLocation,
    device: &'a DevicePlatform,
    options: &'a PullOptions,
}

/// [`BuildPull::from`] an endpoint, for [`RegistryAccess::from_each_endpoint`]; `progress` sees the build's
/// bytes (done of total).
struct WithProgress<'a, 'p> {
    pull: &'a BuildPull<'a>,
    progress: &'a mut (dyn FnMut(PullProgress) + Send + 'p),
}

impl Attempt for WithProgress<'_, '_> {
    type Output = (PathBuf, String);
    fn attempt<'a>(
        &'a mut self,
        at: &'a BundleLocation,
    ) -> impl Future<Output = Result<(PathBuf, String), PullError>> + Send + 'a {
        self.pull.from(at, &mut *self.progress)
    }
}

/// This device's entry of a build: the platform manifest and its one tar layer.
struct Entry {
    /// As [`entry_label`] names it.
    label: String,
    digest: Digest,
    manifest: ImageManifest,
    layer: Descriptor,
}

impl BuildPull<'_> {
    /// One attempt from `at` (the build with its registry replaced by a mirror or the origin): the extracted
    /// build's `llama-server` and the platform entry it came from.
    async fn from(
        &self,
        at: &BundleLocation,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<(PathBuf, String), PullError> {
        let Builds { registry, store, .. } = *self.builds;
        // The signature first: nothing the build's manifests say is acted on before it verifies.
        check_signature_store_first(registry, store, at, &self.options.trust).await?;
        let entry = self.platform_entry(at).await?;
        self.fetch(at, &entry, progress).await?;
        store.touch(&at.digest).await;
        store.touch(&entry.digest).await;
        Ok((self.install(&entry.layer).await?, entry.label))
    }

    /// The index, this device's entry in it and that entry's manifest, checked to be a build's.
    async fn platform_entry(&self, at: &BundleLocation) -> Result<Entry, PullError> {
        let Builds { registry, store, .. } = *self.builds;
        let index = match fetch_manifest(registry, store, at, &at.digest, "runtime build index").await? {
            Manifest::Index(index) => index,
            Manifest::Image(_) => {
                return Err(PullError::NotABuild("it is a single manifest, not an index of platforms".to_owned()));
            }
        };
        let device = self.device;
        let entry = choose_platform(&index, device).map_err(|offered| PullError::NoPlatform {
            device: device.label(),
            os_arch: format!("{}/{}{}", device.os, device.architecture, if device.nvidia_gpu { "/cuda" } else { "" }),
            offered,
        })?;
        let label = entry_label(entry);
        tracing::info!(build = %self.build, platform = %label, "Chose the runtime build's platform entry.");
        let digest = entry.digest.clone();
        let manifest = match fetch_manifest(registry, store, at, &digest, "runtime build manifest").await? {
            Manifest::Image(m) => m,
            Manifest::Index(_) => return Err(PullError::NotABuild(format!("entry {} is an index", short(&digest)))),
        };
        let layers: Vec<&Descriptor> =
            manifest.layers.iter().filter(|l| l.media_type == MEDIA_TYPE_RUNTIME_BUILD_TAR).collect();
        let [layer] = layers.as_slice() else {
            return Err(PullError::NotABuild(format!(
                "entry {} has {} layers of type {MEDIA_TYPE_RUNTIME_BUILD_TAR}; a build has exactly one",
                short(&digest),
                layers.len()
            )));
        };
        if manifest.config.media_type != MEDIA_TYPE_RUNTIME_BUILD_CONFIG || manifest.config.size > MAX_CONFIG_BYTES {
            return Err(PullError::NotABuild(format!("entry {} has no runtime build config", short(&digest))));
        }
        let layer = (*layer).clone();
        Ok(Entry { label, digest, manifest, layer })
    }

    /// The entry's config and tar layer into the store, each unless already stored and verified; `progress`
    /// sees the build's bytes (done of total).
    async fn fetch(
        &self,
        at: &BundleLocation,
        entry: &Entry,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<(), PullError> {
        let Builds { registry, store, dir, .. } = *self.builds;
        let mut pace = self.options.bandwidth.map(Pace::new);
        let total = entry.manifest.config.size.saturating_add(entry.layer.size);
        let mut reporter = Reporter::new(progress, 0, total);
        let mut done = 0u64;
        for d in [&entry.manifest.config, &entry.layer] {
            if store.verified(&d.digest, d.size).await.map_err(PullError::Store)? {
                store.touch(&d.digest).await;
            } else {
                // The tar and its extracted copy.
                check_disk(dir, d.size.saturating_mul(2), self.options.disk_reserve).await?;
                fetch_blob(registry, store, at, d, &mut pace, &mut |n| reporter.report(done.saturating_add(n), false))
                    .await?;
            }
            done = done.saturating_add(d.size);
        }
        reporter.report(total, true);
        Ok(())
    }

    /// Extracts the stored tar layer (off the async threads); the build's `llama-server`.
    async fn install(&self, layer: &Descriptor) -> Result<PathBuf, PullError> {
        let Builds { store, dir, .. } = *self.builds;
        let blob = store.path(&layer.digest);
        let (builds_dir, digest) = (dir.to_owned(), layer.digest.clone());
        match tokio::task::spawn_blocking(move || install(&blob, &builds_dir, &digest)).await {
            Ok(installed) => installed,
            Err(join) => {
                Err(PullError::Extract { dir: dir.join(layer.digest.hex()), source: std::io::Error::other(join) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::oci::{MEDIA_TYPE_IMAGE_MANIFEST, Platform};

    fn entry(os: &str, arch: &str, accelerator: &str) -> Descriptor {
        let mut d =
            Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, Digest::of(format!("{arch}{accelerator}").as_bytes()), 1);
        d.platform = Some(Platform { os: os.into(), architecture: arch.into(), variant: None });
        d.annotations.insert(ANNOTATION_ACCELERATOR.into(), accelerator.into());
        d
    }

    fn index(entries: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            manifests: entries,
            subject: None,
            annotations: Default::default(),
        }
    }

    fn device(arch: &str, gpu: bool) -> DevicePlatform {
        DevicePlatform { os: "linux".into(), architecture: arch.into(), cpu_features: Vec::new(), nvidia_gpu: gpu }
    }

    fn tuned(mut e: Descriptor, features: &str) -> Descriptor {
        e.digest = Digest::of(features.as_bytes());
        e.annotations.insert(ANNOTATION_CPU_FEATURES.into(), features.into());
        e
    }

    #[test]
    fn the_most_tuned_entry_the_cpu_runs_wins() {
        let idx = index(vec![
            entry("linux", "arm64", "cpu"),
            tuned(entry("linux", "arm64", "cpu"), "asimddp,asimdhp"),
            tuned(entry("linux", "arm64", "cpu"), "asimddp,asimdhp,i8mm,sve"),
            entry("linux", "arm64", "cuda"),
        ]);
        let with = |features: &[&str], gpu: bool| DevicePlatform {
            cpu_features: features.iter().map(|f| (*f).to_owned()).collect(),
            ..device("arm64", gpu)
        };
        let chosen = |d: DevicePlatform| choose_platform(&idx, &d).map(entry_label);
        // Pi 4 (Cortex-A72): no dot product.
        assert_eq!(chosen(with(&["asimd"], false)), Ok("linux/arm64".to_owned()));
        // Pi 5 (Cortex-A76).
        assert_eq!(chosen(with(&["asimd", "asimddp", "asimdhp"], false)), Ok("linux/arm64+asimddp+asimdhp".to_owned()));
        // A CPU with every feature takes the most tuned.
        let all = ["asimd", "asimddp", "asimdhp", "i8mm", "sve"];
        assert_eq!(chosen(with(&all, false)), Ok("linux/arm64+asimddp+asimdhp+i8mm+sve".to_owned()));
        // A GPU still takes CUDA first.
        assert_eq!(chosen(with(&all, true)), Ok("linux/arm64/cuda".to_owned()));
        // Equally tuned entries: the first pushed.
        let tie = index(vec![
            tuned(entry("linux", "arm64", "cpu"), "asimdhp"),
            tuned(entry("linux", "arm64", "cpu"), "asimddp"),
        ]);
        assert_eq!(choose_platform(&tie, &with(&all, false)).map(entry_label), Ok("linux/arm64+asimdhp".to_owned()));
        let only_tuned = index(vec![tuned(entry("linux", "arm64", "cpu"), "asimddp")]);
        let err = choose_platform(&only_tuned, &with(&["asimd"], false)).map(entry_label).expect_err("too old");
        assert_eq!(err, "linux/arm64+asimddp");
    }

    #[test]
    fn the_platform_entry_follows_architecture_and_gpu() {
        let idx = index(vec![
            entry("linux", "amd64", "cpu"),
            entry("linux", "arm64", "cpu"),
            entry("linux", "arm64", "cuda"),
        ]);
        let chosen = |d: DevicePlatform| choose_platform(&idx, &d).map(entry_label);
        assert_eq!(chosen(device("amd64", false)), Ok("linux/amd64".to_owned()));
        assert_eq!(chosen(device("arm64", false)), Ok("linux/arm64".to_owned()));
        assert_eq!(chosen(device("arm64", true)), Ok("linux/arm64/cuda".to_owned()), "a Jetson takes the CUDA build");
        assert_eq!(chosen(device("amd64", true)), Ok("linux/amd64".to_owned()), "no CUDA entry: the CPU one");
        let err = chosen(device("riscv64", false)).expect_err("no entry");
        assert_eq!(err, "linux/amd64, linux/arm64, linux/arm64/cuda");
        let cuda_only = index(vec![entry("linux", "arm64", "cuda")]);
        assert!(choose_platform(&cuda_only, &device("arm64", false)).is_err(), "CUDA needs a GPU");
        assert_eq!(oci_architecture("x86_64"), "amd64");
        assert_eq!(oci_architecture("aarch64"), "arm64");
    }
}
