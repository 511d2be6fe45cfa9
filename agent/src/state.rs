//! The agent's state: the small state file (`<data_dir>/state.json`: identity, what is active, what was
//! before, the last applied generation, and whether nothing is to be served), replaced atomically (fsynced)
//! so a crash leaves the old or the new file, and the [`Snapshot`] of it the device loop publishes to the
//! rest of the agent. The llama-server processes themselves are recorded beside it, in `runtime.json`
//! ([`crate::runtime::record`]).

use std::path::{Path, PathBuf};

use alki_shared::digest::Digest;
use alki_shared::fsutil::write_atomic;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::proto;
use serde::{Deserialize, Serialize};

use crate::reference::BundleLocation;
use crate::settings::{LaunchSettings, LaunchSpec, RuntimeOverrides};

const STATE_VERSION: u32 = 1;

/// Everything the agent remembers across restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// Format version of this file.
    pub version: u32,
    pub device_id: DeviceId,
    /// What the front port serves (started again at boot, before the controller is reached).
    pub active: Option<Deployment>,
    /// What was active before, kept for a quick rollback.
    pub previous: Option<Deployment>,
    /// The newest generation the agent has converged to, successfully or not.
    pub last_applied_generation: Generation,
    /// The controller asked for nothing to be served (`DesiredState.serve_nothing`): `active` is empty on
    /// purpose and the front port says no model is assigned, also after a restart.
    #[serde(default)]
    pub serve_nothing: bool,
}

/// A bundle variant materialised on disk and how it is run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub bundle: BundleLocation,
    /// Digest of the variant manifest chosen from the bundle's index.
    pub variant_digest: Digest,
    /// The GGUF files in `<data_dir>/bundles/<variant>/`; llama-server is given the first.
    pub model_files: Vec<PathBuf>,
    /// The controller's overrides this deployment was asked with (to recognise "already serving this").
    pub overrides: RuntimeOverrides,
    /// What llama-server is started with.
    pub launch: LaunchSettings,
    /// The desired-state generation that activated it.
    pub generation: Generation,
}

impl Deployment {
    /// The GGUF file passed to llama-server's `-m`.
    pub fn model_path(&self) -> Option<&Path> {
        self.model_files.first().map(PathBuf::as_path)
    }

    /// How llama-server runs this deployment; None without a model file.
    pub fn launch_spec(&self) -> Option<LaunchSpec> {
        Some(LaunchSpec {
            model_path: self.model_path()?.to_owned(),
            settings: self.launch.clone(),
            bundle_digest: self.bundle.digest.to_string(),
        })
    }
}

/// What the device runs now, as the device loop publishes it (a watch channel) for the session's Hello,
/// telemetry, benchmarks, the metrics endpoint and staging.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub running: Option<proto::BundleRef>,
    pub last_applied: Generation,
    /// The variant of `running` and its model file, for telemetry and benchmarks.
    pub variant_digest: String,
    pub model_path: Option<PathBuf>,
}

impl AgentState {
    pub fn new(device_id: DeviceId) -> AgentState {
        AgentState {
            version: STATE_VERSION,
            device_id,
            active: None,
            previous: None,
            last_applied_generation: Generation::default(),
            serve_nothing: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write state file {path}: {source}; check that the data_dir is writable and has free space")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is not valid ({source}); it was moved to {moved_to} and the agent starts afresh")]
    Corrupt { path: PathBuf, moved_to: PathBuf, source: serde_json::Error },
    #[error(
        "state file {path} has version {version}, newer than this agent understands ({STATE_VERSION}); upgrade the agent"
    )]
    TooNew { path: PathBuf, version: u32 },
}

/// The state file's location and the atomic replace.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(data_dir: &Path) -> StateFile {
        StateFile { path: data_dir.join("state.json") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state. `Ok(None)` when there is none yet. A file that cannot be parsed is moved aside
    /// (so the agent can start and the operator can look at it) and reported as [`StateError::Corrupt`].
    pub fn load(&self) -> Result<Option<AgentState>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path: self.path.clone(), source }),
        };
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        if let Ok(Version { version }) = serde_json::from_slice::<Version>(&bytes)
            && version > STATE_VERSION
        {
            return Err(StateError::TooNew { path: self.path.clone(), version });
        }
        match serde_json::from_slice::<AgentState>(&bytes) {
            Ok(state) => Ok(Some(state)),
            Err(source) => {
                let stamp = alki_shared::clock::UnixMs::now().as_millis() / 1000;
                let moved_to = self.path.with_extension(format!("json.corrupt-{stamp}"));
                std::fs::rename(&self.path, &moved_to)
                    .map_err(|source| StateError::Write { path: self.path.clone(), source })?;
                Err(StateError::Corrupt { path: self.path.clone(), moved_to, source })
            }
        }
    }

    /// Replaces the state file atomically and durably.
    pub fn save(&self, state: &AgentState) -> Result<(), StateError> {
        // Serialising plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
        write_atomic(&self.path, &bytes).map_err(|source| StateError::Write { path: self.path.clone(), source })
    }

    /// [`StateFile::save`] off the async runtime's threads (it fsyncs).
    pub async fn save_async(&self, state: &AgentState) -> Result<(), StateError> {
        let file = self.clone();
        let state = state.clone();
        match tokio::task::spawn_blocking(move || file.save(&state)).await {
            Ok(result) => result,
            Err(join) => Err(StateError::Write { path: self.path.clone(), source: std::io::Error::other(join) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn deployment(generation: u64) -> Deployment {
        Deployment {
            bundle: BundleLocation {
                registry: String::new(),
                repository: "acme/tiny".into(),
                digest: Digest::of(b"index"),
                tag: "v1".into(),
            },
            variant_digest: Digest::of(b"variant"),
            model_files: vec![PathBuf::from("/data/bundles/abc/model.gguf")],
            overrides: RuntimeOverrides { context_size: 1024, ..Default::default() },
            launch: LaunchSettings {
                context_size: 1024,
                threads: 0,
                gpu_layers: 0,
                parallel_slots: 1,
                chat_template: None,
                llama_server: None,
                runtime_platform: None,
            },
            generation: Generation(generation),
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().expect("no file is fine"), None);
        let mut state = AgentState::new(DeviceId::new("pi-1").expect("id"));
        state.active = Some(deployment(3));
        state.previous = Some(deployment(2));
        state.last_applied_generation = Generation(3);
        file.save(&state).expect("save");
        assert_eq!(file.load().expect("load"), Some(state.clone()));
        state.active = None;
        file.save(&state).expect("save again");
        assert_eq!(file.load().expect("load again"), Some(state));
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1, "no temporary files left");
    }

    #[test]
    fn a_corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path());
        std::fs::write(file.path(), b"{not json").expect("write");
        let err = file.load().expect_err("corrupt");
        let StateError::Corrupt { moved_to, .. } = err else { panic!("expected Corrupt, got {err}") };
        assert!(moved_to.exists());
        assert_eq!(file.load().expect("gone now"), None);
    }

    #[test]
    fn a_newer_format_is_refused_without_touching_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::new(dir.path());
        std::fs::write(file.path(), br#"{"version": 99}"#).expect("write");
        assert!(matches!(file.load(), Err(StateError::TooNew { version: 99, .. })));
        assert!(file.path().exists());
    }
}
