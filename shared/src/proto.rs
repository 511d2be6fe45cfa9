//! Generated protobuf and gRPC code for the `alki.v1` package, plus small conversions.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("alki.v1");

/// The encoded `FileDescriptorSet` of every `alki.v1` proto file: tests enumerate services and methods from it.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/alki_descriptor.bin"));

impl Phase {
    /// A lowercase name for tables and logs ("pulling", "active", ...).
    pub fn label(self) -> &'static str {
        match self {
            Phase::Unspecified => "unknown",
            Phase::Idle => "idle",
            Phase::Pulling => "pulling",
            Phase::Verifying => "verifying",
            Phase::Starting => "starting",
            Phase::Active => "active",
            Phase::Failed => "failed",
        }
    }
}

impl ErrorCode {
    /// The stable snake_case code operators and scripts match on ("digest_mismatch", ...).
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::Unspecified => "unspecified",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::PullFailed => "pull_failed",
            ErrorCode::BundleInvalid => "bundle_invalid",
            ErrorCode::NoVariantFits => "no_variant_fits",
            ErrorCode::StartFailed => "start_failed",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::Io => "io",
            ErrorCode::SignatureMissing => "signature_missing",
            ErrorCode::SignatureUntrusted => "signature_untrusted",
            ErrorCode::SignatureInvalid => "signature_invalid",
            ErrorCode::CrashLoop => "crash_loop",
        }
    }
}

impl RolloutState {
    pub fn label(self) -> &'static str {
        match self {
            RolloutState::Unspecified => "unknown",
            RolloutState::Pending => "pending",
            RolloutState::Progressing => "progressing",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
        }
    }
}

impl BundleRef {
    /// `registry/repository@digest`, or `repository@digest` for the embedded registry.
    pub fn display(&self) -> String {
        if self.registry.is_empty() {
            format!("{}@{}", self.repository, self.digest)
        } else {
            format!("{}/{}@{}", self.registry, self.repository, self.digest)
        }
    }
}
