//! Config reload without a restart: the config file's directory is watched (`notify`), the file is read
//! again when it changes, and a valid config is published to the device loop and the session. An invalid
//! one is rejected with the reason (logged, and kept in [`ConfigState::last_error`]) while the last good
//! config stays in force. Fields that need a restart (ids, paths, addresses) are reported, not applied.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError};

/// Editors write a file in several steps; changes closer together than this are read once.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The config in force and what the last reload attempt said.
#[derive(Clone, Debug)]
pub struct ConfigState {
    pub config: Arc<Config>,
    /// Reloads applied since the agent started.
    pub applied: u64,
    /// Why the newest version of the file was rejected; None once a valid one is applied.
    pub last_error: Option<String>,
}

/// Watches `path`; returns the receiver of config states and the watcher (dropping it stops watching).
pub fn watch_config(
    path: PathBuf,
    initial: Config,
    mut stop: watch::Receiver<bool>,
) -> Result<(watch::Receiver<ConfigState>, tokio::task::JoinHandle<()>), notify::Error> {
    let (state_tx, state_rx) = watch::channel(ConfigState { config: Arc::new(initial), applied: 0, last_error: None });
    // What the file says now, before watching: a change made from here on is seen as a change.
    let mut last_text = std::fs::read_to_string(&path).ok();
    // Capacity 1: a pending signal already means "read the file again".
    let (signal_tx, mut signal_rx) = mpsc::channel::<()>(1);
    let name = path.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included) are not changes.
        let relevant = match &event {
            Ok(e) => {
                !matches!(e.kind, notify::EventKind::Access(_))
                    && e.paths.iter().any(|p| p.file_name() == name.as_deref())
            }
            Err(_) => true,
        };
        if relevant {
            let _ = signal_tx.try_send(());
        }
    })?;
    // The directory, not the file: editors and config managers replace the file by renaming a new one.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let task = tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                signal = signal_rx.recv() => if signal.is_none() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            tokio::time::sleep(DEBOUNCE).await;
            while signal_rx.try_recv().is_ok() {}
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) => {
                    // Between a delete and a rename the file can be missing for a moment; the next event retries.
                    tracing::debug!(file = %path.display(), error = %e, "Config file not readable right now.");
                    continue;
                }
            };
            if last_text.as_deref() == Some(text.as_str()) {
                continue;
            }
            last_text = Some(text.clone());
            let current = state_tx.borrow().config.clone();
            match Config::from_toml(&text) {
                Ok(next) => {
                    for field in restart_only_changes(&current, &next) {
                        tracing::warn!(field, "This config change takes effect after the agent restarts.");
                    }
                    tracing::info!(file = %path.display(), "Config reloaded.");
                    state_tx.send_modify(|s| {
                        s.config = Arc::new(next);
                        s.applied += 1;
                        s.last_error = None;
                    });
                }
                Err(e) => {
                    let e = match e {
                        ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.clone(), source },
                        other => other,
                    };
                    tracing::error!(error = %e, "The changed config file is invalid; the last good config stays in force.");
                    state_tx.send_modify(|s| s.last_error = Some(e.to_string()));
                }
            }
        }
    });
    Ok((state_rx, task))
}

/// Fields whose change needs a restart (identity, paths, listeners, the controller).
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.device_id != new.device_id {
        changed.push("device_id");
    }
    if old.data_dir != new.data_dir {
        changed.push("data_dir");
    }
    if old.controller.url != new.controller.url {
        changed.push("controller.url");
    }
    if old.controller.token_file != new.controller.token_file {
        changed.push("controller.token_file");
    }
    if old.runtime.front_addr != new.runtime.front_addr {
        changed.push("runtime.front_addr");
    }
    let r = (&old.runtime, &new.runtime);
    if (&r.0.api_keys_file, r.0.requests_per_minute_per_client, r.0.max_body_mib)
        != (&r.1.api_keys_file, r.1.requests_per_minute_per_client, r.1.max_body_mib)
        || (r.0.max_connections, r.0.header_read_timeout_secs) != (r.1.max_connections, r.1.header_read_timeout_secs)
    {
        // The keys file's content is read again by itself; which file, and the port's bounds, need a restart.
        changed.push("runtime front port admission");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "data_dir = \"/d\"\n[controller]\nurl = \"http://c:1\"\ninsecure_plaintext = true\ntoken_file = \"/t\"\n[runtime]\nllama_server = \"/l\"\n";

    #[test]
    fn restart_only_fields_are_named() {
        let old = Config::from_toml(BASE).expect("base");
        let new = Config::from_toml(&BASE.replace("http://c:1", "http://c:2")).expect("new");
        assert_eq!(restart_only_changes(&old, &new), vec!["controller.url"]);
        let labels = Config::from_toml(&format!("labels = {{ a = \"b\" }}\n{BASE}")).expect("labels");
        assert!(restart_only_changes(&old, &labels).is_empty());
    }

    async fn until(rx: &mut watch::Receiver<ConfigState>, what: impl Fn(&ConfigState) -> bool) -> ConfigState {
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| what(s)))
            .await
            .expect("in time")
            .expect("watcher alive")
            .clone()
    }

    #[tokio::test]
    async fn a_valid_change_is_applied_and_an_invalid_one_rejected_keeping_the_last_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, BASE).expect("write");
        let (_stop_tx, stop) = watch::channel(false);
        let (mut rx, _task) = watch_config(path.clone(), Config::from_toml(BASE).expect("base"), stop).expect("watch");

        // Replaced by rename, as config managers do.
        let next = dir.path().join("agent.toml.new");
        std::fs::write(&next, format!("{BASE}gap_wait_secs = 7\n")).expect("write");
        std::fs::rename(&next, &path).expect("rename");
        let state = until(&mut rx, |s| s.applied == 1).await;
        assert_eq!(state.config.runtime.gap_wait_secs, 7);

        std::fs::write(&path, format!("{BASE}gap_wait_secs = 0\n")).expect("write");
        let state = until(&mut rx, |s| s.last_error.is_some()).await;
        assert!(state.last_error.as_deref().unwrap_or_default().contains("runtime.gap_wait_secs"), "{state:?}");
        assert_eq!(state.config.runtime.gap_wait_secs, 7, "the last good config stays");

        std::fs::write(&path, format!("{BASE}gap_wait_secs = 9\n")).expect("write");
        let state = until(&mut rx, |s| s.applied == 2).await;
        assert_eq!((state.config.runtime.gap_wait_secs, state.last_error), (9, None));
    }
}
