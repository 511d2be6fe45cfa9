//! Webhook delivery: one task per webhook reads the event log from the webhook's stored position and posts
//! each matching event to its URL as a signed CloudEvent, in log order, retrying with backoff until the
//! receiver answers 2xx or the event is older than the give-up age. A slow or dead receiver holds back only
//! its own webhook: the log is durable, so nothing queues in memory and no other work waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alki_shared::clock::{SharedClock, UnixMs};
use alki_shared::proto;
use alki_shared::webhook;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::cloudevent;
pub use crate::config::DeliveryConfig;
use crate::store::events::{EventQuery, WebhookRecord};
use crate::store::{Store, StoreError};

/// Events read from the log per store call.
const PAGE: usize = 100;
/// How often a delivery position is written durably at most (between, it is written without waiting for
/// the disk: after a crash a few events may be delivered again, and receivers drop them by their id).
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// What deliveries have done, for `/metrics`.
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub given_up: AtomicU64,
    /// Event to receiver's 2xx, summed, in milliseconds (with `delivered`, the mean latency).
    pub latency_ms_sum: AtomicU64,
}

/// One attempt's outcome.
#[derive(Debug)]
pub struct Attempt {
    /// The receiver's HTTP status; 0 when it did not answer.
    pub status: u16,
    pub error: Option<String>,
    pub duration: Duration,
}

impl Attempt {
    fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}

/// What every delivery task shares.
#[derive(Clone)]
struct Context {
    store: Store,
    clock: SharedClock,
    client: reqwest::Client,
    source: Arc<str>,
    config: DeliveryConfig,
    counters: Arc<DeliveryCounters>,
}

/// The running delivery tasks, one per webhook.
pub struct Deliveries {
    ctx: Context,
    stop: CancellationToken,
    tasks: Mutex<HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)>>,
}

impl Deliveries {
    /// Starts a task for every stored webhook; `source` is the CloudEvents source (the controller).
    pub fn start(
        store: Store,
        clock: SharedClock,
        source: String,
        config: DeliveryConfig,
        stop: CancellationToken,
    ) -> Result<Arc<Deliveries>, StoreError> {
        let client = crate::outbound::client(config.timeout).map_err(StoreError::Batch)?;
        let ctx = Context { store, clock, client, source: source.into(), config, counters: Arc::default() };
        let deliveries = Arc::new(Deliveries { ctx, stop, tasks: Mutex::default() });
        for record in deliveries.ctx.store.webhooks()? {
            deliveries.spawn(&record.id);
        }
        Ok(deliveries)
    }

    pub fn counters(&self) -> Arc<DeliveryCounters> {
        self.ctx.counters.clone()
    }

    /// Starts delivering to a webhook just stored.
    pub fn spawn(&self, id: &str) {
        let cancel = self.stop.child_token();
        let span = tracing::info_span!("webhook", webhook_id = %id);
        let task = tokio::spawn(tracing::Instrument::instrument(
            deliver_loop(self.ctx.clone(), id.to_owned(), cancel.clone()),
            span,
        ));
        if let Some((old, _)) = self.lock().insert(id.to_owned(), (cancel, task)) {
            old.cancel();
        }
    }

    /// Stops delivering to a removed webhook.
    pub fn stop(&self, id: &str) {
        if let Some((cancel, _)) = self.lock().remove(id) {
            cancel.cancel();
        }
    }

    /// Sends one test event to a webhook now, outside the log, signed like every delivery.
    pub async fn test(&self, record: &WebhookRecord) -> Attempt {
        let now = self.ctx.clock.now();
        let event = proto::FleetEvent {
            id: 0,
            unix_ms: now.as_millis(),
            r#type: "webhook.test".into(),
            message: format!("a test delivery to webhook {}", record.id),
            ..Default::default()
        };
        post(&self.ctx, record, &event, &format!("alki-test-{}", uuid::Uuid::new_v4().simple())).await
    }

    /// Waits for every task to end (they end with the shutdown token).
    pub async fn finish(&self) {
        let tasks: Vec<_> = self.lock().drain().map(|(_, (_, task))| task).collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)>> {
        // Inserts and removes only: a panic cannot leave the map half-changed.
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Batch(format!("a webhook store task: {e}")))?
}

/// Delivers a webhook's events until it is removed or the controller stops.
async fn deliver_loop(ctx: Context, id: String, cancel: CancellationToken) {
    let mut announced = ctx.store.subscribe_events();
    let mut last_durable = Instant::now();
    loop {
        announced.borrow_and_update();
        match deliver_page(&ctx, &id, &cancel, &mut last_durable).await {
            Ok(Page::More) => continue,
            Ok(Page::CaughtUp) => {}
            Ok(Page::Removed) => return,
            Err(error) => {
                tracing::error!(%error, "Could not read or record webhook deliveries; trying again shortly.");
                if sleep_or_cancel(&cancel, ctx.config.retry_max.min(Duration::from_secs(5))).await {
                    return;
                }
                continue;
            }
        }
        tokio::select! {
            changed = announced.changed() => if changed.is_err() { return },
            () = cancel.cancelled() => return,
        }
    }
}

enum Page {
    /// The log has more after this page.
    More,
    CaughtUp,
    Removed,
}

/// Delivers the next page of the webhook's events from its position, recording the position as it goes.
async fn deliver_page(
    ctx: &Context,
    id: &str,
    cancel: &CancellationToken,
    last_durable: &mut Instant,
) -> Result<Page, StoreError> {
    let store = ctx.store.clone();
    let wanted = id.to_owned();
    let Some(record) = blocking(move || store.webhook(&wanted)).await? else { return Ok(Page::Removed) };
    let query =
        EventQuery { after: record.delivered_through, types: record.types.clone(), limit: PAGE, ..Default::default() };
    let store = ctx.store.clone();
    let page = blocking(move || store.events(&query)).await?;
    // Events pruned from the log before this webhook got them are lost to it: counted, and passed.
    let lost = page.first.saturating_sub(record.delivered_through.saturating_add(1));
    if lost > 0 && page.first > 0 {
        tracing::warn!(lost, "Events were pruned from the log before this webhook received them.");
        ctx.counters.given_up.fetch_add(lost, Ordering::Relaxed);
        record_position(ctx, id, true, move |w| w.failed += lost).await?;
    }
    let mut answered = None;
    for event in &page.events {
        match deliver_one(ctx, &record, event, cancel).await? {
            Delivery::Taken { status, at } => answered = Some((status, at)),
            Delivery::GivenUp => answered = None,
            Delivery::Removed => return Ok(Page::Removed),
        }
    }
    let durable = last_durable.elapsed() >= DURABLE_EVERY;
    if durable {
        *last_durable = Instant::now();
    }
    // One write per page, not per event: the position (and the last answer) of everything this page delivered.
    let through = page.scanned_through;
    let recorded = record_position(ctx, id, durable, move |w| {
        w.delivered_through = w.delivered_through.max(through);
        if let Some((status, at)) = answered {
            (w.last_attempt_unix_ms, w.last_status, w.last_error, w.attempts) =
                (at.as_millis(), status, String::new(), 0);
        }
    });
    if !recorded.await? {
        return Ok(Page::Removed);
    }
    Ok(if page.scanned_through < page.last { Page::More } else { Page::CaughtUp })
}

/// How one event's delivery ended.
enum Delivery {
    /// The receiver took it (its status, when); the position is recorded with the rest of the page.
    Taken { status: u16, at: UnixMs },
    /// Too old to try again: counted as failed and passed (recorded at once).
    GivenUp,
    /// The webhook was removed (or the controller stops) meanwhile.
    Removed,
}

/// Retries one event until the receiver takes it or it is too old.
async fn deliver_one(
    ctx: &Context,
    record: &WebhookRecord,
    event: &proto::FleetEvent,
    cancel: &CancellationToken,
) -> Result<Delivery, StoreError> {
    let mut attempts: u32 = 0;
    loop {
        let attempt = post(ctx, record, event, &cloudevent::id(event)).await;
        attempts += 1;
        let now = ctx.clock.now();
        let age = now.since(UnixMs(event.unix_ms));
        let (status, error) = (attempt.status, attempt.error.clone().unwrap_or_default());
        if attempt.succeeded() {
            ctx.counters.delivered.fetch_add(1, Ordering::Relaxed);
            ctx.counters.latency_ms_sum.fetch_add(age.as_millis() as u64, Ordering::Relaxed);
            return Ok(Delivery::Taken { status, at: now });
        }
        ctx.counters.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let give_up = age >= ctx.config.give_up_after;
        if give_up {
            tracing::warn!(event_id = event.id, attempts, %error, "Giving up on an event this webhook never took.");
            ctx.counters.given_up.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::info!(event_id = event.id, attempts, %error, "A webhook delivery failed; retrying.");
        }
        let event_id = event.id;
        let kept = record_position(ctx, &record.id, give_up, move |w| {
            (w.last_attempt_unix_ms, w.last_status, w.last_error, w.attempts) =
                (now.as_millis(), status, error, attempts);
            if give_up {
                w.delivered_through = w.delivered_through.max(event_id);
                w.failed += 1;
                w.attempts = 0;
            }
        })
        .await?;
        if !kept {
            return Ok(Delivery::Removed);
        }
        if give_up {
            return Ok(Delivery::GivenUp);
        }
        if sleep_or_cancel(cancel, backoff(ctx.config, attempts)).await {
            return Ok(Delivery::Removed);
        }
    }
}

/// The wait before retry `attempts` + 1: doubling from the base, capped, with up to 25 % jitter so many
/// controllers' retries to one receiver spread out.
fn backoff(config: DeliveryConfig, attempts: u32) -> Duration {
    let doubled = config.retry_base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    let wait = doubled.min(config.retry_max);
    let jitter = rand::rng().random_range(0.0..0.25);
    wait.mul_f64(1.0 + jitter).min(config.retry_max.max(config.retry_base))
}

/// True when cancelled before the time passed.
async fn sleep_or_cancel(cancel: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = cancel.cancelled() => true,
    }
}

async fn record_position(
    ctx: &Context,
    id: &str,
    durable: bool,
    f: impl FnOnce(&mut WebhookRecord) + Send + 'static,
) -> Result<bool, StoreError> {
    let store = ctx.store.clone();
    let id = id.to_owned();
    blocking(move || store.record_delivery(&id, durable, f)).await
}

/// One signed POST of an event to the webhook's URL.
async fn post(ctx: &Context, record: &WebhookRecord, event: &proto::FleetEvent, message_id: &str) -> Attempt {
    let started = Instant::now();
    let key = match webhook::secret_key(&record.secret) {
        Ok(key) => key,
        Err(e) => return Attempt { status: 0, error: Some(e.to_string()), duration: started.elapsed() },
    };
    let body = cloudevent::document(event, message_id, &ctx.source).to_string();
    let timestamp = ctx.clock.now().as_millis() / 1000;
    let signature = webhook::sign(&key, message_id, timestamp, body.as_bytes());
    let sent = ctx
        .client
        .post(&record.url)
        .header(http::header::CONTENT_TYPE, cloudevent::CONTENT_TYPE)
        .header(webhook::ID_HEADER, message_id)
        .header(webhook::TIMESTAMP_HEADER, timestamp.to_string())
        .header(webhook::SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await;
    let (status, error) = match sent {
        Ok(response) if response.status().is_success() => (response.status().as_u16(), None),
        Ok(response) => {
            let status = response.status();
            (status.as_u16(), Some(format!("the receiver answered {status}")))
        }
        Err(e) => (0, Some(describe(&e))),
    };
    Attempt { status, error, duration: started.elapsed() }
}

/// A transport error with its causes, capped: it is stored and shown to operators.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    alki_shared::text::printable(&text, 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_longer_each_time_up_to_the_cap() {
        let config = DeliveryConfig {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ..Default::default()
        };
        let first = backoff(config, 1);
        assert!(first >= Duration::from_secs(1) && first <= Duration::from_millis(1250), "{first:?}");
        let fourth = backoff(config, 4);
        assert!(fourth >= Duration::from_secs(8) && fourth <= Duration::from_secs(10), "{fourth:?}");
        assert_eq!(backoff(config, 40), Duration::from_secs(60));
    }
}
