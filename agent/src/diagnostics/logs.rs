//! The device's logs for `alkictl devices logs`: the agent's own (journald through `journalctl` under
//! systemd, else its capped file, see [`crate::logfile`]) and llama-server's (the capped per-instance files
//! in the logs directory), read newest-first within the byte cap and then followed on request.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

use super::sink::{MAX_CHUNK, Sink, Stopped};
use super::tail::{LogFile, SinceFilter, plan};
use crate::logfile::AGENT_LOG;

/// How often followed files are checked for new bytes.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Pieces a follower may have read ahead of the sender.
const FOLLOW_QUEUE: usize = 4;
/// Lines asked of journald for a request without `--since` (the byte cap cuts it further).
const JOURNAL_LINES: u64 = 20_000;

/// One of the device's logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Agent,
    Runtime,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Agent => "agent",
            Source::Runtime => "runtime",
        }
    }

    /// `agent`, `runtime` or `all` (empty: all), else what was wrong.
    pub fn parse(text: &str) -> Result<Vec<Source>, String> {
        match text {
            "" | "all" => Ok(vec![Source::Agent, Source::Runtime]),
            "agent" => Ok(vec![Source::Agent]),
            "runtime" => Ok(vec![Source::Runtime]),
            other => Err(format!("unknown log source {other:?}: use agent, runtime or all")),
        }
    }
}

/// Where this agent's logs are.
#[derive(Clone, Debug)]
pub struct LogPlaces {
    pub logs_dir: PathBuf,
    /// The systemd unit whose journal holds the agent's log, when it runs under journald.
    pub journal_unit: Option<String>,
}

impl LogPlaces {
    /// The logs directory, and the agent's unit when its output goes to the journal.
    pub fn discover(logs_dir: PathBuf) -> LogPlaces {
        let journal_unit = crate::logfile::under_journald().then(own_unit).flatten();
        LogPlaces { logs_dir, journal_unit }
    }
}

/// The systemd unit this process runs in, from its cgroup (`.../alki-agent.service`).
fn own_unit() -> Option<String> {
    unit_of(&std::fs::read_to_string("/proc/self/cgroup").ok()?)
}

/// The `.service` unit a `/proc/<pid>/cgroup` text places the process in (pure).
fn unit_of(cgroup: &str) -> Option<String> {
    cgroup.lines().filter_map(|l| l.rsplit('/').next()).find(|u| u.ends_with(".service")).map(str::to_owned)
}

/// What one logs request asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub sources: Vec<Source>,
    pub since: Option<SystemTime>,
    pub follow: bool,
}

/// Sends the requested logs: each source's newest bytes within its share of the cap, then (following)
/// what is written from now on until cancelled.
pub async fn send_logs(places: &LogPlaces, request: &Request, sink: &mut Sink, budget: u64) -> Result<(), Stopped> {
    let share = budget / request.sources.len().max(1) as u64;
    for source in &request.sources {
        match source {
            Source::Agent => send_agent_backlog(places, request.since, sink, share).await?,
            Source::Runtime => send_runtime_backlog(places, request.since, sink, share).await?,
        }
    }
    if request.follow {
        follow(places, &request.sources, sink).await?;
    }
    Ok(())
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn send_agent_backlog(
    places: &LogPlaces,
    since: Option<SystemTime>,
    sink: &mut Sink,
    share: u64,
) -> Result<(), Stopped> {
    if let Some(unit) = &places.journal_unit {
        return send_journal(unit, since, sink, share).await;
    }
    let names = [format!("{AGENT_LOG}.1"), AGENT_LOG.to_owned()];
    let files = list_files(&places.logs_dir, move |name| names.iter().any(|n| n == name)).await;
    if files.is_empty() {
        let note = format!(
            "# no agent log file in {} (diagnostics.agent_log_file_mib = 0, or the agent runs in-process)\n",
            places.logs_dir.display()
        );
        return sink.send("agent", note.as_bytes(), true).await;
    }
    let (segments, cut) = plan(files, since.map_or(0, millis), share);
    sink.cut |= cut;
    let mut filter = SinceFilter::new(since);
    for segment in segments {
        send_range(sink, "agent", &segment.path, segment.start, segment.len, Some(&mut filter)).await?;
    }
    Ok(())
}

async fn send_runtime_backlog(
    places: &LogPlaces,
    since: Option<SystemTime>,
    sink: &mut Sink,
    share: u64,
) -> Result<(), Stopped> {
    let files = list_files(&places.logs_dir, is_runtime_log).await;
    if files.is_empty() {
        let note = format!("# no llama-server log in {} yet\n", places.logs_dir.display());
        return sink.send("runtime", note.as_bytes(), true).await;
    }
    let (segments, cut) = plan(files, since.map_or(0, millis), share);
    sink.cut |= cut;
    for segment in segments {
        let header = format!("==> {} <==\n", file_name(&segment.path));
        sink.send("runtime", header.as_bytes(), true).await?;
        send_range(sink, "runtime", &segment.path, segment.start, segment.len, None).await?;
    }
    Ok(())
}

/// `llama-server-<n>.log` and its capped copy `.log.old`.
fn is_runtime_log(name: &str) -> bool {
    name.starts_with("llama-server-") && (name.ends_with(".log") || name.ends_with(".log.old"))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The regular files in `dir` whose names `wanted` accepts (not recursing: calibration and evaluation
/// instances keep theirs in subdirectories).
async fn list_files(dir: &Path, wanted: impl Fn(&str) -> bool + Send + 'static) -> Vec<LogFile> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| wanted(&e.file_name().to_string_lossy()))
            .filter_map(|e| {
                let meta = e.metadata().ok().filter(|m| m.is_file())?;
                let modified_ms = meta.modified().map(millis).unwrap_or(0);
                Some(LogFile { path: e.path(), len: meta.len(), modified_ms })
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Sends `len` bytes of `path` from `start`, piece by piece (a file that shrank meanwhile ends early).
async fn send_range(
    sink: &mut Sink,
    source: &str,
    path: &Path,
    start: u64,
    len: u64,
    mut filter: Option<&mut SinceFilter>,
) -> Result<(), Stopped> {
    let mut offset = start;
    let end = start.saturating_add(len);
    while offset < end {
        let want = (end - offset).min(MAX_CHUNK as u64) as usize;
        let piece = read_at(path.to_owned(), offset, want).await;
        if piece.is_empty() {
            break;
        }
        offset += piece.len() as u64;
        let passed = match filter.as_deref_mut() {
            Some(f) => f.apply(&piece),
            None => &piece[..],
        };
        if !passed.is_empty() {
            sink.send(source, passed, true).await?;
        }
    }
    Ok(())
}

/// Up to `want` bytes of `path` at `offset`; empty at the end or on an error (a log rotated away).
async fn read_at(path: PathBuf, offset: u64, want: usize) -> Vec<u8> {
    tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(&path)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(want);
        file.take(want as u64).read_to_end(&mut buf)?;
        Ok(buf)
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default()
}

/// The agent's journal: `journalctl` for its unit, its output streamed as it comes.
async fn send_journal(unit: &str, since: Option<SystemTime>, sink: &mut Sink, share: u64) -> Result<(), Stopped> {
    let mut command = journalctl(unit);
    match since {
        Some(t) => command.arg(format!("--since=@{}", millis(t) / 1000)),
        None => command.arg(format!("--lines={JOURNAL_LINES}")),
    };
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let note = format!("# cannot run journalctl for {unit}: {e}\n");
            return sink.send("agent", note.as_bytes(), true).await;
        }
    };
    let Some(mut stdout) = child.stdout.take() else { return Ok(()) };
    let mut sent = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = tokio::select! {
            read = stdout.read(&mut buf) => read.unwrap_or(0),
            _ = sink.cancelled().cancelled() => return Err(Stopped::Cancelled),
        };
        if n == 0 {
            break;
        }
        if sent >= share {
            sink.cut = true;
            break;
        }
        let n = n.min(usize::try_from(share - sent).unwrap_or(usize::MAX));
        sink.send("agent", &buf[..n], true).await?;
        sent += n as u64;
    }
    Ok(())
}

fn journalctl(unit: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("journalctl");
    command
        .args(["--no-pager", "--output=short-iso-precise", "--unit", unit])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// Sends what each source writes from now on, until cancelled or the session ends.
async fn follow(places: &LogPlaces, sources: &[Source], sink: &mut Sink) -> Result<(), Stopped> {
    let (tx, mut rx) = mpsc::channel::<(Source, Vec<u8>)>(FOLLOW_QUEUE);
    let mut tasks = tokio::task::JoinSet::new();
    for source in sources.iter().copied() {
        let (places, tx) = (places.clone(), tx.clone());
        match (source, &places.journal_unit) {
            (Source::Agent, Some(unit)) => tasks.spawn(follow_journal(unit.clone(), tx)),
            (Source::Agent, None) => tasks.spawn(follow_files(places.logs_dir, source, tx, |n| n == AGENT_LOG)),
            (Source::Runtime, _) => tasks.spawn(follow_files(places.logs_dir, source, tx, |n| {
                n.starts_with("llama-server-") && n.ends_with(".log")
            })),
        };
    }
    drop(tx);
    // The followers end with this function: dropping the set aborts them (and kills journalctl).
    loop {
        let (source, piece) = tokio::select! {
            next = rx.recv() => match next {
                Some(next) => next,
                None => return Ok(()),
            },
            _ = sink.cancelled().cancelled() => return Err(Stopped::Cancelled),
        };
        sink.send(source.label(), &piece, true).await?;
    }
}

/// Follows the newest file `wanted` accepts in `dir` (llama-server moves to another file when it
/// restarts, the agent's log rotates), from its current end, starting again from the top of a new file.
async fn follow_files(dir: PathBuf, source: Source, tx: mpsc::Sender<(Source, Vec<u8>)>, wanted: fn(&str) -> bool) {
    let newest = |files: Vec<LogFile>| files.into_iter().max_by_key(|f| f.modified_ms);
    let mut current: Option<(PathBuf, u64)> = newest(list_files(&dir, wanted).await).map(|f| (f.path, f.len));
    let mut tick = tokio::time::interval(FOLLOW_POLL);
    loop {
        tick.tick().await;
        let Some(latest) = newest(list_files(&dir, wanted).await) else { continue };
        let (path, mut offset) = match current.take() {
            Some((path, offset)) if path == latest.path && latest.len >= offset => (path, offset),
            _ => {
                let header = format!("==> {} <==\n", file_name(&latest.path));
                if tx.send((source, header.into_bytes())).await.is_err() {
                    return;
                }
                (latest.path.clone(), 0)
            }
        };
        while offset < latest.len {
            let piece = read_at(path.clone(), offset, MAX_CHUNK).await;
            if piece.is_empty() {
                break;
            }
            offset += piece.len() as u64;
            if tx.send((source, piece)).await.is_err() {
                return;
            }
        }
        current = Some((path, offset));
    }
}

/// Follows the agent's journal with `journalctl --follow` (killed when this task is dropped).
async fn follow_journal(unit: String, tx: mpsc::Sender<(Source, Vec<u8>)>) {
    let mut command = journalctl(&unit);
    command.args(["--follow", "--lines=0"]);
    let Ok(mut child) = command.spawn() else { return };
    let Some(mut stdout) = child.stdout.take() else { return };
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stdout.read(&mut buf).await {
        if n == 0 || tx.send((Source::Agent, buf[..n].to_vec())).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_the_journal_unit_are_read_strictly() {
        assert_eq!(Source::parse("").expect("all"), vec![Source::Agent, Source::Runtime]);
        assert_eq!(Source::parse("runtime").expect("runtime"), vec![Source::Runtime]);
        assert!(Source::parse("shell").expect_err("unknown").contains("use agent, runtime or all"));
        assert_eq!(unit_of("0::/system.slice/alki-agent.service\n").as_deref(), Some("alki-agent.service"));
        assert_eq!(unit_of("0::/user.slice/user-1000.slice/session-2.scope\n"), None);
        assert!(is_runtime_log("llama-server-3.log") && is_runtime_log("llama-server-3.log.old"));
        assert!(!is_runtime_log("agent.log") && !is_runtime_log("llama-server-3.log.tmp"));
    }
}
