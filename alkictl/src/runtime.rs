//! `alkictl runtime push`: llama.cpp builds, one per platform, packed as a runtime build with
//! `alki_bundle::runtime_build` and pushed like a bundle; prints the pinned reference a bundle names.

use std::path::PathBuf;

use alki_bundle::BundleRef;
use alki_bundle::runtime_build::{self, PackedPlatform};
use alki_shared::digest::Digest;
use clap::Subcommand;
use serde::Serialize;

use crate::bundle::push_tag;
use crate::connection::Connection;
use crate::output::{self, Output, bytes, print, short, table};

#[derive(Subcommand)]
pub enum RuntimeCmd {
    /// Pack llama.cpp builds (llama-server and the shared libraries beside it), one per platform, and push
    /// them as one runtime build: `alkictl runtime push acme/llama-server:b6000 --platform linux/amd64=build/bin
    /// --platform linux/arm64/cuda=jetson/bin`. Prints the pinned reference a bundle names. Sign it like a
    /// bundle: `alkictl bundle sign acme/llama-server:b6000 --key alki.key`.
    Push {
        /// [REGISTRY/]REPOSITORY[:TAG], e.g. acme/llama-server:b6000.
        target: BundleRef,
        /// OS/ARCH[/VARIANT][/cpu|cuda]=DIR (repeatable): e.g. linux/amd64=build/bin, linux/arm64/cuda=DIR.
        #[arg(long = "platform", required = true)]
        platforms: Vec<String>,
        /// The build's version for its config (default: the tag).
        #[arg(long)]
        build_version: Option<String>,
        /// Keep the packed OCI layout in this new directory (default: a temporary one, removed after the push).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Talk plain HTTP to the registry (until TLS is set up). Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
}

/// What was packed and pushed, for the table or `-o json`.
#[derive(Debug, Serialize)]
pub struct RuntimePushed {
    /// `registry/repository:tag`.
    pub reference: String,
    pub digest: Digest,
    /// What a bundle names: `alkictl bundle pack --runtime-build <pinned>`.
    pub pinned: String,
    pub uploaded_bytes: u64,
    pub skipped_blobs: usize,
    pub platforms: Vec<PackedPlatform>,
}

/// Runs one `alkictl runtime` command.
pub async fn run(connection: &Connection, output: Output, cmd: RuntimeCmd) -> anyhow::Result<()> {
    let RuntimeCmd::Push { target, platforms, build_version, out, insecure_plain_http } = cmd;
    let tag = push_tag(&target)?;
    let builds = platforms.iter().map(|p| runtime_build::parse_platform(p)).collect::<Result<Vec<_>, _>>()?;
    let version = build_version.unwrap_or_else(|| tag.clone());
    let temp = tempfile::tempdir()?;
    let dir = out.unwrap_or_else(|| temp.path().join("layout"));
    let progress = output::progress(output, "packing");
    let (pack_dir, pack_tag) = (dir.clone(), tag.clone());
    let (digest, packed) =
        tokio::task::spawn_blocking(move || runtime_build::pack(&builds, &version, &pack_dir, &pack_tag, &progress))
            .await??;
    let remote = connection.remote(&target, insecure_plain_http)?;
    let pushed = alki_bundle::push::push(&dir, &remote, &tag, &output::progress(output, "pushing")).await?;
    let result = RuntimePushed {
        pinned: BundleRef::pinned(Some(&remote.registry), &remote.repository, &digest).to_string(),
        reference: pushed.reference,
        digest,
        uploaded_bytes: pushed.uploaded_bytes,
        skipped_blobs: pushed.skipped_blobs,
        platforms: packed,
    };
    print(output, &result, pushed_text)
}

fn pushed_text(r: &RuntimePushed) -> String {
    let mut t = table(["PLATFORM", "MANIFEST", "LAYER", "FILES", "BUILD"]);
    for p in &r.platforms {
        t.add_row([
            p.platform.clone(),
            short(p.manifest.as_str()),
            bytes(p.layer_size),
            p.files.to_string(),
            p.build_info.chars().take(60).collect(),
        ]);
    }
    format!(
        "{t}\npushed {} ({}), {} uploaded, {} blobs already present\nsign it: alkictl bundle sign {} --key KEY\nname \
         it in a bundle: alkictl bundle pack --runtime-build {} ...",
        r.reference,
        r.digest,
        bytes(r.uploaded_bytes),
        r.skipped_blobs,
        r.reference,
        r.pinned
    )
}
