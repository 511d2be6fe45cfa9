//! A tiny GGUF model packed as a bundle and pushed to a registry, as `alkictl bundle pack` and `bundle push`
//! would, with the `alki_bundle` library: the fixture the agent's, the controller's and the end-to-end tests
//! share.

use alki_bundle::pack::{PackOptions, pack};
use alki_bundle::{Progress, Remote};
use alki_shared::digest::Digest;
use anyhow::Context as _;

use crate::tiny_model::{TinyModelOptions, synthetic_tokenizer, write_tiny_model};

/// Packs a tiny model `tiny-<tag>` (weights from `seed`) and pushes it as `<repository>:<tag>` to the registry
/// at `registry` (plain HTTP) with the `admin` token; returns the bundle's digest.
pub async fn push_tiny_bundle(
    registry: &str,
    repository: &str,
    admin: &str,
    tag: &str,
    seed: u64,
) -> anyhow::Result<Digest> {
    push_tiny_bundle_sized(registry, repository, admin, tag, seed, 64).await
}

/// [`push_tiny_bundle`] with a vocabulary of `vocab` tokens (about `vocab` × 512 bytes of weights).
pub async fn push_tiny_bundle_sized(
    registry: &str,
    repository: &str,
    admin: &str,
    tag: &str,
    seed: u64,
    vocab: usize,
) -> anyhow::Result<Digest> {
    let work = tempfile::tempdir().context("a temporary directory")?;
    let model = work.path().join(format!("tiny-{tag}.gguf"));
    write_tiny_model(&model, &TinyModelOptions { name: format!("tiny-{tag}"), seed }, &synthetic_tokenizer(vocab))?;
    let opts = PackOptions {
        files: vec![model],
        out: work.path().join("layout"),
        name: None,
        version: None,
        license: None,
        context: 256,
        tag: tag.into(),
    };
    pack(&opts, &Progress::none()).context("packing the tiny bundle")?;
    let remote = Remote::with_token(registry.to_owned(), repository.to_owned(), Some(admin.to_owned()), true);
    let pushed = alki_bundle::push::push(&opts.out, &remote, tag, &Progress::none()).await.context("pushing it")?;
    Ok(pushed.digest)
}
