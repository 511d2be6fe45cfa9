//! Reading the event log for people and scripts: a page of events, each with the webhooks that still owe it.

use alki_shared::proto;

use crate::store::events::{EventQuery, WebhookRecord};
use crate::store::{Store, StoreError};

/// Events one answer carries at most (and when the caller names no limit).
pub const MAX_LIST: usize = 1000;

/// The events matching `query` (its limit clamped to [`MAX_LIST`]), with the log's bounds.
pub fn list(store: &Store, mut query: EventQuery) -> Result<proto::ListEventsResponse, StoreError> {
    query.limit = match query.limit {
        0 => MAX_LIST,
        n => n.min(MAX_LIST),
    };
    let page = store.events(&query)?;
    let hooks = store.webhooks()?;
    Ok(proto::ListEventsResponse {
        events: with_pending(page.events, &hooks),
        last_event_id: page.last,
        first_event_id: page.first,
    })
}

/// Each event with the webhooks that have not delivered it yet.
fn with_pending(mut events: Vec<proto::FleetEvent>, hooks: &[WebhookRecord]) -> Vec<proto::FleetEvent> {
    for event in &mut events {
        event.pending_webhooks = hooks
            .iter()
            .filter(|w| w.delivered_through < event.id && w.wants(&event.r#type))
            .map(|w| w.id.clone())
            .collect();
    }
    events
}
