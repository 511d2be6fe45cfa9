//! Why acquiring content failed: one error type for the whole pull layer (registry, signature, manifests,
//! blobs, disk, materialising, runtime builds), for people (`Display` says what happened to what and what to
//! do) and for the controller ([`PullError::code`], [`PullError::activation_error`]).
//!
//! Errors are made bare where they happen; [`PullError::Bundle`] and [`PullError::RuntimeBuild`] then say
//! which artifact they are about, once, at the edge of the pull that knows it.

use std::path::PathBuf;

use alki_shared::digest::Digest;
use alki_shared::oci::ManifestError;
use alki_shared::proto::{self, ErrorCode};
use alki_shared::signing::SignatureProblem;
use oci_client::errors::OciDistributionError;

use crate::reference::short;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Context: the failure is about this bundle.
    #[error("bundle {bundle}: {source}")]
    Bundle { bundle: String, source: Box<PullError> },
    /// Context: the failure is about the llama.cpp build a bundle's runtime layer names.
    #[error("runtime build {build}: {source}")]
    RuntimeBuild { build: String, source: Box<PullError> },
    #[error(
        "cannot fetch {what} from registry {registry}: {source}; check that the registry is reachable from this \
         device, that the {} was pushed there, and the agent's token", pushed.noun()
    )]
    Registry { what: String, registry: String, source: Box<OciDistributionError>, pushed: Pushed },
    #[error(
        "{what} {} does not match its digest (got {actual}); the registry copy is corrupt — {}",
        short(expected), pushed.push_again()
    )]
    ManifestDigest { what: String, expected: Digest, actual: String, pushed: Pushed },
    #[error(
        "{what} {} is not a valid OCI manifest ({source}); push a bundle made by alkictl bundle pack",
        short(digest)
    )]
    Manifest { what: String, digest: Digest, source: ManifestError },
    #[error("{0}; push a bundle made by alkictl bundle pack")]
    NotABundle(String),
    /// An artifact other than a bundle (an eval suite) refused by what its manifest says; the text says
    /// what and how to fix it.
    #[error("{0}")]
    Unusable(String),
    #[error(
        "no variant fits in the {} of memory available (variants need: {needs}); free memory or add a smaller \
         quantization to the bundle", human_bytes(*available)
    )]
    NoVariantFits { available: u64, needs: String },
    #[error(
        "layer {layer} does not match its digest (got {actual}); the registry copy is corrupt — {}",
        pushed.push_again()
    )]
    LayerDigest { layer: Digest, actual: Digest, pushed: Pushed },
    #[error(
        "layer {} is {actual}{} bytes but its descriptor says {expected}; the registry copy is corrupt — {}",
        short(layer), if *more { " or more" } else { "" }, pushed.push_again()
    )]
    LayerSize { layer: Digest, expected: u64, actual: u64, more: bool, pushed: Pushed },
    #[error("layer {} has no safe file name ({name:?}); repack the bundle with plain file names", short(layer))]
    BadFileName { layer: Digest, name: String },
    #[error("runtime layer {} is not valid: {reason}; repack the bundle with alkictl bundle pack", short(layer))]
    RuntimeLayer { layer: Digest, reason: String },
    #[error(
        "needs {} more on the disk of {} plus a reserve of {} but only {} is free after evicting unused \
         bundles; free disk space, lower store.disk_reserve_mib or use a smaller bundle",
        human_bytes(*needed), dir.display(), human_bytes(*reserve), human_bytes(*available)
    )]
    DiskFull { needed: u64, reserve: u64, available: u64, dir: PathBuf },
    #[error(
        "the download of layer {} from registry {registry} broke off with {bytes_on_disk} of {size} bytes on \
         disk ({source}); they are kept and the next attempt resumes from there; check the device's network",
        short(layer)
    )]
    Transfer { layer: Digest, registry: String, bytes_on_disk: u64, size: u64, source: std::io::Error },
    #[error("{problem} ({policy})")]
    Signature { problem: SignatureProblem, policy: String },
    #[error(
        "variant {} claims {claimed} bytes of weights but its GGUF layers hold {actual}; the bundle is not what \
         it says — repack it with alkictl bundle pack",
        short(variant)
    )]
    VariantSize { variant: Digest, claimed: u64, actual: u64 },
    #[error("local content store: {0}; check that the data_dir is writable and has free space")]
    Store(StoreError),
    #[error(
        "disk full: writing layer {} failed after {written} bytes ({error}); the partial download was removed and \
         the model served before keeps serving; free space in the data_dir (or raise store.disk_reserve_mib so \
         such pulls are refused before they start)",
        short(layer)
    )]
    DiskFullWriting { layer: Digest, written: u64, error: StoreError },
    #[error("cannot create the bundle directory {}: {source}; check that the data_dir is writable", dir.display())]
    Materialise { dir: PathBuf, source: std::io::Error },
    /// The local check found something missing: the pull goes to the registry. Not shown unless the registry
    /// path is unavailable too.
    #[error("{0} is not in the local content store; the device needs the registry to fetch it")]
    NotInStore(String),
    /// A runtime build has no entry for this device's platform.
    #[error(
        "has no entry for this device ({device}); it has: {offered}; push one with \
         `alkictl runtime push --platform {os_arch}=DIR` or name another build in the bundle"
    )]
    NoPlatform { device: String, os_arch: String, offered: String },
    /// A runtime build that is not shaped like one.
    #[error("{0}; push it with `alkictl runtime push`")]
    NotABuild(String),
    /// A runtime build's archive is hostile or broken.
    #[error("layer {}: {problem}; the build is refused — repack it with `alkictl runtime push`", short(layer))]
    Archive { layer: Digest, problem: ArchiveProblem },
    #[error("cannot extract into {}: {source}; check that the data_dir is writable and has free space", dir.display())]
    Extract { dir: PathBuf, source: std::io::Error },
}

/// What kind of artifact a pull was for, so a failure says what to push again and how. Errors are made as
/// [`Pushed::Bundle`] where they happen; [`PullError::about_suite`] says otherwise at the edge that knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pushed {
    #[default]
    Bundle,
    EvalSuite,
}

impl Pushed {
    fn noun(self) -> &'static str {
        match self {
            Pushed::Bundle => "bundle",
            Pushed::EvalSuite => "eval suite",
        }
    }

    fn push_again(self) -> &'static str {
        match self {
            Pushed::Bundle => "push the bundle again",
            Pushed::EvalSuite => "push the suite again with alkictl eval push",
        }
    }
}

impl PullError {
    /// This error, about an eval suite: what to push again (and with what) names the suite, not a bundle.
    pub fn about_suite(mut self) -> PullError {
        self.set_pushed(Pushed::EvalSuite);
        self
    }

    fn set_pushed(&mut self, to: Pushed) {
        match self {
            PullError::Bundle { source, .. } | PullError::RuntimeBuild { source, .. } => source.set_pushed(to),
            PullError::Registry { pushed, .. }
            | PullError::ManifestDigest { pushed, .. }
            | PullError::LayerDigest { pushed, .. }
            | PullError::LayerSize { pushed, .. } => *pushed = to,
            _ => {}
        }
    }

    /// This error, said to be about `bundle`.
    pub fn about_bundle(self, bundle: impl std::fmt::Display) -> PullError {
        PullError::Bundle { bundle: bundle.to_string(), source: Box::new(self) }
    }

    /// This error, said to be about the runtime build `build`.
    pub fn about_build(self, build: impl std::fmt::Display) -> PullError {
        PullError::RuntimeBuild { build: build.to_string(), source: Box::new(self) }
    }

    /// The failure itself, under its context.
    fn cause(&self) -> &PullError {
        match self {
            PullError::Bundle { source, .. } | PullError::RuntimeBuild { source, .. } => source.cause(),
            other => other,
        }
    }

    /// The stable code reported to the controller.
    pub fn code(&self) -> ErrorCode {
        match self.cause() {
            PullError::Registry { source, .. } => match source.as_ref() {
                OciDistributionError::DigestError(_) => ErrorCode::DigestMismatch,
                _ => ErrorCode::PullFailed,
            },
            PullError::ManifestDigest { .. } | PullError::LayerDigest { .. } | PullError::LayerSize { .. } => {
                ErrorCode::DigestMismatch
            }
            PullError::Manifest { .. }
            | PullError::NotABundle(_)
            | PullError::Unusable(_)
            | PullError::BadFileName { .. }
            | PullError::RuntimeLayer { .. }
            | PullError::VariantSize { .. }
            | PullError::NotABuild(_)
            | PullError::Archive { .. } => ErrorCode::BundleInvalid,
            PullError::NoVariantFits { .. } | PullError::NoPlatform { .. } => ErrorCode::NoVariantFits,
            PullError::Signature { problem, .. } => problem.code(),
            PullError::DiskFull { .. } | PullError::DiskFullWriting { .. } => ErrorCode::DiskFull,
            PullError::Store(e) if e.is_disk_full() => ErrorCode::DiskFull,
            PullError::Extract { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => ErrorCode::DiskFull,
            PullError::Transfer { .. } | PullError::NotInStore(_) => ErrorCode::PullFailed,
            PullError::Store(_) | PullError::Materialise { .. } | PullError::Extract { .. } => ErrorCode::Io,
            // `cause` never returns a context.
            PullError::Bundle { .. } | PullError::RuntimeBuild { .. } => ErrorCode::Unspecified,
        }
    }

    /// True when another source (the next mirror, or the origin) may succeed where this one failed: the
    /// registry did not answer or answered wrongly, or its bytes did not verify. Not for problems of the
    /// bundle itself or of this device, which no other source changes, nor for a runtime build's failure
    /// (another source of the bundle does not change the build).
    pub fn may_try_another_source(&self) -> bool {
        match self {
            PullError::Bundle { source, .. } => source.may_try_another_source(),
            PullError::Registry { .. }
            | PullError::Transfer { .. }
            | PullError::ManifestDigest { .. }
            | PullError::LayerDigest { .. }
            | PullError::LayerSize { .. }
            // A mirror may lack the signature tag, or serve a stale one: the origin may have it.
            | PullError::Signature { .. } => true,
            _ => false,
        }
    }

    /// True when the source could not be reached or broke off (as opposed to answering with something wrong).
    pub fn is_unreachable(&self) -> bool {
        matches!(self.cause(), PullError::Registry { .. } | PullError::Transfer { .. })
    }

    /// The layer (or manifest) concerned, when there is one.
    pub fn layer_digest(&self) -> Option<&Digest> {
        match self.cause() {
            PullError::ManifestDigest { expected, .. } => Some(expected),
            PullError::Manifest { digest, .. } => Some(digest),
            PullError::VariantSize { variant: layer, .. }
            | PullError::LayerDigest { layer, .. }
            | PullError::LayerSize { layer, .. }
            | PullError::BadFileName { layer, .. }
            | PullError::RuntimeLayer { layer, .. }
            | PullError::Transfer { layer, .. }
            | PullError::DiskFullWriting { layer, .. }
            | PullError::Archive { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// The failure as the controller receives it in a status or a prestage report.
    pub fn activation_error(&self) -> proto::ActivationError {
        proto::ActivationError {
            code: self.code() as i32,
            message: self.to_string(),
            layer_digest: self.layer_digest().map(ToString::to_string).unwrap_or_default(),
        }
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
    #[error("the archive has more than {0} entries")]
    TooMany(usize),
    #[error("the archive has no executable `llama-server` at its top")]
    NoServer,
    #[error("the archive is malformed: {0}")]
    Malformed(String),
}

/// `1.5 GiB`, `600 MiB`, `12 KiB`, `10 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_codes_and_layer_digests_and_say_what_to_do() {
        let layer = Digest::of(b"expected");
        let err =
            PullError::LayerDigest { layer: layer.clone(), actual: Digest::of(b"actual"), pushed: Pushed::Bundle }
                .about_bundle("acme/qwen@sha256:ab12…");
        assert_eq!(err.code(), ErrorCode::DigestMismatch);
        assert_eq!(err.layer_digest(), Some(&layer));
        let text = err.to_string();
        assert!(text.starts_with("bundle acme/qwen@sha256:ab12…: layer sha256:"), "{text}");
        assert!(text.contains("push the bundle again"), "{text}");
        let reported = err.activation_error();
        assert_eq!(reported.code, ErrorCode::DigestMismatch as i32);
        assert_eq!((reported.message, reported.layer_digest), (text, layer.to_string()));
        let full = PullError::DiskFull {
            needed: 3 << 30,
            reserve: 512 << 20,
            available: 1 << 30,
            dir: PathBuf::from("/data"),
        }
        .about_bundle("b");
        assert_eq!(full.code(), ErrorCode::DiskFull);
        assert!(full.to_string().contains("3.0 GiB"), "{full}");
    }

    #[test]
    fn a_corrupt_eval_suite_says_to_push_the_suite_again_not_a_bundle() {
        let layer = Digest::of(b"corpus");
        let corrupt = [
            PullError::LayerDigest { layer: layer.clone(), actual: Digest::of(b"x"), pushed: Pushed::Bundle },
            PullError::LayerSize { layer: layer.clone(), expected: 1, actual: 2, more: false, pushed: Pushed::Bundle },
            PullError::ManifestDigest {
                what: "manifest".to_owned(),
                expected: layer.clone(),
                actual: "sha256:00".to_owned(),
                pushed: Pushed::Bundle,
            },
        ];
        for error in corrupt {
            assert!(error.to_string().contains("push the bundle again"), "{error}");
            let text = error.about_suite().to_string();
            assert!(
                text.contains("the registry copy is corrupt — push the suite again with alkictl eval push"),
                "{text}"
            );
            assert!(!text.contains("bundle"), "{text}");
        }
        let unreachable = PullError::Registry {
            what: "manifest".to_owned(),
            registry: "r".to_owned(),
            source: Box::new(OciDistributionError::GenericError(None)),
            pushed: Pushed::Bundle,
        };
        let text = unreachable.about_suite().to_string();
        assert!(text.contains("that the eval suite was pushed there"), "{text}");
    }

    #[test]
    fn a_runtime_build_failure_names_bundle_and_build_and_keeps_its_code() {
        let err = PullError::NoPlatform {
            device: "linux/riscv64".to_owned(),
            os_arch: "linux/riscv64".to_owned(),
            offered: "linux/amd64".to_owned(),
        }
        .about_build("reg:5000/acme/llama@sha256:aa")
        .about_bundle("acme/tiny@sha256:bb");
        assert_eq!(err.code(), ErrorCode::NoVariantFits);
        let text = err.to_string();
        assert!(
            text.starts_with("bundle acme/tiny@sha256:bb: runtime build reg:5000/acme/llama@sha256:aa: has no entry"),
            "{text}"
        );
        let layer = Digest::of(b"tar");
        let refused = PullError::LayerDigest { layer: layer.clone(), actual: Digest::of(b"x"), pushed: Pushed::Bundle }
            .about_build("b");
        assert!(!refused.may_try_another_source(), "another bundle source does not change the build");
        assert_eq!(refused.layer_digest(), Some(&layer));
    }

    #[test]
    fn only_source_failures_fall_back_to_the_next_source() {
        let layer = Digest::of(b"l");
        let source_failures = [
            PullError::Registry {
                what: "m".to_owned(),
                registry: "r".to_owned(),
                source: Box::new(OciDistributionError::GenericError(None)),
                pushed: Pushed::Bundle,
            },
            PullError::LayerDigest { layer: layer.clone(), actual: Digest::of(b"other"), pushed: Pushed::Bundle },
            PullError::LayerSize { layer: layer.clone(), expected: 1, actual: 2, more: true, pushed: Pushed::Bundle },
            PullError::ManifestDigest {
                what: "m".to_owned(),
                expected: layer.clone(),
                actual: "x".to_owned(),
                pushed: Pushed::Bundle,
            },
            PullError::Transfer {
                layer: layer.clone(),
                registry: "r".to_owned(),
                bytes_on_disk: 0,
                size: 1,
                source: std::io::Error::other("reset"),
            },
        ];
        for error in source_failures {
            assert!(error.about_bundle("b").may_try_another_source());
        }
        let final_failures = [
            PullError::NotABundle("no".to_owned()),
            PullError::NoVariantFits { available: 1, needs: "2".to_owned() },
            PullError::DiskFull { needed: 1, reserve: 1, available: 0, dir: PathBuf::from("/d") },
            PullError::BadFileName { layer, name: "../x".to_owned() },
        ];
        for error in final_failures {
            assert!(!error.about_bundle("b").may_try_another_source());
        }
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(600 << 20), "600.0 MiB");
    }
}
