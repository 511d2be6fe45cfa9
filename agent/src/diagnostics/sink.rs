//! Sending one diagnostics answer up the session: pieces of at most [`MAX_CHUNK`] bytes, zstd-framed for
//! logs, paced to the configured bytes per second, cut at the request's byte cap, stopped by a cancel or
//! the session ending, and always closed by a last chunk saying how it ended.

use std::time::Duration;

use alki_shared::proto::{self, agent_message};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest piece of text one chunk carries (uncompressed); the controller's session message limit is 1 MiB
/// and zstd can grow incompressible input slightly.
pub const MAX_CHUNK: usize = 512 * 1024;
/// zstd level for log frames: fast, and logs still shrink several times.
const ZSTD_LEVEL: i32 = 1;

/// Why an answer stopped before its end.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The operator cancelled it (or the controller did, its caller gone).
    Cancelled,
    /// The session ended: nobody reads the answer any more.
    SessionGone,
    /// The request's byte cap is reached.
    Capped,
}

/// A token bucket of bytes: sending waits until the rate allows it (bursts up to one second's worth).
#[derive(Debug)]
pub struct Pacer {
    per_second: f64,
    allowance: f64,
    last: Instant,
}

impl Pacer {
    pub fn new(bytes_per_second: u64) -> Pacer {
        let per_second = bytes_per_second.max(1) as f64;
        Pacer { per_second, allowance: per_second, last: Instant::now() }
    }

    /// How long to wait before `n` more bytes may go (and counts them as gone).
    pub fn delay_for(&mut self, n: usize, now: Instant) -> Duration {
        self.allowance =
            (self.allowance + now.duration_since(self.last).as_secs_f64() * self.per_second).min(self.per_second);
        self.last = now;
        self.allowance -= n as f64;
        if self.allowance >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.allowance / self.per_second) }
    }
}

/// One answer's way up.
pub struct Sink {
    pub command_id: String,
    out: mpsc::Sender<proto::AgentMessage>,
    cancel: CancellationToken,
    pacer: Pacer,
    seq: u64,
    /// Bytes (uncompressed) this answer may still send.
    left: u64,
    pub sent: u64,
    /// Something older was left out to stay within a source's share of the cap (said in the last chunk).
    pub cut: bool,
    metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
}

impl Sink {
    pub fn new(
        command_id: String,
        out: mpsc::Sender<proto::AgentMessage>,
        cancel: CancellationToken,
        settings: &super::Settings,
        metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
    ) -> Sink {
        Sink {
            command_id,
            out,
            cancel,
            pacer: Pacer::new(settings.bytes_per_second),
            seq: 0,
            left: settings.max_bytes,
            sent: 0,
            cut: false,
            metrics,
        }
    }

    /// Lowers the byte cap to what the request asked for (0: the device's cap).
    pub fn limit(&mut self, max_bytes: u64) {
        if max_bytes > 0 {
            self.left = self.left.min(max_bytes);
        }
    }

    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Sends `bytes` of `source` as zstd frames (logs) or as they are (a support bundle's file), in pieces;
    /// what goes past the cap is left out and reported as [`Stopped::Capped`].
    pub async fn send(&mut self, source: &str, bytes: &[u8], zstd_frame: bool) -> Result<(), Stopped> {
        for piece in bytes.chunks(MAX_CHUNK) {
            let fits = piece.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
            if fits > 0 {
                self.send_piece(source, &piece[..fits], zstd_frame).await?;
            }
            if fits < piece.len() {
                return Err(Stopped::Capped);
            }
        }
        Ok(())
    }

    async fn send_piece(&mut self, source: &str, piece: &[u8], zstd_frame: bool) -> Result<(), Stopped> {
        let wait = self.pacer.delay_for(piece.len(), Instant::now());
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return Err(Stopped::Cancelled),
            }
        }
        let data = if zstd_frame {
            // A frame of at most MAX_CHUNK bytes compresses in a few milliseconds; an error is memory only.
            zstd::bulk::compress(piece, ZSTD_LEVEL).map_err(|_| Stopped::SessionGone)?
        } else {
            piece.to_vec()
        };
        let chunk = proto::DiagnosticChunk {
            command_id: self.command_id.clone(),
            seq: self.seq,
            source: source.to_owned(),
            uncompressed_len: piece.len() as u64,
            data,
            zstd_frame,
            ..Default::default()
        };
        self.push(chunk).await?;
        self.left -= piece.len() as u64;
        self.sent += piece.len() as u64;
        self.metrics.diagnostic_bytes(source, piece.len() as u64);
        Ok(())
    }

    async fn push(&mut self, chunk: proto::DiagnosticChunk) -> Result<(), Stopped> {
        self.seq += 1;
        let message = proto::AgentMessage { msg: Some(agent_message::Msg::Diagnostic(chunk)) };
        tokio::select! {
            sent = self.out.send(message) => sent.map_err(|_| Stopped::SessionGone),
            _ = self.cancel.cancelled() => Err(Stopped::Cancelled),
        }
    }

    /// The last chunk: an error (or refusal) and whether the cap cut the answer. A cancelled answer ends too,
    /// so the controller's relay can let its caller go at once.
    pub async fn finish(self, error: Option<String>, refused: bool, truncated: bool) {
        let chunk = proto::DiagnosticChunk {
            command_id: self.command_id.clone(),
            seq: self.seq,
            last: true,
            error: error.unwrap_or_default(),
            refused,
            truncated,
            ..Default::default()
        };
        let message = proto::AgentMessage { msg: Some(agent_message::Msg::Diagnostic(chunk)) };
        // Bounded: a session that does not take it within this ends anyway.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.out.send(message)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_allows_a_second_of_burst_then_the_rate() {
        let start = Instant::now();
        let mut pacer = Pacer { per_second: 1000.0, allowance: 1000.0, last: start };
        assert_eq!(pacer.delay_for(1000, start), Duration::ZERO);
        assert_eq!(pacer.delay_for(500, start), Duration::from_millis(500));
        assert_eq!(pacer.delay_for(0, start + Duration::from_millis(500)), Duration::ZERO);
    }
}
