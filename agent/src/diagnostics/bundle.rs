//! Support bundles (`alkictl devices support-bundle`): a tar.zst built on the device in a temporary file
//! under the data dir, then sent in chunks. Inside: inventory, the config with every secret redacted
//! ([`super::redact`]), the state and runtime records, the content-store listing, recent outcomes (the
//! agent's metrics: activations, evaluations, benchmarks), the last benchmarks and evaluations, and the
//! tail of each log. Nothing is read from the identity directory or any file a config key points to.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::logs::LogPlaces;
use super::redact::redact_config;
use super::tail::{LogFile, plan};

/// The agent's records copied as they are (none holds a secret: the registry token lives in memory only).
const RECORDS: &[&str] = &[
    "state.json",
    "runtime.json",
    crate::stage::STAGED_FILE,
    crate::bench::files::RESULTS_FILE,
    crate::bench::files::SERVING_FILE,
    crate::eval::files::EVALUATIONS_FILE,
    crate::eval::files::DONE_FILE,
];
/// Largest record copied (a bigger one is cut, with a note).
const MAX_RECORD: u64 = 4 << 20;
/// Each log's tail in the bundle by default.
pub const DEFAULT_LOG_TAIL: u64 = 1 << 20;
/// The llama-server logs whose tails are kept (newest first).
const RUNTIME_LOGS: usize = 3;

/// What a bundle is built from, gathered on the async side.
pub struct Inputs {
    pub device_id: String,
    pub data_dir: PathBuf,
    pub config_file: Option<PathBuf>,
    pub inventory: alki_shared::proto::Inventory,
    pub store_listing: String,
    pub metrics: String,
    pub places: LogPlaces,
    pub log_tail: u64,
}

/// Builds the bundle into a temporary file in `<data_dir>/diagnostics/` (removed when dropped). Blocking.
pub fn build(inputs: &Inputs) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = inputs.data_dir.join("diagnostics");
    std::fs::create_dir_all(&dir)?;
    let file = tempfile::Builder::new().prefix("support-").suffix(".tar.zst").tempfile_in(&dir)?;
    let encoder = zstd::stream::write::Encoder::new(file.reopen()?, 3)?;
    let mut tar = tar::Builder::new(encoder);
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()));
        header.set_cksum();
        tar.append_data(&mut header, name, bytes)
    };
    add("README.txt", readme(inputs).as_bytes())?;
    add("inventory.json", &serde_json::to_vec_pretty(&inputs.inventory).unwrap_or_default())?;
    add("config.toml", config_text(inputs.config_file.as_deref()).as_bytes())?;
    for name in RECORDS {
        if let Some(bytes) = read_capped(&inputs.data_dir.join(name), MAX_RECORD) {
            add(&format!("records/{name}"), &bytes)?;
        }
    }
    add("content-store.txt", inputs.store_listing.as_bytes())?;
    add("agent-metrics.prom", inputs.metrics.as_bytes())?;
    for (name, bytes) in log_tails(&inputs.places, inputs.log_tail) {
        add(&format!("logs/{name}"), &bytes)?;
    }
    let mut encoder = tar.into_inner()?;
    encoder.flush()?;
    encoder.finish()?.sync_all()?;
    Ok(file)
}

fn readme(inputs: &Inputs) -> String {
    format!(
        "Alki Fleet support bundle\ndevice: {}\nagent: {}\nbuilt: {}\n\nconfig.toml has every value whose key names \
         a secret (token, password, key, credential, ...) replaced by <redacted>; no secret file was read.\n",
        inputs.device_id,
        env!("CARGO_PKG_VERSION"),
        humantime::format_rfc3339_seconds(SystemTime::now()),
    )
}

/// The config file redacted, or a note when there is none to read.
fn config_text(path: Option<&Path>) -> String {
    match path.map(|p| (p, std::fs::read_to_string(p))) {
        Some((_, Ok(text))) => redact_config(&text),
        Some((p, Err(e))) => format!("# cannot read the config file {}: {e}\n", p.display()),
        None => "# the agent runs without a config file (in-process)\n".into(),
    }
}

/// The first `cap` bytes of a file, if it can be read.
fn read_capped(path: &Path, cap: u64) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(cap).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The tail of the agent's log and of the newest llama-server logs, as (name in the bundle, bytes).
fn log_tails(places: &LogPlaces, tail: u64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Some(unit) = &places.journal_unit {
        let lines = format!("--lines={}", (tail / 100).max(100));
        let output = std::process::Command::new("journalctl")
            .args(["--no-pager", "--output=short-iso-precise", "--unit", unit, &lines])
            .stdin(std::process::Stdio::null())
            .output();
        let mut text = output.map(|o| o.stdout).unwrap_or_else(|e| format!("cannot run journalctl: {e}\n").into());
        let cut = text.len().saturating_sub(usize::try_from(tail).unwrap_or(usize::MAX));
        text.drain(..cut);
        out.push(("agent.journal.log".to_owned(), text));
    }
    let Ok(entries) = std::fs::read_dir(&places.logs_dir) else { return out };
    let mut files: Vec<LogFile> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with(crate::logfile::AGENT_LOG) || name.starts_with("llama-server-");
            let meta = e.metadata().ok().filter(|m| m.is_file() && ours)?;
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            Some(LogFile { path: e.path(), len: meta.len(), modified_ms })
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.modified_ms));
    let runtime: Vec<LogFile> = files
        .iter()
        .filter(|f| f.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("llama-server-")))
        .take(RUNTIME_LOGS)
        .cloned()
        .collect();
    let agent: Vec<LogFile> = files
        .into_iter()
        .filter(|f| f.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(crate::logfile::AGENT_LOG)))
        .collect();
    for file in agent.into_iter().chain(runtime) {
        let (segments, _) = plan(vec![file], 0, tail);
        for segment in segments {
            if let Some(bytes) = read_range(&segment.path, segment.start, segment.len) {
                let name = segment.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                out.push((name, bytes));
            }
        }
    }
    out
}

fn read_range(path: &Path, start: u64, len: u64) -> Option<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(std::io::SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    file.take(len).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}
