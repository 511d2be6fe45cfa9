//! The agent's own log file, for remote diagnostics when the agent does not run under journald: a tracing
//! writer appending to `<data_dir>/logs/agent.log`, rotated once to `agent.log.1`, so both together stay
//! under the configured cap however long the agent runs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// The file name of the agent's log in its logs directory.
pub const AGENT_LOG: &str = "agent.log";

/// True when the agent's output goes to systemd's journal (the unit's stdout is a journal stream), where
/// `journalctl` reads it back; a log file would only duplicate it.
pub fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() && std::env::var_os("INVOCATION_ID").is_some()
}

/// The agent's log file and its one rotated predecessor. Cheap to clone; every clone writes the same file.
#[derive(Clone)]
pub struct CappedLog {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    path: PathBuf,
    /// Each file is rotated past half the cap, so the current and the rotated one hold at most the cap.
    rotate_at: u64,
    file: Option<File>,
    written: u64,
}

impl CappedLog {
    /// Opens (appending) `<logs_dir>/agent.log`, kept with `agent.log.1` under `cap_bytes` together.
    pub fn open(logs_dir: &Path, cap_bytes: u64) -> std::io::Result<CappedLog> {
        std::fs::create_dir_all(logs_dir)?;
        let path = logs_dir.join(AGENT_LOG);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        let inner = Inner { path, rotate_at: (cap_bytes / 2).max(4096), file: Some(file), written };
        Ok(CappedLog { inner: Arc::new(Mutex::new(inner)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Moves the full file to `.1` (replacing the older one) and starts an empty one. Failures leave the
    /// current file in use: a log writer has nowhere to report them.
    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        self.file = None;
        let _ = std::fs::rename(&self.path, &old);
        self.file = OpenOptions::new().create(true).append(true).truncate(false).open(&self.path).ok();
        self.written = self.file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
    }
}

/// One event's writer: the lock is taken per write call, never across an await (tracing writes are sync).
pub struct LogWriter(CappedLog);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut inner = self.0.lock();
        if inner.written >= inner.rotate_at {
            inner.rotate();
        }
        if let Some(file) = inner.file.as_mut() {
            file.write_all(buf)?;
        }
        inner.written = inner.written.saturating_add(buf.len() as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CappedLog {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_and_its_rotated_copy_stay_under_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = CappedLog::open(dir.path(), 16 * 1024).expect("open");
        let line = [b'x'; 100];
        for _ in 0..1000 {
            LogWriter(log.clone()).write_all(&line).expect("write");
        }
        let current = std::fs::metadata(dir.path().join(AGENT_LOG)).expect("log").len();
        let rotated = std::fs::metadata(dir.path().join("agent.log.1")).expect("rotated").len();
        assert!(current + rotated <= 16 * 1024 + 200, "{current} + {rotated} bytes");
    }
}
