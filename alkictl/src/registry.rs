//! `alkictl registry gc`: asks the controller to collect its registry's garbage now, over its admin HTTP
//! API (`POST /api/v1/registry/gc`), and shows the report.

use std::time::Duration;

use alki_shared::gc::GcReport;
use anyhow::Context as _;
use clap::Subcommand;

use crate::connection::Connection;
use crate::output::{Output, bytes, print};

#[derive(Subcommand)]
pub enum RegistryCmd {
    /// Delete blobs no manifest references now, instead of waiting for the controller's schedule.
    Gc {
        /// Keep unreferenced blobs pushed, mounted or read within this many seconds (default: the
        /// controller's --registry-gc-grace-secs). 0 deletes them all: only when no push is running.
        #[arg(long)]
        grace_secs: Option<u64>,
        /// Talk plain HTTP to the controller (until TLS is set up).
        #[arg(long)]
        insecure_plain_http: bool,
    },
}

/// Runs one `alkictl registry` command.
pub async fn run(connection: &Connection, output: Output, cmd: RegistryCmd) -> anyhow::Result<()> {
    let RegistryCmd::Gc { grace_secs, insecure_plain_http } = cmd;
    let scheme = if insecure_plain_http { "http" } else { "https" };
    let base = format!("{scheme}://{}", connection.registry);
    let token = connection.token()?;
    let roots = connection.extra_roots()?;
    let report = request_gc(&base, token.as_deref(), grace_secs.map(Duration::from_secs), &roots).await?;
    print(output, &report, |r| {
        format!(
            "deleted {} unreferenced blobs ({} freed, {} links); kept {} younger than {}s, in {} ms",
            r.blobs_deleted,
            bytes(r.bytes_freed),
            r.links_removed,
            r.kept_recent,
            r.grace_secs,
            r.duration_ms
        )
    })
}

/// Asks the controller at `base_url` (`https://host:port`) to collect garbage now, with `grace` or the
/// controller's configured grace period, trusting `roots` (PEM) besides the system's. The token must be an
/// admin's.
pub async fn request_gc(
    base_url: &str,
    token: Option<&str>,
    grace: Option<Duration>,
    roots: &[Vec<u8>],
) -> anyhow::Result<GcReport> {
    let url = format!("{}/api/v1/registry/gc", base_url.trim_end_matches('/'));
    let mut builder = reqwest::Client::builder();
    for pem in roots {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem).context("the controller CA")?);
    }
    let client = builder
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60 * 60))
        .build()
        .context("building the HTTP client")?;
    let mut request = client.post(&url);
    if let Some(grace) = grace {
        request = request.query(&[("grace_secs", grace.as_secs())]);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.with_context(|| format!("cannot reach the controller at {url}"))?;
    let status = response.status();
    if status.is_success() {
        return response.json().await.with_context(|| format!("{url} answered something other than a GC report"));
    }
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let message = body["errors"][0]["message"].as_str().unwrap_or("no error message").to_owned();
    let hint = match status.as_u16() {
        401 | 403 => "; registry gc needs an admin token (--token-file <data-dir>/admin.token or ALKI_TOKEN)",
        _ => "",
    };
    anyhow::bail!("the controller refused garbage collection ({status}): {message}{hint}")
}
