//! The record of the llama-server processes the agent runs (`<data_dir>/runtime.json`), so that a restarted
//! agent can find them again: adopt the one that serves (no restart, no dropped request) and stop the others.
//! A process is recognised by its pid *and* its start time (`/proc/<pid>/stat` field 22), so a pid the kernel
//! has given to another program since is never signalled; adoption also requires the same binary.
//! The file is replaced atomically and fsynced on every change (a few times per swap).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use alki_shared::fsutil::write_atomic;
use serde::{Deserialize, Serialize};

use crate::settings::{LaunchSettings, LaunchSpec};

const RECORD_VERSION: u32 = 1;

/// What a recorded process was doing when the record was last written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Loading and being proven; never adopted (its proof was cut short).
    Starting,
    /// Behind the front proxy: the one a restarted agent adopts.
    Serving,
    /// Out of rotation (kept for a rollback, draining, or stopping).
    Standby,
}

/// One llama-server process the agent started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Clock ticks after boot at which the process started (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// The binary it runs (`/proc/<pid>/exe` right after the start).
    pub exe: PathBuf,
    pub port: u16,
    pub model_path: PathBuf,
    pub settings: LaunchSettings,
    pub bundle_digest: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    pub role: Role,
}

impl ProcessRecord {
    /// The launch spec this process runs.
    pub fn spec(&self) -> LaunchSpec {
        LaunchSpec {
            model_path: self.model_path.clone(),
            settings: self.settings.clone(),
            bundle_digest: self.bundle_digest.clone(),
        }
    }

    /// True when `pid` still names this very process (same start time), whatever binary it runs now.
    pub fn is_same_process(&self) -> bool {
        process_identity(self.pid).is_some_and(|id| id.start_time == self.start_time)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RecordFile {
    version: u32,
    processes: Vec<ProcessRecord>,
}

/// A live process's identity as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub start_time: u64,
    /// `/proc/<pid>/exe`; ends with " (deleted)" when the binary was replaced since.
    pub exe: PathBuf,
}

/// The identity of `pid`, or None when no such process runs (exited, or a zombie waiting to be reaped).
pub fn process_identity(pid: u32) -> Option<ProcessIdentity> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (state, start_time) = parse_stat(&stat)?;
    if matches!(state, 'Z' | 'X' | 'x') {
        return None;
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    Some(ProcessIdentity { start_time, exe })
}

/// State and start time from a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) come fields 4..; start time is field 22, i.e. the 19th after the state.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// The record file, shared by the supervisor and its instances; every change is written through.
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    processes: Vec<ProcessRecord>,
}

impl Recorder {
    /// The record at `<data_dir>/runtime.json`, read now. An unreadable file is moved aside: its processes
    /// cannot be recognised, so they are left alone (the operator is told where the file went).
    pub fn open(data_dir: &Path) -> Recorder {
        let path = data_dir.join("runtime.json");
        let processes = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<RecordFile>(&bytes) {
                Ok(file) if file.version <= RECORD_VERSION => file.processes,
                Ok(file) => {
                    tracing::error!(file = %path.display(), version = file.version, "The runtime record is from a newer agent; its processes are left alone.");
                    Vec::new()
                }
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    let _ = std::fs::rename(&path, &aside);
                    tracing::error!(file = %path.display(), moved_to = %aside.display(), error = %e, "The runtime record is not valid; its processes are left alone.");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "Cannot read the runtime record.");
                Vec::new()
            }
        };
        Recorder { inner: Arc::new(Mutex::new(Inner { path, processes })) }
    }

    /// The processes recorded now.
    pub fn processes(&self) -> Vec<ProcessRecord> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).processes.clone()
    }

    /// Records a process just started (replacing any stale entry with its pid), or, with pid 0, one about to
    /// be started on `record.port` (see [`find_pending`]).
    pub fn add(&self, record: ProcessRecord) {
        self.update(|processes| {
            processes.retain(|p| p.pid != record.pid || (p.pid == 0 && p.port != record.port));
            processes.push(record);
        });
    }

    /// Forgets the entry of a process that was about to be started on `port`.
    pub fn remove_pending(&self, port: u16) {
        self.update(|processes| processes.retain(|p| !(p.pid == 0 && p.port == port)));
    }

    /// Changes what a recorded process does.
    pub fn set_role(&self, pid: u32, role: Role) {
        self.update(|processes| {
            for p in processes.iter_mut().filter(|p| p.pid == pid) {
                p.role = role;
            }
        });
    }

    /// Forgets a process that exited (or that is no longer ours).
    pub fn remove(&self, pid: u32) {
        self.update(|processes| processes.retain(|p| p.pid != pid));
    }

    /// Applies `change` and writes the file through (synchronously: a tiny file, written a few times per swap;
    /// the record must be on disk before the agent can die with the process unknown).
    fn update(&self, change: impl FnOnce(&mut Vec<ProcessRecord>)) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let before = inner.processes.clone();
        change(&mut inner.processes);
        if inner.processes == before {
            return;
        }
        let file = RecordFile { version: RECORD_VERSION, processes: inner.processes.clone() };
        // Serialising plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
        if let Err(e) = write_atomic(&inner.path, &bytes) {
            tracing::error!(file = %inner.path.display(), error = %e, "Cannot write the runtime record; a restarted agent may not find llama-server.");
        }
    }
}

/// For an entry written just before a fork (pid 0): the live process started from `record.exe` with
/// `record.model_path` on `record.port` (its command line says so), if one runs; the entry with its pid and
/// start time filled in. Loopback ports are unique among live processes, so this names one process.
pub fn find_pending(record: &ProcessRecord) -> Option<ProcessRecord> {
    let port = record.port.to_string();
    let model = record.model_path.to_string_lossy().into_owned();
    let entries = std::fs::read_dir("/proc").ok()?;
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let has =
            |flag: &str, value: &str| args.windows(2).any(|w| w[0] == flag.as_bytes() && w[1] == value.as_bytes());
        if !(has("--port", &port) && has("-m", &model)) {
            continue;
        }
        let Some(identity) = process_identity(pid) else { continue };
        let wanted = std::fs::canonicalize(&record.exe).unwrap_or_else(|_| record.exe.clone());
        if identity.exe == wanted {
            return Some(ProcessRecord { pid, start_time: identity.start_time, exe: identity.exe, ..record.clone() });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LaunchSettings {
        LaunchSettings::resolve(&Default::default(), &Default::default())
    }

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (llama (server) x) S 1 4242 4242 0 -1 4194560 9 0 0 0 1 2 0 0 20 0 5 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_recognised_and_a_changed_start_time_is_not() {
        let me = process_identity(std::process::id()).expect("this process runs");
        assert_eq!(me.exe, std::env::current_exe().expect("exe"));
        let record = |start_time| ProcessRecord {
            pid: std::process::id(),
            start_time,
            exe: me.exe.clone(),
            port: 1,
            model_path: PathBuf::from("/m.gguf"),
            settings: settings(),
            bundle_digest: "sha256:a".into(),
            log: PathBuf::from("/l.log"),
            role: Role::Serving,
        };
        assert!(record(me.start_time).is_same_process());
        assert!(!record(me.start_time + 1).is_same_process(), "a reused pid is another process");
    }

    #[test]
    fn changes_are_written_through_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recorder = Recorder::open(dir.path());
        assert!(recorder.processes().is_empty());
        let record = ProcessRecord {
            pid: 7,
            start_time: 99,
            exe: PathBuf::from("/bin/llama-server"),
            port: 4000,
            model_path: PathBuf::from("/m.gguf"),
            settings: settings(),
            bundle_digest: "sha256:a".into(),
            log: PathBuf::from("/l.log"),
            role: Role::Starting,
        };
        recorder.add(record.clone());
        recorder.set_role(7, Role::Serving);
        let again = Recorder::open(dir.path()).processes();
        assert_eq!(again, vec![ProcessRecord { role: Role::Serving, ..record }]);
        recorder.remove(7);
        assert!(Recorder::open(dir.path()).processes().is_empty());
        std::fs::write(dir.path().join("runtime.json"), b"{oops").expect("write");
        assert!(Recorder::open(dir.path()).processes().is_empty());
        assert!(dir.path().join("runtime.json.corrupt").exists());
    }
}
