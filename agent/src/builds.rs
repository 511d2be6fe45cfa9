//! Runtime builds: resolve the entry of a llama.cpp build for this device's platform, pull it (signature
//! first, then the tar layer through the content store like model layers), extract it safely into a
//! per-digest directory, and keep the builds of the active and previous deployments.
//!
//! A bundle's runtime layer may name a build (`runtime_build`, pinned by digest). The build is an OCI image
//! index pushed by `alkictl runtime push`: one manifest per platform (`platform` os/architecture, annotation
//! `ai.alki.accelerator` cpu or cuda) with one tar layer holding `llama-server` and its shared libraries.
//! The extracted directory is `<data_dir>/runtime-builds/<layer hex>/`; llama-server is started from there
//! with `LD_LIBRARY_PATH` set to it, so the libraries beside it are the ones it loads.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use alki_shared::bundle::{
    ANNOTATION_ACCELERATOR, MEDIA_TYPE_RUNTIME_BUILD_CONFIG, MEDIA_TYPE_RUNTIME_BUILD_TAR, RUNTIME_BUILD_SERVER,
    RuntimeDefaults, parse_runtime_build, runtime_layer,
};
use alki_shared::digest::Digest;
use alki_shared::oci::{Descriptor, ImageIndex, ImageManifest, MAX_MANIFEST_BYTES, Manifest};
use alki_shared::proto::ErrorCode;

use crate::pull::{PullError, PullErrorKind, PullOptions, PullProgress, PulledBundle, RegistryAccess};
use crate::reference::{BundleLocation, short};
use crate::store::ContentStore;
use crate::trust::TrustStore;

/// The directory under the data dir that holds extracted builds.
pub const DIR_NAME: &str = "runtime-builds";
/// A build's config is a small JSON document.
const MAX_CONFIG_BYTES: u64 = 64 << 10;
/// Entries in one build's archive; llama.cpp's has about twenty.
const MAX_ENTRIES: usize = 10_000;
/// A build directory this recent is never pruned: a pull in progress may be about to start it.
const PRUNE_GRACE: Duration = Duration::from_secs(3600);

/// What this device runs: OCI os and architecture, and whether it has an NVIDIA GPU for a CUDA build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlatform {
    pub os: String,
    pub architecture: String,
    pub nvidia_gpu: bool,
}

impl DevicePlatform {
    /// This machine: the compiled-in OS and architecture, and the GPUs the inventory finds (driver files and
    /// the Jetson device tree; nvidia-smi is not run for this).
    pub fn detect() -> DevicePlatform {
        let board = crate::inventory::read_board(Path::new("/"), false, 0);
        DevicePlatform {
            os: std::env::consts::OS.to_owned(),
            architecture: oci_architecture(std::env::consts::ARCH).to_owned(),
            nvidia_gpu: !board.gpus.is_empty(),
        }
    }

    fn label(&self) -> String {
        format!("{}/{}{}", self.os, self.architecture, if self.nvidia_gpu { " with an NVIDIA GPU" } else { "" })
    }
}

/// Rust's architecture names (`std::env::consts::ARCH`) to OCI's.
pub fn oci_architecture(rust: &str) -> &str {
    match rust {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn accelerator(entry: &Descriptor) -> &str {
    entry.annotation(ANNOTATION_ACCELERATOR).unwrap_or("cpu")
}

/// `linux/arm64/cuda` for an index entry.
fn entry_label(entry: &Descriptor) -> String {
    let Some(p) = &entry.platform else { return "(no platform)".to_owned() };
    let mut s = format!("{}/{}", p.os, p.architecture);
    if let Some(v) = &p.variant {
        s = s + "/" + v;
    }
    match accelerator(entry) {
        "cpu" => s,
        other => s + "/" + other,
    }
}

/// The entry of `index` this device runs: its os and architecture, CUDA when it has an NVIDIA GPU and the
/// build has a CUDA entry, else CPU. Err: the platforms the build has, for the refusal.
pub fn choose_platform<'a>(index: &'a ImageIndex, device: &DevicePlatform) -> Result<&'a Descriptor, String> {
    let matching: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|e| e.platform.as_ref().is_some_and(|p| p.os == device.os && p.architecture == device.architecture))
        .collect();
    let pick = |acc: &str| matching.iter().copied().find(|e| accelerator(e) == acc);
    let chosen = if device.nvidia_gpu { pick("cuda").or_else(|| pick("cpu")) } else { pick("cpu") };
    chosen.ok_or_else(|| {
        let offered: Vec<String> = index.manifests.iter().map(entry_label).collect();
        if offered.is_empty() { "no platform at all".to_owned() } else { offered.join(", ") }
    })
}

/// Why a runtime build cannot be used; wrapped in a [`PullError`] of the bundle that names it.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "runtime build {build} has no entry for this device ({device}); it has: {offered}; push one with \
         `alkictl runtime push --platform {os_arch}=DIR` or name another build in the bundle"
    )]
    NoPlatform { build: String, device: String, os_arch: String, offered: String },
    #[error("runtime build {build}: {reason}; push it with `alkictl runtime push`")]
    Invalid { build: String, reason: String },
    #[error(
        "runtime build {build}: layer {}: {problem}; the build is refused — repack it with `alkictl runtime push`",
        short(layer)
    )]
    Archive { build: String, layer: Digest, problem: ArchiveProblem },
    #[error("runtime build {build}: cannot extract into {}: {source}; check that the data_dir is writable and has free space", dir.display())]
    Io { build: String, dir: PathBuf, source: std::io::Error },
    /// Fetching the build (registry, digests, signature, disk) failed.
    #[error("runtime build {build}: {message}")]
    Pull { build: String, message: String, code: ErrorCode, retry: bool, layer: Option<Digest> },
}

impl BuildError {
    fn from_pull(build: &str, kind: PullErrorKind) -> BuildError {
        let e = PullError { bundle: build.to_owned(), kind };
        BuildError::Pull {
            build: build.to_owned(),
            code: e.code(),
            retry: e.may_try_another_source(),
            layer: e.layer_digest().cloned(),
            message: e.kind.to_string(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            BuildError::NoPlatform { .. } => ErrorCode::NoVariantFits,
            BuildError::Invalid { .. } | BuildError::Archive { .. } => ErrorCode::BundleInvalid,
            BuildError::Io { source, .. } if source.raw_os_error() == Some(28) => ErrorCode::DiskFull,
            BuildError::Io { .. } => ErrorCode::Io,
            BuildError::Pull { code, .. } => *code,
        }
    }

    pub fn layer_digest(&self) -> Option<&Digest> {
        match self {
            BuildError::Archive { layer, .. } => Some(layer),
            BuildError::Pull { layer, .. } => layer.as_ref(),
            _ => None,
        }
    }

    /// True when another source (mirror or origin) may succeed.
    pub fn may_try_another_source(&self) -> bool {
        matches!(self, BuildError::Pull { retry: true, .. })
    }
}

/// What is wrong with a build's archive. Any of these refuses the whole build; nothing is left extracted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveProblem {
    #[error("entry {0:?} has an absolute path")]
    Absolute(String),
    #[error("entry {0:?} climbs out of the build directory with `..`")]
    Traversal(String),
    #[error("entry {0:?} has an empty or unreadable path")]
    BadPath(String),
    #[error("entry {path:?} is a link to {target:?}, which leaves its directory (links must point down, without `..`)")]
    LinkEscapes { path: String, target: String },
    #[error("entry {0:?} is a hard link; a build holds files, directories and relative symbolic links only")]
    HardLink(String),
    #[error("entry {path:?} is a {kind} (device files, pipes and other special entries are refused)")]
    Special { path: String, kind: String },
    #[error("entry {0:?} would be written through a symbolic link or over a file")]
    ThroughLink(String),
    #[error("entry {0:?} appears twice")]
    Duplicate(String),
    #[error("the archive has more than {MAX_ENTRIES} entries")]
    TooMany,
    #[error("the archive has no executable `llama-server` at its top")]
    NoServer,
    #[error("the archive is malformed: {0}")]
    Malformed(String),
}

/// Extraction failed: the archive is hostile or broken, or the disk refused.
#[derive(Debug)]
pub enum ExtractError {
    Archive(ArchiveProblem),
    Io(std::io::Error),
}

impl From<std::io::Error> for ExtractError {
    fn from(e: std::io::Error) -> Self {
        ExtractError::Io(e)
    }
}

/// The path of an archive entry as plain components below the build directory.
fn plain_path(raw: &Path) -> Result<PathBuf, ArchiveProblem> {
    let shown = raw.display().to_string();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(ArchiveProblem::Traversal(shown)),
            Component::RootDir | Component::Prefix(_) => return Err(ArchiveProblem::Absolute(shown)),
        }
    }
    if out.as_os_str().is_empty() { Err(ArchiveProblem::BadPath(shown)) } else { Ok(out) }
}

/// A symbolic link target is accepted when it is relative and only goes down from the link's directory: then
/// no chain of links can resolve outside the build directory.
fn link_goes_down(target: &Path) -> bool {
    !target.as_os_str().is_empty() && target.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Extracts a build archive into `dest` (an existing empty directory), refusing absolute paths, `..`, links
/// that leave their directory, hard links, device files and anything written through a link; every file and
/// directory is fsynced. Modes keep only the owner's bits and read/execute for others (no setuid, no
/// group/world write). Returns the entries extracted.
pub fn extract(archive: impl Read, dest: &Path) -> Result<usize, ExtractError> {
    let mut archive = tar::Archive::new(archive);
    let mut dirs = vec![dest.to_owned()];
    let mut count = 0usize;
    let malformed = |e: std::io::Error| ExtractError::Archive(ArchiveProblem::Malformed(e.to_string()));
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(ExtractError::Archive(ArchiveProblem::TooMany));
        }
        let raw = entry.path().map_err(malformed)?.into_owned();
        let rel = plain_path(&raw).map_err(ExtractError::Archive)?;
        let shown = rel.display().to_string();
        let kind = entry.header().entry_type();
        // Every parent must be a real directory inside dest (created here when missing), never a link.
        let mut at = dest.to_owned();
        let parents: Vec<_> = rel.parent().map(|p| p.components().collect()).unwrap_or_default();
        for part in parents {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(ExtractError::Archive(ArchiveProblem::ThroughLink(shown))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&at)?;
                    dirs.push(at.clone());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let target = dest.join(&rel);
        let existing = std::fs::symlink_metadata(&target).ok();
        match kind {
            tar::EntryType::Directory => match existing {
                Some(meta) if meta.is_dir() => {}
                Some(_) => return Err(ExtractError::Archive(ArchiveProblem::ThroughLink(shown))),
                None => {
                    std::fs::create_dir(&target)?;
                    dirs.push(target);
                }
            },
            _ if existing.is_some() => return Err(ExtractError::Archive(ArchiveProblem::Duplicate(shown))),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = entry.header().mode().map_err(malformed)? & 0o755;
                let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&target)?;
                std::io::copy(&mut entry, &mut file)?;
                file.set_permissions(std::fs::Permissions::from_mode(mode | 0o400))?;
                file.sync_all()?;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(malformed)?.map(|l| l.into_owned()).unwrap_or_default();
                if !link_goes_down(&link) {
                    return Err(ExtractError::Archive(ArchiveProblem::LinkEscapes {
                        path: shown,
                        target: link.display().to_string(),
                    }));
                }
                std::os::unix::fs::symlink(&link, &target)?;
            }
            tar::EntryType::Link => return Err(ExtractError::Archive(ArchiveProblem::HardLink(shown))),
            other => {
                let kind = match other {
                    tar::EntryType::Char => "character device".to_owned(),
                    tar::EntryType::Block => "block device".to_owned(),
                    tar::EntryType::Fifo => "named pipe".to_owned(),
                    other => format!("{other:?} entry"),
                };
                return Err(ExtractError::Archive(ArchiveProblem::Special { path: shown, kind }));
            }
        }
    }
    for dir in dirs.iter().rev() {
        alki_shared::fsutil::sync_dir(dir)?;
    }
    Ok(count)
}

/// The build's server in `dir` when it is an executable regular file (a link to one inside `dir` counts).
pub fn server_in(dir: &Path) -> Option<PathBuf> {
    let server = dir.join(RUNTIME_BUILD_SERVER);
    let meta = std::fs::metadata(&server).ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(server)
}

/// Extracts the stored layer at `blob` into `<builds_dir>/<layer hex>/` atomically: into a temporary
/// directory beside it, fsynced, checked for `llama-server`, then renamed. An existing directory (an earlier
/// extraction, complete since it was renamed into place) is reused.
pub fn install(blob: &Path, builds_dir: &Path, layer: &Digest) -> Result<PathBuf, ExtractError> {
    let dir = builds_dir.join(layer.hex());
    if let Some(server) = server_in(&dir) {
        return Ok(server);
    }
    std::fs::create_dir_all(builds_dir)?;
    if dir.exists() {
        // Not a complete build (it was renamed into place, so someone changed it): extract it again.
        std::fs::remove_dir_all(&dir)?;
    }
    let tmp = tempfile::Builder::new().prefix(&format!(".tmp-{}-", layer.hex())).tempdir_in(builds_dir)?;
    let file = std::fs::File::open(blob)?;
    extract(std::io::BufReader::with_capacity(1 << 20, file), tmp.path())?;
    if server_in(tmp.path()).is_none() {
        return Err(ExtractError::Archive(ArchiveProblem::NoServer));
    }
    let tmp = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    alki_shared::fsutil::sync_dir(builds_dir)?;
    server_in(&dir).ok_or(ExtractError::Archive(ArchiveProblem::NoServer))
}

/// Where builds come from and go: the registry access, the content store, the extracted builds' directory.
#[derive(Clone, Copy)]
pub struct Fetch<'a> {
    pub registry: &'a RegistryAccess,
    pub store: &'a ContentStore,
    pub builds_dir: &'a Path,
}

/// When the pulled bundle's runtime layer names a build: pulls this device's entry of it (signature checked
/// against the trust policy for the build's repository before anything else is fetched), extracts it and
/// sets `pulled.runtime_server`. A bundle naming no build is left as it is.
pub async fn attach(
    pulled: &mut PulledBundle,
    bundle: &BundleLocation,
    fetch: &Fetch<'_>,
    trust: &TrustStore,
    options: &PullOptions,
    progress: &mut (dyn FnMut(PullProgress) + Send),
) -> Result<(), PullError> {
    let Fetch { registry, store, builds_dir } = *fetch;
    let Some(reference) = pulled.runtime_defaults.as_ref().and_then(|d| d.runtime_build.clone()) else {
        return Ok(());
    };
    let wrap = |e: BuildError| PullError { bundle: bundle.to_string(), kind: PullErrorKind::RuntimeBuild(Box::new(e)) };
    let (reg, repository, digest) = parse_runtime_build(&reference)
        .map_err(|reason| wrap(BuildError::Invalid { build: reference.clone(), reason }))?;
    let build = BundleLocation { registry: reg, repository: repository.clone(), digest, tag: String::new() };
    let trust = trust.clone();
    let repo = repository.clone();
    let trust = tokio::task::spawn_blocking(move || trust.for_repository(&repo)).await.unwrap_or_default();
    let options = PullOptions { trust, ..options.clone() };
    let device = tokio::task::spawn_blocking(DevicePlatform::detect).await.unwrap_or_else(|_| DevicePlatform {
        os: std::env::consts::OS.to_owned(),
        architecture: oci_architecture(std::env::consts::ARCH).to_owned(),
        nvidia_gpu: false,
    });
    let endpoints = registry.endpoints(&build);
    let mut last = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        let source = BundleLocation { registry: endpoint.clone(), ..build.clone() };
        match pull_build(registry, store, builds_dir, &build, &source, &device, &options, &mut *progress).await {
            Ok(server) => {
                tracing::info!(build = %build, server = %server.display(), "Runtime build ready.");
                pulled.runtime_server = Some(server);
                return Ok(());
            }
            Err(e) if i + 1 < endpoints.len() && e.may_try_another_source() => {
                tracing::warn!(error = %e, source = %endpoint, "Runtime build pull from a mirror failed; trying the next source.");
                last = Some(e);
            }
            Err(e) => return Err(wrap(e)),
        }
    }
    Err(wrap(last.unwrap_or(BuildError::Invalid { build: build.to_string(), reason: "no source".to_owned() })))
}

/// One attempt from `source`; errors name `shown`. `progress` sees the build's bytes (done of total).
#[allow(clippy::too_many_arguments)]
async fn pull_build(
    registry: &RegistryAccess,
    store: &ContentStore,
    builds_dir: &Path,
    shown: &BundleLocation,
    source: &BundleLocation,
    device: &DevicePlatform,
    options: &PullOptions,
    progress: &mut (dyn FnMut(PullProgress) + Send),
) -> Result<PathBuf, BuildError> {
    let name = shown.to_string();
    let pull = |kind: PullErrorKind| BuildError::from_pull(&name, kind);
    let invalid = |reason: String| BuildError::Invalid { build: name.clone(), reason };
    // The signature first: nothing the build's manifests say is acted on before it verifies.
    crate::pull::for_builds::check_signature(registry, store, source, &options.trust).await.map_err(pull)?;
    let index =
        match crate::pull::for_builds::fetch_manifest(registry, store, source, &source.digest, "runtime build index")
            .await
            .map_err(pull)?
        {
            Manifest::Index(index) => index,
            Manifest::Image(_) => return Err(invalid("it is a single manifest, not an index of platforms".to_owned())),
        };
    let entry = choose_platform(&index, device).map_err(|offered| BuildError::NoPlatform {
        build: name.clone(),
        device: device.label(),
        os_arch: format!("{}/{}{}", device.os, device.architecture, if device.nvidia_gpu { "/cuda" } else { "" }),
        offered,
    })?;
    tracing::info!(build = %shown, platform = %entry_label(entry), "Chose the runtime build's platform entry.");
    let manifest: ImageManifest =
        match crate::pull::for_builds::fetch_manifest(registry, store, source, &entry.digest, "runtime build manifest")
            .await
            .map_err(pull)?
        {
            Manifest::Image(m) => m,
            Manifest::Index(_) => return Err(invalid(format!("entry {} is an index", short(&entry.digest)))),
        };
    let layers: Vec<&Descriptor> =
        manifest.layers.iter().filter(|l| l.media_type == MEDIA_TYPE_RUNTIME_BUILD_TAR).collect();
    let [layer] = layers.as_slice() else {
        return Err(invalid(format!(
            "entry {} has {} layers of type {MEDIA_TYPE_RUNTIME_BUILD_TAR}; a build has exactly one",
            short(&entry.digest),
            layers.len()
        )));
    };
    if manifest.config.media_type != MEDIA_TYPE_RUNTIME_BUILD_CONFIG || manifest.config.size > MAX_CONFIG_BYTES {
        return Err(invalid(format!("entry {} has no runtime build config", short(&entry.digest))));
    }
    let mut pace = options.bandwidth.map(crate::pull::Pace::new);
    let total = manifest.config.size.saturating_add(layer.size);
    let mut done = 0u64;
    let mut last_report: Option<std::time::Instant> = None;
    for d in [&manifest.config, *layer] {
        match store.verified(&d.digest, d.size).await.map_err(|e| pull(PullErrorKind::Store(e)))? {
            true => store.touch(&d.digest).await,
            false => {
                // The tar and its extracted copy.
                crate::pull::for_builds::check_disk(builds_dir, d.size.saturating_mul(2), options.disk_reserve)
                    .await
                    .map_err(pull)?;
                let mut report = |n: u64| {
                    // At most once per PROGRESS_INTERVAL, like bundle layers.
                    if last_report.is_none_or(|t| t.elapsed() >= crate::pull::PROGRESS_INTERVAL) {
                        last_report = Some(std::time::Instant::now());
                        progress(PullProgress { bytes_done: done.saturating_add(n), bytes_total: total });
                    }
                };
                crate::pull::for_builds::fetch_blob(registry, store, source, d, &mut pace, &mut report)
                    .await
                    .map_err(pull)?;
            }
        }
        done = done.saturating_add(d.size);
    }
    progress(PullProgress { bytes_done: total, bytes_total: total });
    store.touch(&source.digest).await;
    store.touch(&entry.digest).await;
    let blob = store.path(&layer.digest);
    let (dir, digest) = (builds_dir.to_owned(), layer.digest.clone());
    let installed = tokio::task::spawn_blocking(move || install(&blob, &dir, &digest))
        .await
        .map_err(|join| ExtractError::Io(std::io::Error::other(join)));
    match installed.and_then(|r| r) {
        Ok(server) => Ok(server),
        Err(ExtractError::Archive(problem)) => {
            Err(BuildError::Archive { build: name.clone(), layer: layer.digest.clone(), problem })
        }
        Err(ExtractError::Io(source)) => {
            Err(BuildError::Io { build: name.clone(), dir: builds_dir.join(layer.digest.hex()), source })
        }
    }
}

/// The blobs of the runtime build a variant manifest's runtime layer names, as far as they are stored: the
/// index, every stored platform manifest and their config and layers. Kept with the deployment.
pub async fn blobs_named_by(store: &ContentStore, variant: &ImageManifest) -> HashSet<Digest> {
    let mut keep = HashSet::new();
    let Some(layer) = runtime_layer(variant) else { return keep };
    let Some(bytes) = read_small(store, &layer.digest, 64 << 10).await else { return keep };
    let Ok(defaults) = serde_json::from_slice::<RuntimeDefaults>(&bytes) else { return keep };
    let Some(Ok((_, _, index_digest))) = defaults.runtime_build.as_deref().map(parse_runtime_build) else {
        return keep;
    };
    let Some(bytes) = read_small(store, &index_digest, MAX_MANIFEST_BYTES as u64).await else { return keep };
    keep.insert(index_digest);
    let Ok(Manifest::Index(index)) = Manifest::parse(&bytes, None) else { return keep };
    for entry in &index.manifests {
        let Some(bytes) = read_small(store, &entry.digest, MAX_MANIFEST_BYTES as u64).await else { continue };
        keep.insert(entry.digest.clone());
        if let Ok(Manifest::Image(m)) = Manifest::parse(&bytes, None) {
            keep.extend(std::iter::once(&m.config).chain(&m.layers).map(|d| d.digest.clone()));
        }
    }
    keep
}

async fn read_small(store: &ContentStore, digest: &Digest, limit: u64) -> Option<Vec<u8>> {
    if store.size(digest).await? > limit {
        return None;
    }
    tokio::fs::read(store.path(digest)).await.ok()
}

/// Removes extracted builds whose layer is not in `keep` (the blobs of the active and previous deployments),
/// and leftovers of interrupted extractions; directories changed within [`PRUNE_GRACE`] stay (a pull in
/// progress may be about to start one). Best effort.
pub async fn prune(builds_dir: &Path, keep: &HashSet<Digest>) {
    let Ok(mut entries) = tokio::fs::read_dir(builds_dir).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let hex = name.strip_prefix(".tmp-").and_then(|r| r.split('-').next()).unwrap_or(&name);
        if keep.iter().any(|d| d.hex() == hex) {
            continue;
        }
        let recent = entry
            .metadata()
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < PRUNE_GRACE);
        if recent {
            continue;
        }
        match tokio::fs::remove_dir_all(entry.path()).await {
            Ok(()) => tracing::info!(dir = %entry.path().display(), "Removed an unused runtime build."),
            Err(e) => {
                tracing::warn!(dir = %entry.path().display(), error = %e, "Cannot remove an unused runtime build.")
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
        DevicePlatform { os: "linux".into(), architecture: arch.into(), nvidia_gpu: gpu }
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

    /// An archive built entry by entry, with whatever paths and types a hostile packer writes.
    fn archive(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data, link) in entries {
            let mut header = tar::Header::new_gnu();
            // Raw name bytes: `set_path` itself refuses `..` and absolute paths.
            let name = path.as_bytes();
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o4755);
            if let Some(link) = link {
                let l = link.as_bytes();
                header.as_old_mut().linkname[..l.len()].copy_from_slice(l);
            }
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};

    #[tokio::test]
    async fn a_deployment_keeps_the_blobs_of_the_build_it_names_and_prune_keeps_only_those() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(&dir.path().join("content")).expect("store");
        let put = |bytes: Vec<u8>| {
            let store = store.clone();
            async move {
                let d = Digest::of(&bytes);
                store.write_bytes(&d, &bytes).await.expect("put");
                d
            }
        };
        let layer = put(b"tar bytes".to_vec()).await;
        let config = put(b"{}".to_vec()).await;
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            config: Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_CONFIG, config.clone(), 2),
            layers: vec![Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_TAR, layer.clone(), 9)],
            subject: None,
            annotations: Default::default(),
        };
        let manifest_digest = put(serde_json::to_vec(&manifest).expect("json")).await;
        let mut e = entry("linux", "amd64", "cpu");
        e.digest = manifest_digest.clone();
        let index_digest =
            put(serde_json::to_vec(&index(vec![e, entry("linux", "arm64", "cpu")])).expect("json")).await;
        let runtime = RuntimeDefaults {
            runtime_build: Some(format!("reg:5000/acme/llama@{index_digest}")),
            ..RuntimeDefaults::default()
        };
        let runtime_bytes = serde_json::to_vec(&runtime).expect("json");
        let runtime_digest = put(runtime_bytes.clone()).await;
        let variant = ImageManifest {
            layers: vec![Descriptor::new(
                alki_shared::bundle::MEDIA_TYPE_RUNTIME,
                runtime_digest,
                runtime_bytes.len() as u64,
            )],
            ..manifest.clone()
        };
        let kept = blobs_named_by(&store, &variant).await;
        let expected: HashSet<Digest> = [index_digest, manifest_digest, config, layer.clone()].into();
        assert_eq!(kept, expected, "the arm64 entry is not stored and not named");
        assert!(blobs_named_by(&store, &ImageManifest { layers: vec![], ..manifest }).await.is_empty());

        let builds = dir.path().join("builds");
        let old = std::time::SystemTime::now() - 2 * PRUNE_GRACE;
        for name in [layer.hex().to_owned(), "f".repeat(64), "e".repeat(64)] {
            std::fs::create_dir_all(builds.join(&name)).expect("mkdir");
            if name != "e".repeat(64) {
                std::fs::File::open(builds.join(&name)).expect("open").set_modified(old).expect("age it");
            }
        }
        prune(&builds, &kept).await;
        let mut left: Vec<String> = std::fs::read_dir(&builds)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["e".repeat(64), layer.hex().to_owned()], "kept, and recent (a pull may start it): stay");
    }

    #[test]
    fn a_good_build_extracts_with_links_and_safe_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = archive(&[
            ("llama-server", Regular, b"#!/bin/sh\n", None),
            ("lib", Directory, b"", None),
            ("lib/libllama.so.0", Regular, b"ELF", None),
            ("libllama.so", Symlink, b"", Some("lib/libllama.so.0")),
            ("./sub/deeper/x", Regular, b"x", None),
        ]);
        let blob = dir.path().join("blob");
        std::fs::write(&blob, &bytes).expect("write");
        let layer = Digest::of(&bytes);
        let server = install(&blob, &dir.path().join("builds"), &layer).expect("install");
        assert_eq!(server, dir.path().join("builds").join(layer.hex()).join("llama-server"));
        let mode = std::fs::metadata(&server).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "setuid dropped");
        assert_eq!(std::fs::read(server.with_file_name("libllama.so")).expect("through link"), b"ELF");
        // Installed once: a second call reuses it.
        assert_eq!(install(&blob, &dir.path().join("builds"), &layer).expect("again"), server);
    }

    #[test]
    fn hostile_archives_are_refused_and_leave_nothing() {
        type Case = (&'static str, Vec<u8>, fn(&ArchiveProblem) -> bool);
        let cases: Vec<Case> = vec![
            ("absolute", archive(&[("/etc/evil", Regular, b"x", None)]), |p| matches!(p, ArchiveProblem::Absolute(_))),
            ("dotdot", archive(&[("../evil", Regular, b"x", None)]), |p| matches!(p, ArchiveProblem::Traversal(_))),
            ("inner dotdot", archive(&[("a/../../evil", Regular, b"x", None)]), |p| {
                matches!(p, ArchiveProblem::Traversal(_))
            }),
            ("absolute link", archive(&[("l", Symlink, b"", Some("/etc"))]), |p| {
                matches!(p, ArchiveProblem::LinkEscapes { .. })
            }),
            ("link up", archive(&[("l", Symlink, b"", Some("../outside"))]), |p| {
                matches!(p, ArchiveProblem::LinkEscapes { .. })
            }),
            (
                "write through a link",
                archive(&[
                    ("d", Symlink, b"", Some("sub")),
                    ("sub", Directory, b"", None),
                    ("d/x", Regular, b"x", None),
                ]),
                |p| matches!(p, ArchiveProblem::ThroughLink(_)),
            ),
            ("hard link", archive(&[("h", Link, b"", Some("/etc/shadow"))]), |p| {
                matches!(p, ArchiveProblem::HardLink(_))
            }),
            ("char device", archive(&[("c", Char, b"", None)]), |p| matches!(p, ArchiveProblem::Special { .. })),
            ("block device", archive(&[("b", Block, b"", None)]), |p| matches!(p, ArchiveProblem::Special { .. })),
            ("fifo", archive(&[("f", Fifo, b"", None)]), |p| matches!(p, ArchiveProblem::Special { .. })),
            (
                "duplicate",
                archive(&[("llama-server", Regular, b"a", None), ("llama-server", Regular, b"b", None)]),
                |p| matches!(p, ArchiveProblem::Duplicate(_)),
            ),
            ("no server", archive(&[("README", Regular, b"x", None)]), |p| matches!(p, ArchiveProblem::NoServer)),
            ("not executable", archive(&[("llama-server", Regular, b"x", None)]), |p| {
                matches!(p, ArchiveProblem::NoServer)
            }),
        ];
        for (name, bytes, expected) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let blob = dir.path().join("blob");
            let mut bytes = bytes;
            if name == "not executable" {
                // Mode 0o644 in the one header.
                let mut h = tar::Header::from_byte_slice(&bytes[..512]).clone();
                h.set_mode(0o644);
                h.set_cksum();
                bytes[..512].copy_from_slice(h.as_bytes());
            }
            std::fs::write(&blob, &bytes).expect("write");
            let builds = dir.path().join("builds");
            match install(&blob, &builds, &Digest::of(&bytes)) {
                Err(ExtractError::Archive(problem)) => assert!(expected(&problem), "{name}: {problem}"),
                Err(ExtractError::Io(e)) => panic!("{name}: I/O error instead of a refusal: {e}"),
                Ok(path) => panic!("{name}: accepted as {}", path.display()),
            }
            let left: Vec<_> = std::fs::read_dir(&builds).expect("builds dir").collect();
            assert!(left.is_empty(), "{name}: nothing left behind");
            assert!(!dir.path().join("evil").exists() && !Path::new("/etc/evil").exists(), "{name}");
        }
    }
}
