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

/// What a state-changing call acts on, read from its request message, for the audit log (`rollout ro-1`,
/// `acme/qwen:v2`, `device pi-1`). `method` is the method's name or its full gRPC path
/// (`/alki.v1.FleetService/CreateRollout`); `message` the request's protobuf bytes. Empty for a method
/// that names nothing and for a message that does not decode: the audit entry then has no target.
pub fn audit_target(method: &str, message: &[u8]) -> String {
    use prost::Message as _;
    let method = method.rsplit('/').next().unwrap_or_default();
    let target = match method {
        "CreateRollout" => CreateRolloutRequest::decode(message)
            .ok()
            .and_then(|r| r.spec)
            .map(|s| format!("{}:{}", s.repository, s.candidate)),
        "PauseRollout" | "ResumeRollout" | "PromoteRollout" | "AbortRollout" | "RetryRollout" => {
            RolloutActionRequest::decode(message).ok().map(|r| format!("rollout {}", r.id))
        }
        "CreateToken" => CreateTokenRequest::decode(message).ok().map(|r| {
            let role = Role::try_from(r.role).unwrap_or_default();
            match r.repositories.as_slice() {
                [] => format!("token {} ({role:?})", r.name),
                repositories => format!("token {} ({role:?}) on {}", r.name, repositories.join(",")),
            }
        }),
        "RevokeToken" => RevokeTokenRequest::decode(message).ok().map(|r| format!("token {}", r.token)),
        "Enroll" => EnrollRequest::decode(message).ok().map(|r| format!("device {}", r.device_id)),
        "DecommissionDevice" => {
            DecommissionDeviceRequest::decode(message).ok().map(|r| format!("device {}", r.device_id))
        }
        "LabelDevice" => LabelDeviceRequest::decode(message).ok().map(|r| {
            let mut changes: Vec<String> = r.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
            changes.sort();
            changes.extend(r.remove.iter().map(|k| format!("{k}-")));
            format!("device {} {}", r.device_id, changes.join(","))
        }),
        "DeviceLogs" => DeviceLogsRequest::decode(message).ok().map(|r| {
            let source = if r.source.is_empty() { "all" } else { r.source.as_str() };
            format!("device {} logs {source}{}", r.device_id, if r.follow { " follow" } else { "" })
        }),
        "SupportBundle" => SupportBundleRequest::decode(message).ok().map(|r| format!("device {}", r.device_id)),
        "RestartRuntime" | "Reverify" => {
            DeviceCommandRequest::decode(message).ok().map(|r| format!("device {}", r.device_id))
        }
        "RevokeEnrollToken" => RevokeEnrollTokenRequest::decode(message).ok().map(|r| format!("enroll token {}", r.id)),
        _ => None,
    };
    target.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn audit_targets_name_what_a_call_acts_on() {
        let action = RolloutActionRequest { id: "ro-1".into(), ..Default::default() }.encode_to_vec();
        assert_eq!(audit_target("/alki.v1.FleetService/AbortRollout", &action), "rollout ro-1");
        let create = CreateRolloutRequest {
            spec: Some(RolloutSpec { repository: "acme/qwen".into(), candidate: "v2".into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(audit_target("CreateRollout", &create.encode_to_vec()), "acme/qwen:v2");
        let token = CreateTokenRequest { name: "ci".into(), role: Role::Push as i32, ..Default::default() };
        assert_eq!(audit_target("CreateToken", &token.encode_to_vec()), "token ci (Push)");
        assert_eq!(audit_target("ListDevices", &[]), "", "reads name nothing");
        let logs = DeviceLogsRequest { device_id: "pi-1".into(), follow: true, ..Default::default() };
        assert_eq!(
            audit_target("/alki.v1.DiagnosticsService/DeviceLogs", &logs.encode_to_vec()),
            "device pi-1 logs all follow"
        );
        let bundle = SupportBundleRequest { device_id: "pi-2".into(), ..Default::default() };
        assert_eq!(audit_target("SupportBundle", &bundle.encode_to_vec()), "device pi-2");
        assert_eq!(audit_target("RevokeToken", &[0xff, 0xff]), "", "a message that does not decode");
    }
}
