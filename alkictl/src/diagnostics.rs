//! `alkictl devices logs|support-bundle|restart-runtime|reverify`: a device's logs and support bundle read
//! through the controller (zstd chunks unpacked here; a bundle written to a temporary file and renamed only
//! once whole), and the device commands operators need, queued by the controller while the device is offline.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_shared::proto;
use anyhow::Context as _;
use serde::Serialize;

use crate::connection::{Connection, status};
use crate::output::{Output, print};

/// Largest piece of text one log chunk may unpack to (the agent sends at most 512 KiB).
const MAX_CHUNK_TEXT: usize = 1 << 20;

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The device id.
    pub id: String,
    /// Whose log: the agent's own, llama-server's (`runtime`), or both.
    #[arg(long, default_value = "all", value_parser = ["agent", "runtime", "all"])]
    pub source: String,
    /// Only what was written this long ago or later (`1h`, `30m`); llama-server's log is chosen by file
    /// time (its lines carry none).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Keep printing what is written until Ctrl-C (the device stops sending too).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// At most this many bytes in all (the device also caps it: diagnostics.max_mib_per_request).
    #[arg(long)]
    pub max_bytes: Option<u64>,
}

#[derive(clap::Args)]
pub struct BundleArgs {
    /// The device id.
    pub id: String,
    /// Where to write the tar.zst (written whole or not at all).
    #[arg(short = 'f', long = "file", value_name = "FILE.tar.zst")]
    pub file: PathBuf,
    /// Bytes of each log's tail in the bundle (default 1 MiB, at most 16 MiB).
    #[arg(long)]
    pub log_tail: Option<u64>,
}

#[derive(clap::Args)]
pub struct CommandArgs {
    /// The device id.
    pub id: String,
    /// How long to wait for the device's result when it is connected (default 300 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
}

/// `alkictl devices logs`: prints the text as it arrives (JSON lines with `-o json`), until the device ends
/// the answer or, following, until Ctrl-C.
pub async fn logs(connection: &Connection, output: Output, args: LogsArgs) -> anyhow::Result<()> {
    let request = proto::DeviceLogsRequest {
        device_id: args.id.clone(),
        source: args.source,
        since_seconds: args.since.map_or(0, |d| d.as_secs().max(1)),
        follow: args.follow,
        max_bytes: args.max_bytes.unwrap_or(0),
    };
    let mut stream = connection.diagnostics().await?.device_logs(request).await.map_err(status)?.into_inner();
    let mut stdout = std::io::stdout().lock();
    loop {
        let next = tokio::select! {
            next = stream.message() => next.map_err(status)?,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(chunk) = next else { break };
        if chunk.last && chunk.truncated {
            eprintln!(
                "(older lines were left out for the byte cap: narrow it with --since, or raise --max-bytes up to the \
                 device's cap, diagnostics.max_mib_per_request)"
            );
        }
        if chunk.data.is_empty() {
            continue;
        }
        let text = unpack(&chunk)?;
        match output {
            Output::Json => {
                let line = serde_json::json!({ "source": chunk.source, "text": String::from_utf8_lossy(&text) });
                writeln!(stdout, "{line}")?;
            }
            Output::Table => stdout.write_all(&text)?,
        }
        stdout.flush()?;
    }
    // Dropping the stream tells the controller, which tells the device to stop.
    drop(stream);
    Ok(())
}

/// One chunk's text: a zstd frame of at most [`MAX_CHUNK_TEXT`] bytes.
fn unpack(chunk: &proto::DiagnosticChunk) -> anyhow::Result<Vec<u8>> {
    if !chunk.zstd_frame {
        return Ok(chunk.data.clone());
    }
    anyhow::ensure!(
        chunk.uncompressed_len as usize <= MAX_CHUNK_TEXT,
        "the device sent a log chunk of {} bytes, over the {MAX_CHUNK_TEXT} alkictl accepts",
        chunk.uncompressed_len
    );
    zstd::bulk::decompress(&chunk.data, MAX_CHUNK_TEXT).context("a log chunk from the device is not valid zstd")
}

#[derive(Serialize)]
struct BundleView {
    device_id: String,
    file: String,
    bytes: u64,
}

/// `alkictl devices support-bundle`: streams the device's tar.zst into a temporary file beside FILE and
/// renames it into place when whole; a cut transfer leaves nothing.
pub async fn support_bundle(connection: &Connection, output: Output, args: BundleArgs) -> anyhow::Result<()> {
    let dir = match args.file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".support-bundle-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let request =
        proto::SupportBundleRequest { device_id: args.id.clone(), log_tail_bytes: args.log_tail.unwrap_or(0) };
    let mut stream = connection.diagnostics().await?.support_bundle(request).await.map_err(status)?.into_inner();
    let bar = progress(output);
    let mut bytes = 0u64;
    loop {
        let next = tokio::select! {
            next = stream.message() => next.map_err(status)?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; no file was written"),
        };
        let chunk = next.context("the controller ended the support bundle before its end; no file was written")?;
        temp.write_all(&chunk.data)?;
        bytes += chunk.data.len() as u64;
        bar.set_position(bytes);
        if chunk.last {
            break;
        }
    }
    bar.finish_and_clear();
    temp.as_file().sync_all()?;
    persist(temp, &args.file)?;
    let view = BundleView { device_id: args.id, file: args.file.display().to_string(), bytes };
    print(output, &view, |v| format!("wrote {} ({} bytes) from device {}", v.file, v.bytes, v.device_id))
}

fn persist(temp: tempfile::NamedTempFile, file: &Path) -> anyhow::Result<()> {
    temp.persist(file).map_err(|e| anyhow::anyhow!("cannot write {}: {}", file.display(), e.error))?;
    Ok(())
}

/// Bytes received, for people (nothing with `-o json`).
fn progress(output: Output) -> indicatif::ProgressBar {
    if output == Output::Json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} support bundle {bytes} {bytes_per_sec}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[derive(Serialize)]
struct CommandView {
    device_id: String,
    command_id: String,
    delivered: bool,
    queued: bool,
    expires: Option<String>,
    ok: Option<bool>,
    detail: String,
    checked: u64,
    corrupt: u64,
    removed: u64,
    corrupt_digests: Vec<String>,
}

/// Which device command.
#[derive(Clone, Copy)]
pub enum DeviceCommand {
    RestartRuntime,
    Reverify,
}

/// `alkictl devices restart-runtime|reverify`: the device's result, or that the command is queued.
pub async fn command(
    connection: &Connection,
    output: Output,
    which: DeviceCommand,
    args: CommandArgs,
) -> anyhow::Result<()> {
    let wait_seconds = args.wait.map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX));
    let request = proto::DeviceCommandRequest { device_id: args.id, wait_seconds };
    let mut client = connection.diagnostics().await?;
    let response = match which {
        DeviceCommand::RestartRuntime => client.restart_runtime(request).await,
        DeviceCommand::Reverify => client.reverify(request).await,
    }
    .map_err(status)?
    .into_inner();
    let sent = response.sent.unwrap_or_default();
    let result = response.result;
    let view = CommandView {
        device_id: sent.device_id,
        command_id: sent.command_id,
        delivered: sent.delivered,
        queued: sent.queued,
        expires: (sent.expires_unix_ms > 0).then(|| crate::output::rfc3339(sent.expires_unix_ms)),
        ok: result.as_ref().map(|r| r.ok),
        detail: result.as_ref().map(|r| r.detail.clone()).unwrap_or_default(),
        checked: result.as_ref().map_or(0, |r| r.checked),
        corrupt: result.as_ref().map_or(0, |r| r.corrupt),
        removed: result.as_ref().map_or(0, |r| r.removed),
        corrupt_digests: result.map(|r| r.corrupt_digests).unwrap_or_default(),
    };
    print(output, &view, |v| {
        if v.queued {
            format!(
                "device {} is offline: the command is queued and runs when it returns (until {})",
                v.device_id,
                v.expires.clone().unwrap_or_default()
            )
        } else if v.ok.is_none() {
            format!("sent to device {} (it connected just now); its result will be in its log", v.device_id)
        } else {
            let corrupt: String = v.corrupt_digests.iter().map(|d| format!("\n  corrupt: {d}")).collect();
            format!("device {}: {}{corrupt}", v.device_id, v.detail)
        }
    })
}
