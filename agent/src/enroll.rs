//! Enrollment: the device generates its key, sends a CSR with a bootstrap token, its labels and inventory,
//! and stores the certificate the controller signs. Run by `alki-agent enroll` or, on a start without a
//! certificate, from `controller.bootstrap_token_file`.

use std::path::Path;
use std::time::Duration;

use alki_shared::ids::DeviceId;
use alki_shared::proto;

use crate::Config;
use crate::identity::{IdentityError, IdentityFiles, connect, csr};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// What enrollment gave the device.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub device_id: String,
    pub expires_unix_ms: i64,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Enrolls `device_id` with the bootstrap token in `token_file`.
pub async fn enroll_with_file(
    config: &Config,
    device_id: &DeviceId,
    token_file: &Path,
) -> Result<Enrolled, IdentityError> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|source| IdentityError::Read { path: token_file.to_owned(), source })?;
    enroll(config, device_id, token.trim()).await
}

/// Generates (or reuses) the device key, sends the CSR with `token`, and stores the certificate and CA.
pub async fn enroll(config: &Config, device_id: &DeviceId, token: &str) -> Result<Enrolled, IdentityError> {
    let files = IdentityFiles::of(config);
    let key = files.load_or_create_key()?;
    let csr_pem = csr(&key, device_id.as_str())?;
    let (data_dir, labels) = (config.data_dir.clone(), config.labels.clone());
    let inventory = tokio::task::spawn_blocking(move || crate::inventory::collect(&data_dir, &labels)).await.ok();
    let channel = connect(config, None).await?;
    let mut client = proto::enrollment_service_client::EnrollmentServiceClient::new(channel);
    let request = proto::EnrollRequest {
        bootstrap_token: token.to_owned(),
        csr_pem,
        device_id: device_id.to_string(),
        labels: config.labels.clone().into_iter().collect(),
        inventory,
    };
    let response = tokio::time::timeout(ENROLL_TIMEOUT, client.enroll(request))
        .await
        .map_err(|_| IdentityError::Timeout(ENROLL_TIMEOUT))?
        .map_err(IdentityError::Refused)?
        .into_inner();
    files.store(&response.certificate_pem, &response.ca_certificate_pem)?;
    tracing::info!(device_id = %response.device_id, "Enrolled with the controller; sessions now use mTLS.");
    Ok(Enrolled {
        device_id: response.device_id,
        expires_unix_ms: response.expires_unix_ms,
        labels: response.labels.into_iter().collect(),
    })
}

/// Before a session: enrolls from `controller.bootstrap_token_file` when the device has no certificate yet.
pub async fn ensure_enrolled(config: &Config, device_id: &DeviceId) -> Result<(), IdentityError> {
    let files = IdentityFiles::of(config);
    if files.is_enrolled() {
        return Ok(());
    }
    match &config.controller.bootstrap_token_file {
        Some(token_file) => enroll_with_file(config, device_id, token_file).await.map(|_| ()),
        None => Err(IdentityError::NotEnrolled(files.dir)),
    }
}

/// The device id enrollment asks for: the configured one, else the one in the state file, else a new one
/// (saved, so the agent starts with the id its certificate names).
pub fn device_id(config: &Config) -> anyhow::Result<DeviceId> {
    if let Some(id) = &config.device_id {
        return DeviceId::new(id.clone()).map_err(|e| anyhow::anyhow!("config field `device_id`: {e}"));
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let state_file = crate::state::StateFile::new(&config.data_dir);
    if let Some(state) = state_file.load()? {
        return Ok(state.device_id);
    }
    let state = crate::state::AgentState::new(DeviceId::generate());
    state_file.save(&state)?;
    Ok(state.device_id)
}
