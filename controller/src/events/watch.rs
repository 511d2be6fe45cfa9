//! Following the event log live: the events after an id that match a query, then each new one as it is
//! committed. What the Watch RPCs and the dashboard's Server-Sent Events read.

use std::sync::Arc;

use alki_shared::proto;
use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::store::events::EventQuery;
use crate::store::{Store, StoreError};

/// Watchers at once across the controller; more are refused (each holds a stream and wakes on every event).
pub const MAX_WATCHERS: usize = 256;
/// Events read per store call.
const PAGE: usize = 256;

/// The watchers' budget, and the shutdown that ends every watch (a graceful server shutdown waits for
/// open streams, and a watch has no end of its own).
#[derive(Clone)]
pub struct Watchers {
    slots: Arc<Semaphore>,
    stop: CancellationToken,
}

/// A watcher's place: its slot, and the shutdown its stream ends with.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    pub stop: CancellationToken,
}

/// Every watcher slot is taken.
#[derive(Debug, thiserror::Error)]
#[error("{MAX_WATCHERS} watchers are following events already; try again later or read ListEvents")]
pub struct TooManyWatchers;

impl Watchers {
    pub fn new(stop: CancellationToken) -> Watchers {
        Watchers { slots: Arc::new(Semaphore::new(MAX_WATCHERS)), stop }
    }

    pub fn admit(&self) -> Result<Admitted, TooManyWatchers> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| TooManyWatchers)?;
        Ok(Admitted { _slot: slot, stop: self.stop.clone() })
    }
}

/// The events matching `query` after `query.after`, then new ones as they come, until `stop`. Reads run on
/// blocking threads; waiting costs nothing until the store announces a newer event.
pub fn follow(
    store: Store,
    mut query: EventQuery,
    stop: CancellationToken,
) -> impl Stream<Item = Result<proto::FleetEvent, StoreError>> {
    query.limit = PAGE;
    async_stream::try_stream! {
        let mut announced = store.subscribe_events();
        loop {
            announced.borrow_and_update();
            let (read_store, read_query) = (store.clone(), query.clone());
            let page = tokio::task::spawn_blocking(move || read_store.events(&read_query))
                .await
                .map_err(|e| StoreError::Batch(format!("reading events: {e}")))??;
            let more = page.scanned_through < page.last;
            query.after = page.scanned_through.max(query.after);
            for event in page.events {
                yield event;
            }
            if !more {
                tokio::select! {
                    changed = announced.changed() => if changed.is_err() { return },
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::events::NewEvent;
    use alki_shared::clock::UnixMs;
    use alki_shared::ids::DeviceId;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_watcher_gets_what_it_missed_then_new_events_filtered_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let (a, b) = (DeviceId::new("a").expect("id"), DeviceId::new("b").expect("id"));
        store
            .append_events_at(vec![NewEvent::device(&a, "online", ""), NewEvent::device(&b, "online", "")], UnixMs(1))
            .expect("append");
        let query = EventQuery { device_id: "b".into(), ..Default::default() };
        let stop = CancellationToken::new();
        let mut events = Box::pin(follow(store.clone(), query, stop.clone()));
        assert_eq!(events.next().await.expect("one").expect("ok").id, 2);
        // Many events of other devices pass before b's next one: the watcher skips them without yielding.
        let others: Vec<_> = (0..600).map(|_| NewEvent::device(&a, "offline", "")).collect();
        store.append_events_at(others, UnixMs(2)).expect("append");
        store.append_events_at(vec![NewEvent::device(&b, "offline", "")], UnixMs(3)).expect("append");
        let next = events.next().await.expect("one").expect("ok");
        assert_eq!((next.id, next.r#type.as_str()), (603, "device.offline"));

        stop.cancel();
        assert!(events.next().await.is_none(), "a watch ends at shutdown");

        let watchers = Watchers::new(stop);
        let permits: Vec<_> = (0..MAX_WATCHERS).map(|_| watchers.admit().expect("room")).collect();
        assert!(watchers.admit().is_err());
        drop(permits);
        assert!(watchers.admit().is_ok());
    }
}
