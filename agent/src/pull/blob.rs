//! Blobs from a registry into the content store: streamed (never held in memory), resumed with a Range
//! request from the bytes already on disk, retried when the connection fails (not when the content is wrong),
//! paced to a bandwidth limit, verified against their digest and size before they become blobs; the disk
//! check a pull makes before it starts, and progress reported at most once a [`PROGRESS_INTERVAL`].

use std::path::Path;
use std::time::Duration;

use alki_shared::oci::Descriptor;
use futures::StreamExt;
use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::errors::OciDistributionError;
use tokio::time::Instant;

use super::error::{PullError, Pushed};
use super::registry::RegistryAccess;
use crate::reference::{BundleLocation, short};
use crate::store::{ContentStore, PartialBlob, StoreError};

/// How often progress is reported at most while bytes flow.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts per blob when the connection fails (not when content is wrong).
const BLOB_ATTEMPTS: u32 = 3;

/// Bytes of a pull done so far out of the bytes it needs (already stored bytes count as done).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PullProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Reports the progress of a pull: bytes fetched on top of `base` already stored, out of `total`, at most
/// once a [`PROGRESS_INTERVAL`] unless forced.
pub struct Reporter<'a> {
    progress: &'a mut (dyn FnMut(PullProgress) + Send),
    last: Option<Instant>,
    base: u64,
    total: u64,
}

impl<'a> Reporter<'a> {
    pub fn new(progress: &'a mut (dyn FnMut(PullProgress) + Send), base: u64, total: u64) -> Reporter<'a> {
        Reporter { progress, last: None, base, total }
    }

    pub fn report(&mut self, fetched: u64, force: bool) {
        let due = self.last.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if force || due {
            self.last = Some(Instant::now());
            (self.progress)(PullProgress { bytes_done: self.base.saturating_add(fetched), bytes_total: self.total });
        }
    }
}

/// True for the error oci-client's verifying stream yields at its end when the digest does not match:
/// the store hashes the bytes itself and reports the mismatch with both digests.
pub fn is_stream_digest_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
}

/// Streams one blob into the store, resuming with a Range request from the bytes already on disk (after a
/// broken connection, or from an earlier pull the agent did not finish), retrying a few times when the
/// connection fails. The whole file is verified before it becomes a blob; a resumed file that does not
/// verify is downloaded once more from zero.
pub async fn fetch_blob(
    registry: &RegistryAccess,
    store: &ContentStore,
    artifact: &BundleLocation,
    descriptor: &Descriptor,
    pace: &mut Option<Pace>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), PullError> {
    let reference = registry.reference(artifact, &descriptor.digest);
    // Authentication is stored per registry by the first manifest request; make sure it is there.
    registry.client().store_auth_if_needed(reference.resolve_registry(), &registry.auth(artifact)).await;
    let partial = store.partial(&descriptor.digest, descriptor.size).await.map_err(PullError::Store)?;
    if !partial.is_empty() {
        tracing::info!(layer = %descriptor.digest, bytes_on_disk = partial.len(), "Resuming the layer's download.");
    }
    let download = Download { registry, artifact, descriptor, reference, partial, attempt: 0, fresh_retry: true };
    download.run(pace, progress).await
}

/// A blob's body as the registry streams it.
type ByteStream = futures::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>;

/// What a download does after an attempt.
enum Next {
    Done,
    /// Try again after a pause (the connection failed or the body ended early).
    RetryAfterPause,
    /// Try again at once (from zero, after a resumed file did not verify).
    RetryNow,
}

/// One blob's download in progress: the partial file and the attempts made.
struct Download<'a> {
    registry: &'a RegistryAccess,
    artifact: &'a BundleLocation,
    descriptor: &'a Descriptor,
    reference: Reference,
    partial: PartialBlob,
    attempt: u32,
    /// A resumed file that does not verify is downloaded once from zero before the mismatch is an error.
    fresh_retry: bool,
}

/// Why a download stops: the error, and whether the partial file goes with it (its bytes can never become
/// the blob) or stays for the next pull to resume from.
enum Stop {
    Keep(PullError),
    Discard(PullError),
}

impl From<PullError> for Stop {
    fn from(e: PullError) -> Self {
        Stop::Keep(e)
    }
}

impl Download<'_> {
    async fn run(mut self, pace: &mut Option<Pace>, progress: &mut (dyn FnMut(u64) + Send)) -> Result<(), PullError> {
        loop {
            self.attempt += 1;
            let offset = self.partial.len();
            let next = match self.receive(offset, pace, progress).await {
                Ok(Some(next)) => Ok(next),
                Ok(None) => self.finish(offset).await,
                Err(stop) => Err(stop),
            };
            match next {
                Ok(Next::Done) => return Ok(()),
                Ok(Next::RetryAfterPause) => tokio::time::sleep(self.retry_pause()).await,
                Ok(Next::RetryNow) => {}
                Err(Stop::Keep(e)) => return Err(e),
                Err(Stop::Discard(e)) => {
                    self.partial.discard().await;
                    return Err(e);
                }
            }
        }
    }

    fn last_attempt(&self) -> bool {
        self.attempt >= BLOB_ATTEMPTS
    }

    fn retry_pause(&self) -> Duration {
        Duration::from_millis(500 * 2u64.pow(self.attempt.min(8) - 1))
    }

    fn registry_name(&self) -> String {
        self.registry.registry_of(self.artifact).to_owned()
    }

    /// Streams the bytes after `offset` into the partial file (nothing when they are all there). Some: the
    /// attempt broke off and is worth another one.
    async fn receive(
        &mut self,
        offset: u64,
        pace: &mut Option<Pace>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<Option<Next>, Stop> {
        if offset >= self.descriptor.size {
            return Ok(None);
        }
        let (stream, whole) = match self.request(offset).await? {
            Ok(response) => response,
            Err(next) => return Ok(Some(next)),
        };
        if whole && offset > 0 {
            tracing::info!(layer = %self.descriptor.digest, "The registry ignored the range; downloading the layer from the start.");
            self.partial.restart().await.map_err(PullError::Store)?;
        }
        let bytes = stream.take_while(|item| {
            let keep = !matches!(item, Err(e) if is_stream_digest_error(e));
            std::future::ready(keep)
        });
        let appended = self.partial.append(throttled(bytes, pace), &mut *progress).await;
        self.after_append(appended)
    }

    /// Asks for the bytes after `offset`: the body and whether the registry answered with the whole blob, or
    /// the retry to make when the request failed for a reason that may pass.
    async fn request(&mut self, offset: u64) -> Result<Result<(ByteStream, bool), Next>, Stop> {
        // Only the digest is passed: descriptor `urls` are never followed. Always a range request, even from
        // byte 0: oci-client hashes a whole-blob (200) stream itself, on the task that receives it, which
        // would hash every byte twice (the store hashes what it writes, and that is what is checked). A
        // registry that ignores ranges answers 200 and gets the double check.
        let digest = self.descriptor.digest.as_str();
        let response = self.registry.client().pull_blob_stream_partial(&self.reference, digest, offset, None).await;
        match response {
            Ok(BlobResponse::Full(s)) => Ok(Ok((s.stream, true))),
            Ok(BlobResponse::Partial(s)) => Ok(Ok((s.stream, false))),
            Err(OciDistributionError::ServerError { code: 416, .. }) if offset > 0 => {
                // The registry has no bytes past those already here: its copy is shorter than the descriptor
                // says (truncated), which no retry changes.
                Err(Stop::Discard(PullError::LayerSize {
                    layer: self.descriptor.digest.clone(),
                    expected: self.descriptor.size,
                    actual: offset,
                    more: false,
                    pushed: Pushed::Bundle,
                }))
            }
            Err(source) if is_transient(&source) && !self.last_attempt() => {
                tracing::warn!(layer = %self.descriptor.digest, attempt = self.attempt, error = %source, "Blob request failed; retrying.");
                Ok(Err(Next::RetryAfterPause))
            }
            Err(source) => Err(Stop::Keep(PullError::Registry {
                what: format!("layer {}", short(&self.descriptor.digest)),
                registry: self.registry_name(),
                source: Box::new(source),
                pushed: Pushed::Bundle,
            })),
        }
    }

    /// What a transfer into the partial file leads to: None to finish the file, Some to try again.
    fn after_append(&self, appended: Result<(), StoreError>) -> Result<Option<Next>, Stop> {
        let layer = self.descriptor.digest.clone();
        match appended {
            Ok(()) => Ok(None),
            Err(StoreError::Source { source, .. }) if !self.last_attempt() => {
                tracing::warn!(%layer, attempt = self.attempt, bytes_on_disk = self.partial.len(), error = %source, "Blob transfer broke off; resuming.");
                Ok(Some(Next::RetryAfterPause))
            }
            Err(StoreError::Source { source, .. }) => Err(Stop::Keep(PullError::Transfer {
                layer,
                registry: self.registry_name(),
                bytes_on_disk: self.partial.len(),
                size: self.descriptor.size,
                source,
            })),
            Err(StoreError::SizeMismatch { digest, expected, actual, more: true }) => {
                Err(Stop::Discard(PullError::LayerSize {
                    layer: digest,
                    expected,
                    actual,
                    more: true,
                    pushed: Pushed::Bundle,
                }))
            }
            // The partial bytes go: a full disk would break the state file, logs and the serving model.
            Err(e) if e.is_disk_full() => {
                Err(Stop::Discard(PullError::DiskFullWriting { layer, written: self.partial.len(), error: e }))
            }
            Err(e) => Err(Stop::Keep(PullError::Store(e))),
        }
    }

    /// Verifies the complete file and makes it a blob; a body that ended early, or a resumed file that did
    /// not verify, is tried again.
    async fn finish(&mut self, offset: u64) -> Result<Next, Stop> {
        match self.partial.finish().await {
            Ok(_) => Ok(Next::Done),
            Err(StoreError::SizeMismatch { .. }) if !self.last_attempt() => {
                // The body ended early without an error: resume from where it stopped.
                tracing::warn!(layer = %self.descriptor.digest, attempt = self.attempt, bytes_on_disk = self.partial.len(), "Blob transfer ended early; resuming.");
                Ok(Next::RetryAfterPause)
            }
            Err(StoreError::SizeMismatch { digest, expected, actual, more }) => {
                Err(Stop::Keep(PullError::LayerSize { layer: digest, expected, actual, more, pushed: Pushed::Bundle }))
            }
            Err(StoreError::DigestMismatch { .. }) if offset > 0 && self.fresh_retry => {
                // Bytes kept from an earlier attempt may be what was wrong (a power cut): try once from zero.
                tracing::warn!(layer = %self.descriptor.digest, "The resumed layer did not verify; downloading it again from the start.");
                self.fresh_retry = false;
                self.attempt = self.attempt.min(BLOB_ATTEMPTS - 1);
                Ok(Next::RetryNow)
            }
            Err(StoreError::DigestMismatch { expected, actual }) => {
                Err(Stop::Keep(PullError::LayerDigest { layer: expected, actual, pushed: Pushed::Bundle }))
            }
            Err(e) => Err(Stop::Keep(PullError::Store(e))),
        }
    }
}

/// Request failures that may pass: the connection, or the registry's own trouble (5xx).
fn is_transient(source: &OciDistributionError) -> bool {
    matches!(source, OciDistributionError::RequestError(_) | OciDistributionError::IoError(_))
        || matches!(source, OciDistributionError::ServerError { code, .. } if *code >= 500)
}

/// A download rate limit: after `sent` bytes, the transfer may not be ahead of `sent / rate` seconds since
/// it started.
#[derive(Clone, Debug)]
pub struct Pace {
    rate: u64,
    started: Option<Instant>,
    sent: u64,
}

impl Pace {
    pub fn new(bytes_per_second: u64) -> Pace {
        Pace { rate: bytes_per_second.max(1), started: None, sent: 0 }
    }

    /// How long to wait after `n` more bytes arrived at `now`, to stay under the rate.
    pub fn after(&mut self, n: u64, now: Instant) -> Duration {
        let started = *self.started.get_or_insert(now);
        self.sent = self.sent.saturating_add(n);
        let due = started + Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        due.saturating_duration_since(now)
    }
}

/// `stream`, slowed down to `pace` (unchanged without one). Waits between chunks, so memory stays bounded
/// by one chunk and the TCP window throttles the sender.
pub fn throttled<'a, S>(
    stream: S,
    pace: &'a mut Option<Pace>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + 'a
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + 'a,
{
    stream.then(move |item| {
        let wait = match (&item, pace.as_mut()) {
            (Ok(chunk), Some(pace)) => pace.after(chunk.len() as u64, Instant::now()),
            _ => Duration::ZERO,
        };
        async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            item
        }
    })
}

/// Refuses a pull that needs `needed` more bytes on the disk of `dir` when fewer than that plus `reserve`
/// are free.
pub async fn check_disk(dir: &Path, needed: u64, reserve: u64) -> Result<(), PullError> {
    if needed == 0 {
        return Ok(());
    }
    let probe = dir.to_owned();
    let space = tokio::task::spawn_blocking(move || crate::inventory::disk_space(&probe)).await.ok().flatten();
    match space {
        Some((_, available)) if available < needed.saturating_add(reserve) => {
            Err(PullError::DiskFull { needed, reserve, available, dir: dir.to_owned() })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_holds_the_transfer_to_the_rate() {
        let start = Instant::now();
        let mut pace = Pace::new(1000);
        assert_eq!(pace.after(500, start), Duration::from_millis(500), "half a second's worth at once");
        assert_eq!(pace.after(500, start + Duration::from_millis(2000)), Duration::ZERO, "behind: no wait");
        assert_eq!(pace.after(1000, start + Duration::from_millis(2000)), Duration::from_millis(0));
        assert_eq!(pace.after(1000, start + Duration::from_millis(2000)), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_stream_takes_at_least_size_over_rate() {
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
            (0..10).map(|_| Ok(bytes::Bytes::from(vec![0u8; 100_000]))).collect();
        let mut pace = Some(Pace::new(500_000));
        let started = Instant::now();
        let total: usize = throttled(futures::stream::iter(chunks), &mut pace)
            .map(|c| c.map(|c| c.len()).unwrap_or(0))
            .fold(0, |a, b| async move { a + b })
            .await;
        assert_eq!(total, 1_000_000);
        // The paused clock advances only by the waits: 1 MB at 500 kB/s is 2 s.
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}
