//! Remote diagnostics the controller asks for over the session: logs ([`logs`]) and support bundles
//! ([`bundle`]) sent in bounded, paced chunks ([`sink`]), at most [`MAX_RUNNING`] at once, each cancelled
//! by a Cancel command or the session's end; refused outright when `[diagnostics] remote_logs = false`.
//! There is no remote shell: nothing here runs what the controller sends.

pub mod bundle;
pub mod logs;
pub mod redact;
pub mod sink;
pub mod tail;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use alki_shared::proto;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::DiagnosticsConfig;
use crate::metrics::{AgentMetrics, MetricsState};
use crate::reload::ConfigState;
use crate::store::ContentStore;
use logs::{LogPlaces, Source};
use sink::{Sink, Stopped};

/// Diagnostics answers running at once; more are refused (the operator retries).
pub const MAX_RUNNING: usize = 4;

/// The caps one answer runs under, from the config as it is when the answer starts.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub bytes_per_second: u64,
    pub max_bytes: u64,
}

impl Settings {
    fn of(config: &DiagnosticsConfig) -> Settings {
        Settings { bytes_per_second: config.max_kib_per_second << 10, max_bytes: config.max_mib_per_request << 20 }
    }
}

/// What a diagnostics command asks.
pub enum Ask {
    Logs(proto::CollectLogs),
    Bundle(proto::SupportBundle),
}

/// The agent's diagnostics: where logs are, what a bundle reads, the running answers. Cheap to clone.
#[derive(Clone)]
pub struct Diagnostics {
    pub device_id: String,
    pub data_dir: PathBuf,
    pub config_file: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    /// The config at start, and reloads (the switch and caps are read when each answer starts).
    pub initial: DiagnosticsConfig,
    pub reloads: Option<watch::Receiver<ConfigState>>,
    pub places: LogPlaces,
    pub store: ContentStore,
    pub metrics_state: MetricsState,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl Diagnostics {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device_id: String,
        data_dir: PathBuf,
        config_file: Option<PathBuf>,
        labels: BTreeMap<String, String>,
        initial: DiagnosticsConfig,
        reloads: Option<watch::Receiver<ConfigState>>,
        store: ContentStore,
        metrics_state: MetricsState,
    ) -> Diagnostics {
        let places = LogPlaces::discover(data_dir.join("logs"));
        Diagnostics {
            device_id,
            data_dir,
            config_file,
            labels,
            initial,
            reloads,
            places,
            store,
            metrics_state,
            running: Arc::default(),
        }
    }

    fn config(&self) -> DiagnosticsConfig {
        match &self.reloads {
            Some(rx) => rx.borrow().config.diagnostics.clone(),
            None => self.initial.clone(),
        }
    }

    fn metrics(&self) -> Arc<AgentMetrics> {
        Arc::clone(&self.metrics_state.metrics)
    }

    /// Starts answering `command_id` on its own task, sending up `out`; a refusal (switched off, too many
    /// running) is the answer's only, last chunk.
    pub fn start(&self, command_id: &str, ask: Ask, out: mpsc::Sender<proto::AgentMessage>) {
        let config = self.config();
        let cancel = CancellationToken::new();
        let sink = Sink::new(command_id.to_owned(), out, cancel.clone(), &Settings::of(&config), self.metrics());
        let refusal = if !config.remote_logs {
            Some((
                format!(
                    "device {} refuses remote diagnostics: its agent.toml says [diagnostics] remote_logs = false; \
                 read its logs on the device, or set remote_logs = true there",
                    self.device_id
                ),
                true,
            ))
        } else {
            self.register(command_id, &cancel).err().map(|e| (e, false))
        };
        if let Some((error, refused)) = refusal {
            tracing::warn!(command_id, %error, "Diagnostics refused.");
            tokio::spawn(sink.finish(Some(error), refused, false).in_current_span());
            return;
        }
        let (this, id) = (self.clone(), command_id.to_owned());
        let span = tracing::info_span!("diagnostics", command_id, kind = ask.label());
        tokio::spawn(
            async move {
                this.metrics().diagnostics_running(true);
                this.answer(ask, sink).await;
                this.metrics().diagnostics_running(false);
                this.running.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            }
            .instrument(span),
        );
    }

    /// Notes a running answer, unless [`MAX_RUNNING`] are.
    fn register(&self, command_id: &str, cancel: &CancellationToken) -> Result<(), String> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.len() >= MAX_RUNNING {
            return Err(format!(
                "the device is already sending {MAX_RUNNING} diagnostics answers; retry when one ends"
            ));
        }
        running.insert(command_id.to_owned(), cancel.clone());
        Ok(())
    }

    /// Cancels a running answer (its sender ends it with a last chunk).
    pub fn cancel(&self, command_id: &str) {
        if let Some(cancel) = self.running.lock().unwrap_or_else(PoisonError::into_inner).get(command_id) {
            tracing::info!(command_id, "Diagnostics cancelled by the controller.");
            cancel.cancel();
        }
    }

    /// Cancels every running answer: the session they answer ended.
    pub fn cancel_all(&self) {
        for cancel in self.running.lock().unwrap_or_else(PoisonError::into_inner).values() {
            cancel.cancel();
        }
    }

    async fn answer(&self, ask: Ask, mut sink: Sink) {
        let outcome = match ask {
            Ask::Logs(logs) => self.send_logs(&logs, &mut sink).await,
            Ask::Bundle(bundle) => self.send_bundle(&bundle, &mut sink).await,
        };
        tracing::info!(bytes = sink.sent, outcome = ?outcome, "Diagnostics answer ended.");
        match outcome {
            Ok(()) => {
                let cut = sink.cut;
                sink.finish(None, false, cut).await
            }
            Err(Ended::Stopped(Stopped::Capped)) => sink.finish(None, false, true).await,
            Err(Ended::Stopped(Stopped::Cancelled)) => sink.finish(Some("cancelled".into()), false, false).await,
            Err(Ended::Stopped(Stopped::SessionGone)) => {}
            Err(Ended::Failed(error)) => sink.finish(Some(error), false, false).await,
        }
    }

    async fn send_logs(&self, ask: &proto::CollectLogs, sink: &mut Sink) -> Result<(), Ended> {
        let sources = Source::parse(&ask.source).map_err(Ended::Failed)?;
        let since = (ask.since_seconds > 0)
            .then(|| SystemTime::now().checked_sub(Duration::from_secs(ask.since_seconds)))
            .flatten();
        sink.limit(ask.max_bytes);
        let request = logs::Request { sources, since, follow: ask.follow };
        let budget = if ask.max_bytes > 0 { ask.max_bytes } else { Settings::of(&self.config()).max_bytes };
        logs::send_logs(&self.places, &request, sink, budget).await.map_err(Ended::Stopped)
    }

    async fn send_bundle(&self, ask: &proto::SupportBundle, sink: &mut Sink) -> Result<(), Ended> {
        let inputs = self.bundle_inputs(ask).await;
        let built = tokio::task::spawn_blocking(move || bundle::build(&inputs))
            .await
            .map_err(|e| Ended::Failed(format!("building the support bundle failed: {e}")))?
            .map_err(|e| Ended::Failed(format!("cannot write the support bundle under the data dir: {e}")))?;
        let path = built.path().to_owned();
        let len = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
        let mut offset = 0u64;
        while offset < len {
            let piece = read_piece(path.clone(), offset).await.map_err(Ended::Failed)?;
            if piece.is_empty() {
                break;
            }
            offset += piece.len() as u64;
            sink.send("bundle", &piece, false).await.map_err(|stopped| match stopped {
                Stopped::Capped => Ended::Failed(
                    "the support bundle is larger than the device's cap (diagnostics.max_mib_per_request); \
                     ask for a smaller log tail (--log-tail) or raise the cap"
                        .into(),
                ),
                other => Ended::Stopped(other),
            })?;
        }
        Ok(())
    }

    async fn bundle_inputs(&self, ask: &proto::SupportBundle) -> bundle::Inputs {
        let (data_dir, labels) = (self.data_dir.clone(), self.labels.clone());
        let inventory = tokio::task::spawn_blocking(move || crate::inventory::collect(&data_dir, &labels))
            .await
            .unwrap_or_default();
        let store_listing = match self.store.list().await {
            Ok(mut blobs) => {
                blobs.sort_by(|a, b| a.digest.as_str().cmp(b.digest.as_str()));
                blobs
                    .iter()
                    .map(|b| format!("{} {} {}\n", b.digest, b.size, humantime::format_rfc3339_seconds(b.last_used)))
                    .collect()
            }
            Err(e) => format!("cannot list the content store: {e}\n"),
        };
        let metrics = crate::metrics::render(&self.metrics_state, None);
        let log_tail = if ask.log_tail_bytes > 0 { ask.log_tail_bytes.min(16 << 20) } else { bundle::DEFAULT_LOG_TAIL };
        bundle::Inputs {
            device_id: self.device_id.clone(),
            data_dir: self.data_dir.clone(),
            config_file: self.config_file.clone(),
            inventory,
            store_listing,
            metrics,
            places: self.places.clone(),
            log_tail,
        }
    }
}

/// How an answer ended early.
#[derive(Debug)]
enum Ended {
    Stopped(Stopped),
    Failed(String),
}

impl Ask {
    fn label(&self) -> &'static str {
        match self {
            Ask::Logs(_) => "logs",
            Ask::Bundle(_) => "support_bundle",
        }
    }
}

async fn read_piece(path: PathBuf, offset: u64) -> Result<Vec<u8>, String> {
    tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        use std::io::{Read as _, Seek as _};
        let mut file = std::fs::File::open(&path)?;
        file.seek(std::io::SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(sink::MAX_CHUNK);
        file.take(sink::MAX_CHUNK as u64).read_to_end(&mut buf)?;
        Ok(buf)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot read the support bundle back: {e}"))
}
