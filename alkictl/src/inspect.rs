//! `alkictl bundle inspect DIR|REFERENCE`: a packed layout or a bundle in a registry, with its signatures
//! checked against the keys given, as a table or JSON.

use std::path::{Path, PathBuf};

use alki_bundle::BundleRef;
use alki_bundle::inspect::{Inspected, Target};
use alki_shared::signing::{self, PublicKey};
use clap::Args;

use crate::connection::Connection;
use crate::output::{Output, bytes, print, short, table};

#[derive(Args)]
pub struct InspectArgs {
    /// An OCI layout directory, or [REGISTRY/]REPOSITORY[:TAG] / [REGISTRY/]REPOSITORY@sha256:... (any
    /// reference alkictl printed; without a registry, in --registry).
    target: String,
    /// Public keys to verify signatures with (repeatable).
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// Talk plain HTTP to the registry. Never use across a network you do not trust.
    #[arg(long)]
    insecure_plain_http: bool,
}

/// Runs `alkictl bundle inspect`.
pub async fn run(connection: &Connection, output: Output, args: InspectArgs) -> anyhow::Result<()> {
    let keys = args.keys.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let target = target(connection, &args.target, args.insecure_plain_http)?;
    let report = alki_bundle::inspect::inspect(target, &keys).await?;
    print(output, &report, render)
}

/// An existing directory is a layout; anything else a reference.
fn target(connection: &Connection, text: &str, plain_http: bool) -> anyhow::Result<Target> {
    if Path::new(text).is_dir() {
        return Ok(Target::Layout(PathBuf::from(text)));
    }
    let reference: BundleRef = text.parse()?;
    let remote = connection.remote(&reference, plain_http)?;
    Ok(Target::Registry { remote, tag_or_digest: reference.tag_or_digest() })
}

/// The table for people.
pub fn render(r: &Inspected) -> String {
    let mut out = format!("bundle {} in {} ({})\n", r.digest, r.source, r.media_type);
    let mut t = table(["VARIANT", "QUANT", "ARCH", "PARAMS", "CONTEXT", "WEIGHTS", "MEMORY", "LAYERS"]);
    for v in &r.variants {
        t.add_row([
            short(v.digest.as_str()),
            v.quantization.clone(),
            v.architecture.clone(),
            v.parameters.to_string(),
            v.context_length.to_string(),
            bytes(v.weights_bytes),
            bytes(v.memory_bytes),
            v.layers.iter().map(|l| l.title.as_str()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" "),
        ]);
    }
    out.push_str(&t.to_string());
    out.push('\n');
    if r.signatures.is_empty() {
        out.push_str("signatures: none found (a packed directory holds none; sign with `alkictl bundle sign`)\n");
    } else {
        let mut t = table(["SIGNED", "DIGEST", "KEY", "VERIFIED", "PROBLEM"]);
        for s in &r.signatures {
            t.add_row([
                s.of.clone(),
                short(s.digest.as_str()),
                s.check.key_fingerprint.as_deref().map(signing::short_fingerprint).unwrap_or_else(|| "-".into()),
                if s.check.verified { "yes".into() } else { "no".into() },
                s.check.problem.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if r.keys.is_empty() && !r.signatures.is_empty() {
        out.push_str("no --key given: signatures were read but none could be verified\n");
    }
    out.push_str(if r.verified { "verified: yes" } else { "verified: no" });
    out
}
