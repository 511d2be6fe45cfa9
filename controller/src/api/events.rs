//! `EventService`: the event log (list, watch a rollout or the devices) and webhooks.

use std::pin::Pin;

use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto::{self, event_service_server::EventService};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::events::{list, watch, webhooks};
use crate::store::events::EventQuery;

type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct EventsApi {
    pub app: App,
}

fn webhook_status(error: webhooks::WebhookError) -> Status {
    match error {
        webhooks::WebhookError::Invalid(why) => Status::invalid_argument(why),
        e @ webhooks::WebhookError::NotFound(_) => Status::not_found(e.to_string()),
        e @ webhooks::WebhookError::Full => Status::resource_exhausted(e.to_string()),
        webhooks::WebhookError::Store(e) => super::internal(e),
    }
}

fn too_many(error: watch::TooManyWatchers) -> Status {
    Status::resource_exhausted(error.to_string())
}

#[tonic::async_trait]
impl EventService for EventsApi {
    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        super::principal(&request)?;
        let req = request.into_inner();
        let query = EventQuery {
            after: req.after_event_id,
            rollout_id: req.rollout_id,
            device_id: req.device_id,
            types: req.types,
            limit: req.limit as usize,
            newest_first: req.newest_first,
        };
        Ok(Response::new(super::with_store(&self.app.store, move |store| list::list(store, query)).await?))
    }

    type WatchEventsStream = Updates<proto::FleetEvent>;

    async fn watch_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        super::principal(&request)?;
        let req = request.into_inner();
        let permit = self.app.watchers.admit().map_err(too_many)?;
        let query = EventQuery {
            after: req.after_event_id,
            rollout_id: req.rollout_id,
            device_id: req.device_id,
            types: req.types,
            limit: 0,
            newest_first: false,
        };
        let events = watch::follow(self.app.store.clone(), query, permit.stop.clone());
        let updates = async_stream::try_stream! {
            let _permit = permit;
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                yield event.map_err(super::internal)?;
            }
        };
        Ok(Response::new(Box::pin(updates)))
    }

    type WatchRolloutStream = Updates<proto::RolloutUpdate>;

    async fn watch_rollout(
        &self,
        request: Request<proto::WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        super::principal(&request)?;
        let req = request.into_inner();
        let not_found = || Status::not_found(format!("no rollout {}", alki_shared::text::printable(&req.id, 64)));
        let id = RolloutId::new(req.id.clone()).map_err(|_| not_found())?;
        let permit = self.app.watchers.admit().map_err(too_many)?;
        let read_id = id.clone();
        let rollout = super::with_store(&self.app.store, move |s| s.rollout(&read_id)).await?.ok_or_else(not_found)?;
        let query = EventQuery { after: req.after_event_id, rollout_id: id.to_string(), ..Default::default() };
        let store = self.app.store.clone();
        let updates = async_stream::try_stream! {
            let _permit = permit;
            let ended = !crate::facts::rollout_is_active(&rollout);
            let last_seq = rollout.event_seq;
            yield proto::RolloutUpdate { event: None, rollout: Some(rollout) };
            // An ended rollout's log is complete: what the caller has not seen yet, then the end.
            if ended && caught_up(&store, &query).await? {
                return;
            }
            let mut events = Box::pin(watch::follow(store.clone(), query, _permit.stop.clone()));
            while let Some(event) = events.next().await {
                let event = event.map_err(super::internal)?;
                let read = (store.clone(), id.clone());
                let rollout = super::with_store(&read.0, move |s| s.rollout(&read.1)).await?;
                let last = rollout.as_ref().is_none_or(|r| !crate::facts::rollout_is_active(r) && event.rollout_seq >= r.event_seq.max(last_seq));
                yield proto::RolloutUpdate { event: Some(event), rollout };
                if last {
                    return;
                }
            }
        };
        Ok(Response::new(Box::pin(updates)))
    }

    type WatchDevicesStream = Updates<proto::DeviceUpdate>;

    async fn watch_devices(
        &self,
        request: Request<proto::WatchDevicesRequest>,
    ) -> Result<Response<Self::WatchDevicesStream>, Status> {
        super::principal(&request)?;
        let req = request.into_inner();
        let permit = self.app.watchers.admit().map_err(too_many)?;
        let query = EventQuery { after: req.after_event_id, types: vec!["device.".into()], ..Default::default() };
        let (store, fleet, selector) = (self.app.store.clone(), self.app.fleet.clone(), req.selector);
        let updates = async_stream::try_stream! {
            let _permit = permit;
            let mut events = Box::pin(watch::follow(store, query, _permit.stop.clone()));
            while let Some(event) = events.next().await {
                let event = event.map_err(super::internal)?;
                let Ok(id) = DeviceId::new(event.device_id.clone()) else { continue };
                let fleet = fleet.clone();
                let device = super::blocking(move || fleet.device(&id)).await?.map_err(super::internal)?;
                let selected = device.as_ref().is_some_and(|d| crate::facts::selects(&selector, &d.labels));
                if selector.is_empty() || selected {
                    yield proto::DeviceUpdate { event: Some(event), device };
                }
            }
        };
        Ok(Response::new(Box::pin(updates)))
    }

    async fn add_webhook(
        &self,
        request: Request<proto::AddWebhookRequest>,
    ) -> Result<Response<proto::AddWebhookResponse>, Status> {
        let principal = super::principal(&request)?;
        let req = request.into_inner();
        let new = webhooks::NewWebhook {
            url: req.url,
            types: req.types,
            secret: req.secret,
            insecure_http: req.insecure_http,
            from_start: req.from_start,
        };
        let (store, deliveries, now) = (self.app.store.clone(), self.app.deliveries.clone(), self.app.clock.now());
        let (record, secret) =
            super::blocking(move || webhooks::add(&store, &deliveries, new, now)).await?.map_err(webhook_status)?;
        tracing::info!(webhook_id = %record.id, url = %record.url, by = %principal.name, "Webhook added.");
        let store = self.app.store.clone();
        let webhook = super::blocking(move || webhooks::describe(&store, &record)).await?.map_err(super::internal)?;
        Ok(Response::new(proto::AddWebhookResponse { webhook: Some(webhook), secret }))
    }

    async fn list_webhooks(
        &self,
        request: Request<proto::ListWebhooksRequest>,
    ) -> Result<Response<proto::ListWebhooksResponse>, Status> {
        super::principal(&request)?;
        let store = self.app.store.clone();
        let webhooks = super::blocking(move || webhooks::list(&store)).await?.map_err(webhook_status)?;
        Ok(Response::new(proto::ListWebhooksResponse { webhooks }))
    }

    async fn remove_webhook(
        &self,
        request: Request<proto::RemoveWebhookRequest>,
    ) -> Result<Response<proto::RemoveWebhookResponse>, Status> {
        let principal = super::principal(&request)?;
        let id = request.into_inner().id;
        let (store, deliveries) = (self.app.store.clone(), self.app.deliveries.clone());
        let removed = id.clone();
        super::blocking(move || webhooks::remove(&store, &deliveries, &removed)).await?.map_err(webhook_status)?;
        tracing::info!(webhook_id = %id, by = %principal.name, "Webhook removed.");
        Ok(Response::new(proto::RemoveWebhookResponse {}))
    }

    async fn test_webhook(
        &self,
        request: Request<proto::TestWebhookRequest>,
    ) -> Result<Response<proto::TestWebhookResponse>, Status> {
        super::principal(&request)?;
        let id = request.into_inner().id;
        let store = self.app.store.clone();
        let record = super::blocking(move || webhooks::get(&store, &id)).await?.map_err(webhook_status)?;
        let attempt = self.app.deliveries.test(&record).await;
        Ok(Response::new(webhooks::test_response(&attempt)))
    }
}

/// True when the log holds no event of the query after its id.
async fn caught_up(store: &crate::store::Store, query: &EventQuery) -> Result<bool, Status> {
    let query = EventQuery { limit: 1, ..query.clone() };
    let mut after = query.after;
    loop {
        let page = super::with_store(store, {
            let query = EventQuery { after, ..query.clone() };
            move |s| s.events(&query)
        })
        .await?;
        if !page.events.is_empty() {
            return Ok(false);
        }
        if page.scanned_through >= page.last {
            return Ok(true);
        }
        after = page.scanned_through;
    }
}
