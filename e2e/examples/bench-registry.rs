//! Registry benchmark: our controller and CNCF distribution (`docker-registry`) side by side on loopback,
//! the same client against both, for one large blob: chunked push throughput, GET throughput, a Range GET
//! of the last MiB, and each server's peak RSS (VmHWM). A command, not a test; run it through
//! `e2e/scripts/bench-registry.sh`, which builds the release controller first.

use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alki_e2e::registries::Distribution;
use alki_shared::digest::{Digest, Hasher};
use anyhow::{Context as _, bail, ensure};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Benchmark the controller's registry against CNCF distribution on loopback.")]
struct Args {
    /// The release alki-controller binary.
    #[arg(long)]
    controller: PathBuf,
    /// Blob size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// PATCH chunk size in MiB (oci-client, which alkictl and the agent use, sends 4 MiB chunks).
    #[arg(long, default_value_t = 4)]
    chunk_mib: u64,
    /// Rounds (each pushes and reads the blob on both servers; the best round counts).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Full GETs per registry and round (the median counts).
    #[arg(long, default_value_t = 3)]
    gets: usize,
    /// Where the blob and both registries' storage go (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Measure only this registry (`alki` or `distribution`), e.g. to profile it.
    #[arg(long)]
    only: Option<String>,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
}

/// One registry's figures.
#[derive(Debug, Default, serde::Serialize)]
struct Figures {
    push_mib_s: f64,
    get_mib_s: f64,
    range_ms: f64,
    peak_rss_mib: f64,
    idle_rss_mib: f64,
}

/// The registry under test: base URL and credentials.
struct Target {
    name: &'static str,
    base: String,
    token: Option<String>,
    pid: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.chunk_mib > 0 && args.size_mib >= args.chunk_mib, "need 0 < --chunk-mib <= --size-mib");
    let scratch = tempfile::tempdir_in(args.work_dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let work = scratch.path();
    let size = args.size_mib << 20;
    eprintln!("Writing a {} MiB blob to {} ...", args.size_mib, work.display());
    let blob = work.join("blob");
    let digest = write_blob(&blob, size)?;

    let mut controller = Controller::start(&args.controller, &work.join("controller"))?;
    let distribution = Distribution::start(&work.join("distribution"))?;
    let ours = Target {
        name: "alki",
        base: format!("http://{}", controller.host),
        token: Some(controller.token.clone()),
        pid: controller.pid(),
    };
    let theirs = Target {
        name: "distribution",
        base: format!("http://{}", distribution.host()),
        token: None,
        pid: distribution.pid(),
    };

    let client = reqwest::Client::builder().pool_max_idle_per_host(4).build()?;
    // Rounds alternate between the servers; each figure is the best a server reached in any round, which
    // filters out other work on a shared machine (the figures of every round go to stderr).
    let targets = [&theirs, &ours];
    let mut results: Vec<Figures> = Vec::new();
    for target in targets {
        results.push(Figures {
            idle_rss_mib: rss_mib(target.pid, "VmRSS")?,
            range_ms: f64::INFINITY,
            ..Figures::default()
        });
    }
    let mib = size as f64 / (1u64 << 20) as f64;
    for round in 1..=args.rounds.max(1) {
        for (target, figures) in targets.iter().zip(results.iter_mut()) {
            if args.only.as_deref().is_some_and(|only| only != target.name) {
                continue;
            }
            // Start each push with no dirty pages left by the other server (distribution does not fsync).
            sync()?;
            let push = mib / push_chunked(target, &blob, &digest, size, args.chunk_mib << 20).await?;
            sync()?;
            let mut gets = Vec::new();
            for _ in 0..args.gets.max(1) {
                gets.push(get_full(target, &digest, size).await?);
            }
            gets.sort_by(f64::total_cmp);
            let get = mib / gets[gets.len() / 2];
            let mut ranges = Vec::new();
            for _ in 0..5 {
                ranges.push(get_tail(&client, target, &digest, &blob, size).await?);
            }
            ranges.sort_by(f64::total_cmp);
            let range = ranges[ranges.len() / 2] * 1000.0;
            eprintln!(
                "round {round} {}: push {push:.1} MiB/s, GET {get:.1} MiB/s, Range GET {range:.2} ms",
                target.name
            );
            figures.push_mib_s = figures.push_mib_s.max(push);
            figures.get_mib_s = figures.get_mib_s.max(get);
            figures.range_ms = figures.range_ms.min(range);
            figures.peak_rss_mib = rss_mib(target.pid, "VmHWM")?;
        }
    }
    controller.stop();

    let (theirs_f, ours_f) = (&results[0], &results[1]);
    println!(
        "Blob: {} MiB, PATCH chunks of {} MiB, best of {} rounds, loopback, the same client for both.",
        args.size_mib, args.chunk_mib, args.rounds
    );
    println!("{:<26} {:>14} {:>14} {:>12}", "", "alki", "distribution", "alki/dist");
    let row = |label: &str, a: f64, b: f64| println!("{label:<26} {a:>14.1} {b:>14.1} {:>11.2}x", a / b);
    row("chunked push (MiB/s)", ours_f.push_mib_s, theirs_f.push_mib_s);
    row("GET (MiB/s, median)", ours_f.get_mib_s, theirs_f.get_mib_s);
    row("Range GET last MiB (ms)", ours_f.range_ms, theirs_f.range_ms);
    row("peak RSS (MiB, VmHWM)", ours_f.peak_rss_mib, theirs_f.peak_rss_mib);
    row("idle RSS before (MiB)", ours_f.idle_rss_mib, theirs_f.idle_rss_mib);
    if args.json {
        let json = serde_json::json!({"size_mib": args.size_mib, "chunk_mib": args.chunk_mib, "alki": ours_f, "distribution": theirs_f});
        println!("{json}");
    }
    Ok(())
}

/// Writes `size` bytes of deterministic pseudo-random data (incompressible) and returns their digest.
fn write_blob(path: &Path, size: u64) -> anyhow::Result<Digest> {
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut hasher = Hasher::new();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < size {
        for word in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = (size - written).min(buf.len() as u64) as usize;
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        written += n as u64;
    }
    file.flush()?;
    Ok(hasher.finish())
}

fn authorize(request: reqwest::RequestBuilder, target: &Target) -> reqwest::RequestBuilder {
    match &target.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// One HTTP/1.1 keep-alive connection driven by hand: bodies go out of and come in through a 1 MiB
/// buffer with no HTTP library in the way, so the same minimal client measures both servers.
struct Conn {
    stream: tokio::net::TcpStream,
    host: String,
    auth: String,
    buf: Vec<u8>,
    /// Bytes read past the last response head.
    pending: Vec<u8>,
}

/// A response head: status and lowercase header names.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Conn {
    async fn open(target: &Target) -> anyhow::Result<Conn> {
        let host = target.base.trim_start_matches("http://").to_owned();
        let stream = tokio::net::TcpStream::connect(&host).await?;
        stream.set_nodelay(true)?;
        let auth = target.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        Ok(Conn { stream, host, auth, buf: vec![0u8; 1 << 20], pending: Vec::new() })
    }

    /// Sends a request whose body is `len` bytes of `file` from `offset` (or none), and reads the
    /// response head; a response body is read and dropped unless `keep_body` (a GET reads it itself).
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        extra: &str,
        body: Option<(&mut std::fs::File, u64, u64)>,
        keep_body: bool,
    ) -> anyhow::Result<Head> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let len = body.as_ref().map_or(0, |b| b.2);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{}{extra}Content-Length: {len}\r\n\r\n",
            self.host, self.auth
        );
        self.stream.write_all(head.as_bytes()).await?;
        if let Some((file, offset, len)) = body {
            file.seek(std::io::SeekFrom::Start(offset))?;
            let mut left = len;
            while left > 0 {
                let n = left.min(self.buf.len() as u64) as usize;
                file.read_exact(&mut self.buf[..n])?;
                self.stream.write_all(&self.buf[..n]).await?;
                left -= n as u64;
            }
        }
        let mut raw = std::mem::take(&mut self.pending);
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = self.stream.read(&mut self.buf).await?;
            ensure!(n > 0, "the server closed the connection before answering {method} {path}");
            raw.extend_from_slice(&self.buf[..n]);
        };
        let text = String::from_utf8_lossy(&raw[..end]).into_owned();
        self.pending = raw[end + 4..].to_vec();
        let mut lines = text.split("\r\n");
        let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok());
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let head = Head { status: status.context("no status line")?, headers };
        ensure!(head.header("transfer-encoding").is_none(), "chunked responses are not handled");
        if !keep_body {
            let mut left = head.header("content-length").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            left = left.saturating_sub(self.discard_pending(left));
            while left > 0 {
                let n = self.stream.read(&mut self.buf).await?;
                ensure!(n > 0, "the server closed the connection in a response body");
                let used = (n as u64).min(left);
                left -= used;
                self.pending = self.buf[used as usize..n].to_vec();
            }
        }
        Ok(head)
    }

    /// Drops up to `n` buffered bytes; returns how many.
    fn discard_pending(&mut self, n: u64) -> u64 {
        let used = (n as usize).min(self.pending.len());
        self.pending.drain(..used);
        used as u64
    }

    /// Reads and counts a response body of `len` bytes.
    async fn read_body(&mut self, len: u64) -> anyhow::Result<u64> {
        use tokio::io::AsyncReadExt as _;
        let mut received = self.discard_pending(len);
        while received < len {
            let n = self.stream.read(&mut self.buf).await?;
            ensure!(n > 0, "the body ended after {received} of {len} bytes");
            received += n as u64;
        }
        Ok(received)
    }
}

/// The path (and query) of a `Location` header, absolute or not.
fn location(target: &Target, head: &Head) -> anyhow::Result<String> {
    let location = head.header("location").context("no Location header")?;
    Ok(location.strip_prefix(&target.base).unwrap_or(location).to_owned())
}

/// POST, PATCH chunk by chunk (following each Location), PUT with the digest. Returns seconds.
async fn push_chunked(target: &Target, blob: &Path, digest: &Digest, size: u64, chunk: u64) -> anyhow::Result<f64> {
    let mut file = std::fs::File::open(blob)?;
    let mut conn = Conn::open(target).await?;
    let started = Instant::now();
    let head = conn.request("POST", "/v2/bench/blob/blobs/uploads/", "", None, false).await?;
    ensure!(head.status == 202, "{}: starting the upload answered {}", target.name, head.status);
    let mut upload = location(target, &head)?;
    let mut offset = 0;
    while offset < size {
        let len = chunk.min(size - offset);
        let range =
            format!("Content-Type: application/octet-stream\r\nContent-Range: {offset}-{}\r\n", offset + len - 1);
        let head = conn.request("PATCH", &upload, &range, Some((&mut file, offset, len)), false).await?;
        ensure!(head.status == 202, "{}: PATCH at {offset} answered {}", target.name, head.status);
        upload = location(target, &head)?;
        offset += len;
    }
    let patched = started.elapsed().as_secs_f64();
    let separator = if upload.contains('?') { '&' } else { '?' };
    let head = conn.request("PUT", &format!("{upload}{separator}digest={digest}"), "", None, false).await?;
    ensure!(head.status == 201, "{}: the closing PUT answered {}", target.name, head.status);
    let total = started.elapsed().as_secs_f64();
    eprintln!("{}: PATCHes took {patched:.2} s, the closing PUT {:.2} s", target.name, total - patched);
    Ok(total)
}

/// A full GET, counting the body bytes. Returns seconds.
async fn get_full(target: &Target, digest: &Digest, size: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut conn = Conn::open(target).await?;
    let head = conn.request("GET", &format!("/v2/bench/blob/blobs/{digest}"), "", None, true).await?;
    ensure!(head.status == 200, "{}: GET answered {}", target.name, head.status);
    let received = conn.read_body(size).await?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(received == size, "{}: GET returned {received} bytes, expected {size}", target.name);
    Ok(elapsed)
}

/// `Range: bytes=<size-1MiB>-`, checked against the file's tail. Returns seconds.
async fn get_tail(
    client: &reqwest::Client,
    target: &Target,
    digest: &Digest,
    blob: &Path,
    size: u64,
) -> anyhow::Result<f64> {
    let from = size.saturating_sub(1 << 20);
    let started = Instant::now();
    let url = format!("{}/v2/bench/blob/blobs/{digest}", target.base);
    let resp = authorize(client.get(&url), target).header("range", format!("bytes={from}-")).send().await?;
    ensure!(resp.status() == 206, "{}: Range GET answered {}", target.name, resp.status());
    let body = resp.bytes().await?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut expected = vec![0u8; (size - from) as usize];
    let mut file = std::fs::File::open(blob)?;
    file.seek(std::io::SeekFrom::Start(from))?;
    file.read_exact(&mut expected)?;
    ensure!(body.as_ref() == expected.as_slice(), "{}: the Range GET returned other bytes", target.name);
    Ok(elapsed)
}

/// Flushes every dirty page on the machine (`sync`), so one server's writeback does not slow the other.
fn sync() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    ensure!(status.success(), "sync failed");
    Ok(())
}

/// A `/proc/<pid>/status` memory figure in MiB (`VmRSS` now, `VmHWM` the peak).
fn rss_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} for {pid}"))?;
    let kib: f64 = line.split_whitespace().nth(1).context("malformed status line")?.parse()?;
    Ok(kib / 1024.0)
}

/// The release controller as a child process, with GC off and quiet logs.
struct Controller {
    child: Child,
    host: String,
    token: String,
}

impl Controller {
    fn start(binary: &Path, data_dir: &Path) -> anyhow::Result<Controller> {
        if !binary.is_file() {
            bail!("{} is missing; run `cargo build --release -p alki-controller` first", binary.display());
        }
        std::fs::create_dir_all(data_dir)?;
        let port = |_: ()| -> anyhow::Result<String> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
        };
        let (grpc, http) = (port(())?, port(())?);
        let log = std::fs::File::create(data_dir.join("controller.log"))?;
        let child = Command::new(binary)
            .args(["--data-dir", &data_dir.display().to_string(), "--grpc-addr", &grpc, "--http-addr", &http])
            .args(["--registry-gc-interval-secs", "0"])
            // Like for like: distribution serves plain HTTP here too.
            .arg("--insecure-plaintext")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut controller = Controller { child, host: http, token: String::new() };
        let token_path = data_dir.join("admin.token");
        let started = Instant::now();
        loop {
            if let Ok(token) = std::fs::read_to_string(&token_path)
                && !token.trim().is_empty()
                && std::net::TcpStream::connect(&controller.host).is_ok()
            {
                controller.token = token.trim().to_owned();
                return Ok(controller);
            }
            if let Some(status) = controller.child.try_wait()? {
                bail!("the controller exited ({status}); see {}", data_dir.join("controller.log").display());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the controller did not start within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}
