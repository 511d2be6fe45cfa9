//! `alkictl events` (the fleet's event log: list, or follow as it happens) and `alkictl webhooks` (where the
//! events are delivered: list with delivery state, add, remove, test).

use std::path::PathBuf;

use alki_shared::proto;
use alki_shared::text::printable;
use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;

use crate::connection::{Connection, status};
use crate::output::{Output, print, rfc3339, table};

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Events of the log, oldest first; `--follow` keeps printing new ones as they happen (Ctrl-C stops).
    List {
        /// Only events after this id (resume where a previous run stopped).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long)]
        rollout: Option<String>,
        #[arg(long)]
        device: Option<String>,
        /// Type prefix, repeatable: `rollout.`, `rollout.class_halted`, `device.offline`.
        #[arg(long = "type")]
        types: Vec<String>,
        /// At most this many (default and maximum 1000; ignored with --follow).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Keep following: each new event is printed as it is committed (JSON: one object per line).
        #[arg(long)]
        follow: bool,
        /// The latest events, newest first (e.g. a device's recent history: `--device pi-1 --newest --limit 20`).
        #[arg(long, conflicts_with = "follow")]
        newest: bool,
    },
}

#[derive(Subcommand)]
pub enum WebhooksCmd {
    /// Webhooks with their delivery state: delivered through which event, pending, failed, last answer.
    List,
    /// Delivers every event (or those of `--type` prefixes) to URL as a signed CloudEvent (admin only).
    Add {
        url: String,
        /// Type prefix, repeatable (default: every event).
        #[arg(long = "type")]
        types: Vec<String>,
        /// A file holding the signing secret (`whsec_` + base64); default: the controller makes one and
        /// prints it once.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Allow a plain `http://` receiver (the events then cross the network unencrypted).
        #[arg(long)]
        insecure_http: bool,
        /// Deliver the whole log kept so far, not only events from now on.
        #[arg(long)]
        from_start: bool,
    },
    /// Stops delivering to a webhook and forgets it (admin only).
    Remove { id: String },
    /// Sends one signed test event now and shows what the receiver answered (admin only).
    Test { id: String },
}

#[derive(Serialize)]
struct EventView {
    id: u64,
    time: String,
    unix_ms: i64,
    r#type: String,
    rollout_id: String,
    device_id: String,
    message: String,
    pending_webhooks: Vec<String>,
}

impl From<proto::FleetEvent> for EventView {
    fn from(e: proto::FleetEvent) -> Self {
        EventView {
            id: e.id,
            time: rfc3339(e.unix_ms),
            unix_ms: e.unix_ms,
            r#type: e.r#type,
            rollout_id: e.rollout_id,
            device_id: e.device_id,
            message: e.message,
            pending_webhooks: e.pending_webhooks,
        }
    }
}

fn event_row(v: &EventView) -> [String; 6] {
    let subject = if v.rollout_id.is_empty() { v.device_id.clone() } else { v.rollout_id.clone() };
    let delivery = if v.pending_webhooks.is_empty() { "delivered".to_owned() } else { v.pending_webhooks.join(",") };
    // Messages carry text devices and operators sent: never let a control character reach the terminal.
    [v.id.to_string(), v.time.clone(), v.r#type.clone(), printable(&subject, 64), printable(&v.message, 160), delivery]
}

const EVENT_COLUMNS: [&str; 6] = ["ID", "TIME", "TYPE", "ROLLOUT/DEVICE", "MESSAGE", "PENDING"];

pub async fn run_events(connection: &Connection, output: Output, cmd: EventsCmd) -> anyhow::Result<()> {
    let EventsCmd::List { after, rollout, device, types, limit, follow, newest } = cmd;
    let request = proto::ListEventsRequest {
        after_event_id: after,
        rollout_id: rollout.unwrap_or_default(),
        device_id: device.unwrap_or_default(),
        types,
        limit,
        newest_first: newest,
    };
    let mut client = connection.events().await?;
    if follow {
        return follow_events(&mut client, output, request).await;
    }
    let events = client.list_events(request).await.map_err(status)?.into_inner().events;
    let views: Vec<EventView> = events.into_iter().map(EventView::from).collect();
    print(output, &views, |views| {
        let mut t = table(EVENT_COLUMNS);
        for v in views {
            t.add_row(event_row(v));
        }
        t.to_string()
    })
}

/// Prints events as the controller streams them, until Ctrl-C or the controller ends the stream.
async fn follow_events(
    client: &mut crate::connection::Events,
    output: Output,
    request: proto::ListEventsRequest,
) -> anyhow::Result<()> {
    let mut stream = client.watch_events(request).await.map_err(status)?.into_inner();
    loop {
        let next = tokio::select! {
            next = stream.message() => next.map_err(status)?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(event) = next else { return Ok(()) };
        let view = EventView::from(event);
        match output {
            Output::Json => println!("{}", serde_json::to_string(&view)?),
            Output::Table => println!("{}", event_row(&view).join("  ")),
        }
    }
}

#[derive(Serialize)]
struct WebhookView {
    id: String,
    url: String,
    types: Vec<String>,
    created: String,
    delivered_through: u64,
    pending: u64,
    failed: u64,
    last_attempt: String,
    last_status: u32,
    last_error: String,
    attempts: u32,
}

impl From<proto::Webhook> for WebhookView {
    fn from(w: proto::Webhook) -> Self {
        WebhookView {
            id: w.id,
            url: w.url,
            types: w.types,
            created: rfc3339(w.created_unix_ms),
            delivered_through: w.delivered_through,
            pending: w.pending,
            failed: w.failed,
            last_attempt: if w.last_attempt_unix_ms > 0 { rfc3339(w.last_attempt_unix_ms) } else { String::new() },
            last_status: w.last_status,
            last_error: w.last_error,
            attempts: w.attempts,
        }
    }
}

pub async fn run_webhooks(connection: &Connection, output: Output, cmd: WebhooksCmd) -> anyhow::Result<()> {
    let mut client = connection.events().await?;
    match cmd {
        WebhooksCmd::List => {
            let hooks = client.list_webhooks(proto::ListWebhooksRequest {}).await.map_err(status)?.into_inner();
            let views: Vec<WebhookView> = hooks.webhooks.into_iter().map(WebhookView::from).collect();
            print(output, &views, |views| {
                let mut t = table(["ID", "URL", "TYPES", "DELIVERED THROUGH", "PENDING", "FAILED", "LAST ANSWER"]);
                for v in views {
                    let last = match (v.last_status, v.last_error.as_str()) {
                        (_, "") if v.last_attempt.is_empty() => "-".to_owned(),
                        (status, "") => format!("{status} at {}", v.last_attempt),
                        (_, error) => format!("{} (attempt {}): {}", v.last_attempt, v.attempts, printable(error, 120)),
                    };
                    let types = if v.types.is_empty() { "all".to_owned() } else { v.types.join(",") };
                    let row = [&v.id, &v.url, &types].map(|c| printable(c, 120));
                    t.add_row([
                        row[0].clone(),
                        row[1].clone(),
                        row[2].clone(),
                        v.delivered_through.to_string(),
                        v.pending.to_string(),
                        v.failed.to_string(),
                        last,
                    ]);
                }
                t.to_string()
            })
        }
        WebhooksCmd::Add { url, types, secret_file, insecure_http, from_start } => {
            let secret = match secret_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading the webhook secret from {}", path.display()))?
                    .trim()
                    .to_owned(),
                None => String::new(),
            };
            let request = proto::AddWebhookRequest { url, types, secret, insecure_http, from_start };
            let added = client.add_webhook(request).await.map_err(status)?.into_inner();
            #[derive(Serialize)]
            struct Added {
                webhook: WebhookView,
                secret: String,
            }
            let view = Added { webhook: added.webhook.unwrap_or_default().into(), secret: added.secret };
            print(output, &view, |a| {
                format!(
                    "Webhook {} added: events from id {} on go to {}.\nSigning secret (shown once; receivers verify the \
                     webhook-signature header with it):\n{}",
                    a.webhook.id,
                    a.webhook.delivered_through + 1,
                    a.webhook.url,
                    a.secret
                )
            })
        }
        WebhooksCmd::Remove { id } => {
            client.remove_webhook(proto::RemoveWebhookRequest { id: id.clone() }).await.map_err(status)?;
            print(output, &serde_json::json!({ "removed": id }), |_| format!("Webhook {id} removed."))
        }
        WebhooksCmd::Test { id } => {
            let answer = client.test_webhook(proto::TestWebhookRequest { id: id.clone() }).await.map_err(status)?;
            let answer = answer.into_inner();
            #[derive(Serialize)]
            struct Tested {
                id: String,
                ok: bool,
                status: u32,
                error: String,
                duration_ms: u64,
            }
            let view = Tested {
                id,
                ok: answer.error.is_empty(),
                status: answer.status,
                error: answer.error,
                duration_ms: answer.duration_ms,
            };
            print(output, &view, |t| match t.ok {
                true => format!("Webhook {} answered {} in {} ms.", t.id, t.status, t.duration_ms),
                false => format!("Webhook {} failed after {} ms: {}", t.id, t.duration_ms, printable(&t.error, 300)),
            })?;
            if view.ok { Ok(()) } else { anyhow::bail!("the test delivery failed") }
        }
    }
}
