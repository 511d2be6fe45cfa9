//! `alkictl bundle pack|push|sign|inspect|list`: thin commands over `alki_bundle` (and ListBundles), each
//! printing a table for people or JSON for scripts. Every reference they print is accepted back by them.

use std::path::PathBuf;

use alki_bundle::BundleRef;
use alki_bundle::pack::{self, PackExtras, PackOptions};
use alki_shared::proto;
use anyhow::bail;
use clap::{Args, Subcommand};

use crate::connection::{Connection, status};
use crate::output::{self, Output, bytes, print, short, table};

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Turn GGUF files (one per quantization) into a bundle in an OCI layout directory.
    Pack(PackArgs),
    /// Upload a packed bundle: `alkictl bundle push DIR [REGISTRY/]REPOSITORY[:TAG]`.
    Push {
        dir: PathBuf,
        /// Repository and optional tag, e.g. acme/qwen:v2; a registry in front (`HOST:PORT/acme/qwen:v2`)
        /// pushes there instead of to --registry.
        target: BundleRef,
        /// Talk plain HTTP to the registry (until TLS is set up). Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Sign a pushed bundle (its index and each variant manifest) with cosign's key-based scheme:
    /// `alkictl bundle sign acme/qwen:v2 --key alki.key`. The key password comes from ALKI_KEY_PASSWORD,
    /// COSIGN_PASSWORD or a prompt.
    Sign {
        /// [REGISTRY/]REPOSITORY[:TAG] or [REGISTRY/]REPOSITORY@sha256:..., e.g. what `bundle push` printed.
        reference: BundleRef,
        /// Encrypted private key (from `alkictl key generate` or `cosign generate-key-pair`).
        #[arg(long)]
        key: PathBuf,
        /// Talk plain HTTP to the registry. Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Show a bundle's variants, sizes, metadata and signatures: a packed directory or a reference.
    Inspect(crate::inspect::InspectArgs),
    /// Bundles in the controller's registry.
    List {
        #[arg(long, default_value = "")]
        repository: String,
    },
}

#[derive(Args)]
pub struct PackArgs {
    /// GGUF files, one per quantization; every part of a split model (`-00001-of-00003.gguf`, ...).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Directory to create the OCI layout in.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    model_version: Option<String>,
    /// SPDX license identifier.
    #[arg(long)]
    license: Option<String>,
    /// Default context size for llama-server (capped by the model's training context).
    #[arg(long, default_value_t = 4096)]
    context: u32,
    #[arg(long, default_value = "latest")]
    tag: String,
    /// License text to ship in the bundle (doc layer LICENSE).
    #[arg(long)]
    license_file: Option<PathBuf>,
    /// README to ship in the bundle (doc layer README.md).
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Default CPU threads for llama-server (0: its own choice).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Default layers offloaded to a GPU.
    #[arg(long, default_value_t = 0)]
    gpu_layers: i32,
    /// A chat template file overriding the one inside the GGUF.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// The llama.cpp build to run the bundle with, pinned by digest: the `pinned` reference
    /// `alkictl runtime push` printed (REGISTRY/REPOSITORY@sha256:...). Default: the agent's llama-server.
    #[arg(long)]
    runtime_build: Option<String>,
    /// Hard-link the GGUF files into the layout instead of copying them: packing only reads and hashes
    /// them (the same filesystem is needed; otherwise they are copied). The layout then shares the
    /// files, so do not modify a GGUF in place after packing it.
    #[arg(long)]
    link: bool,
}

/// Runs one `alkictl bundle` command.
pub async fn run(connection: &Connection, output: Output, cmd: BundleCmd) -> anyhow::Result<()> {
    match cmd {
        BundleCmd::Pack(args) => pack(output, args).await,
        BundleCmd::Push { dir, target, insecure_plain_http } => {
            push(connection, output, dir, &target, insecure_plain_http).await
        }
        BundleCmd::Sign { reference, key, insecure_plain_http } => {
            sign(connection, output, &reference, key, insecure_plain_http).await
        }
        BundleCmd::Inspect(args) => crate::inspect::run(connection, output, args).await,
        BundleCmd::List { repository } => list(connection, output, repository).await,
    }
}

async fn pack(output: Output, args: PackArgs) -> anyhow::Result<()> {
    let opts = PackOptions {
        files: args.files,
        out: args.out,
        name: args.name,
        version: args.model_version,
        license: args.license,
        context: args.context,
        tag: args.tag,
    };
    let extras = PackExtras {
        license_file: args.license_file,
        readme: args.readme,
        threads: args.threads,
        gpu_layers: args.gpu_layers,
        chat_template: args.chat_template,
        runtime_build: args.runtime_build,
        link_weights: args.link,
    };
    let progress = output::progress(output, "packing");
    let packed = tokio::task::spawn_blocking(move || pack::pack_with(&opts, &extras, &progress)).await??;
    print(output, &packed, |p| {
        let mut t = table(["VARIANT", "QUANT", "ARCH", "PARAMS", "SIZE", "MEMORY", "FILE"]);
        for v in &p.variants {
            t.add_row([
                short(v.digest.as_str()),
                v.quantization.clone(),
                v.architecture.clone(),
                v.parameters.to_string(),
                bytes(v.size),
                bytes(v.memory_bytes),
                v.file.display().to_string(),
            ]);
        }
        format!("{t}\nbundle {} written to {} (tag {})", p.digest, p.layout.display(), p.tag)
    })
}

/// The tag a push target names; a digest cannot be pushed to (the registry computes it).
pub fn push_tag(target: &BundleRef) -> anyhow::Result<String> {
    if target.digest.is_some() {
        bail!("push to a tag ({}:TAG), not to a digest: the digest is the content's own", target.repository);
    }
    Ok(target.tag_or_digest())
}

async fn push(
    connection: &Connection,
    output: Output,
    dir: PathBuf,
    target: &BundleRef,
    plain_http: bool,
) -> anyhow::Result<()> {
    let tag = push_tag(target)?;
    let remote = connection.remote(target, plain_http)?;
    let pushed = alki_bundle::push::push(&dir, &remote, &tag, &output::progress(output, "pushing")).await?;
    print(output, &pushed, |p| {
        format!(
            "pushed {} ({}), {} uploaded, {} blobs already present",
            p.reference,
            p.digest,
            bytes(p.uploaded_bytes),
            p.skipped_blobs
        )
    })
}

async fn sign(
    connection: &Connection,
    output: Output,
    reference: &BundleRef,
    key_file: PathBuf,
    plain_http: bool,
) -> anyhow::Result<()> {
    let password = crate::key::password(false)?;
    let signing_key = alki_bundle::keys::load(&key_file, &password)?;
    let remote = connection.remote(reference, plain_http)?;
    let signed = alki_bundle::sign::sign(&remote, &reference.tag_or_digest(), &signing_key).await?;
    print(output, &signed, |s| {
        let mut t = table(["SIGNED", "DIGEST", "TAG", "SIGNATURES"]);
        for d in &s.signatures {
            t.add_row([d.what.clone(), short(d.digest.as_str()), d.tag.clone(), d.signatures_at_tag.to_string()]);
        }
        format!("{t}\nsigned {} with key {}", s.reference, s.key_fingerprint)
    })
}

async fn list(connection: &Connection, output: Output, repository: String) -> anyhow::Result<()> {
    let bundles = connection
        .fleet()
        .await?
        .list_bundles(proto::ListBundlesRequest { repository })
        .await
        .map_err(status)?
        .into_inner()
        .bundles;
    print(output, &bundles, |bs| bundles_table(bs))
}

fn bundles_table(bundles: &[proto::Bundle]) -> String {
    let mut t = table(["REPOSITORY", "TAGS", "DIGEST", "VARIANTS", "SIZE", "SIGNED"]);
    for b in bundles {
        let variants: Vec<&str> = b.variants.iter().map(|v| v.quantization.as_str()).collect();
        // Bundles of an external registry show its host; their signatures were checked when a
        // rollout named them, and are not read again for a listing.
        let (repository, signed) = if b.registry.is_empty() {
            let signed = if b.signatures.iter().any(|s| s.verified && s.signed_digest == b.digest) {
                "verified"
            } else if b.signatures.is_empty() {
                "no"
            } else {
                "unverified"
            };
            (b.repository.clone(), signed)
        } else {
            (format!("{}/{}", b.registry, b.repository), "at rollout")
        };
        t.add_row([
            repository,
            b.tags.join(","),
            short(&b.digest),
            variants.join(","),
            bytes(b.total_size),
            signed.into(),
        ]);
    }
    t.to_string()
}
