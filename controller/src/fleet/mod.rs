//! The fleet as the controller sees it: connected sessions and each device's desired state.

pub mod hub;
pub mod reports;

use std::collections::HashMap;
use std::sync::Arc;

use alki_shared::proto::{self, controller_message::Msg};
use tokio::sync::Notify;

use crate::store::{Store, StoreError};
pub use hub::Hub;

/// What the controller wants a device to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// None: serve nothing (a rollout returned a device that ran nothing before it).
    pub bundle: Option<proto::BundleRef>,
    pub runtime: proto::RuntimeSettings,
    pub rollout_id: String,
    pub cohort: String,
    /// Variant manifest digest to run; empty: the device chooses.
    pub variant_digest: String,
}

/// Devices, their sessions and their desired state. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    pub store: Store,
    pub hub: Arc<Hub>,
    /// Woken whenever a device's facts change, so the rollout reconciler looks again at once.
    pub changed: Arc<Notify>,
    /// Serialises read-modify-write of rollout records between the reconciler and operator verbs.
    /// Never held across an await.
    pub rollouts_lock: Arc<std::sync::Mutex<()>>,
    /// Telemetry ingestion: counters and the rollup accumulator.
    pub insight: Arc<crate::insight::Ingest>,
    /// Counters of the HTTP side (registry traffic), for `/metrics`.
    pub http: Arc<crate::metrics::HttpCounters>,
    /// Counters of the agent report writer, for `/metrics`.
    pub reports: Arc<reports::ReportCounters>,
}

impl Fleet {
    pub fn new(store: Store) -> Fleet {
        Fleet {
            store,
            hub: Arc::new(Hub::default()),
            changed: Arc::new(Notify::new()),
            rollouts_lock: Arc::new(std::sync::Mutex::new(())),
            insight: Arc::default(),
            http: Arc::default(),
            reports: Arc::default(),
        }
    }

    /// Gives many devices their desired states in one transaction, then sends them to connected devices.
    /// Assigning what a device is already assigned changes nothing (idempotent), unless `force` bumps the
    /// generation anyway (a retry). Returns how many devices got a new generation.
    pub fn assign_many(&self, assignments: &[(&str, &Assignment, bool)]) -> Result<usize, StoreError> {
        if assignments.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = assignments.iter().map(|(id, _, _)| *id).collect();
        let sent = self.store.update_devices(&ids, |d, i| {
            let (_, assignment, force) = assignments[i];
            let unchanged = d.desired == assignment.bundle
                && d.desired_serve_nothing == assignment.bundle.is_none()
                && d.desired_runtime.as_ref() == Some(&assignment.runtime)
                && d.rollout_id == assignment.rollout_id
                && d.cohort == assignment.cohort
                && d.desired_variant == assignment.variant_digest;
            if unchanged && !force {
                return None;
            }
            d.desired_generation += 1;
            d.desired = assignment.bundle.clone();
            d.desired_serve_nothing = assignment.bundle.is_none();
            d.desired_runtime = Some(assignment.runtime);
            d.rollout_id = assignment.rollout_id.clone();
            d.cohort = assignment.cohort.clone();
            d.desired_variant = assignment.variant_digest.clone();
            desired_state(d)
        })?;
        let mut count = 0;
        for (desired, (device_id, _, _)) in sent.into_iter().zip(assignments) {
            let Some(desired) = desired else { continue };
            count += 1;
            tracing::debug!(
                device_id,
                generation = desired.generation,
                cohort = %desired.cohort,
                bundle = %desired.bundle.as_ref().map(|b| b.display()).unwrap_or_default(),
                "Assigned a new desired state."
            );
            self.hub.send(device_id, Msg::DesiredState(desired));
        }
        Ok(count)
    }

    /// What only the live sessions know: whether the device is connected, and when it was last heard from
    /// (kept in memory, written through coarsely).
    fn fill_live(&self, d: &mut proto::Device) {
        d.connected = self.hub.is_connected(&d.id);
        d.last_seen_unix_ms = d.last_seen_unix_ms.max(self.hub.last_seen(&d.id).unwrap_or(0));
    }

    /// Devices as the API shows them: stored records with `connected` filled from the live sessions.
    pub fn devices(&self, selector: &HashMap<String, String>) -> Result<Vec<proto::Device>, StoreError> {
        let mut devices = self.store.devices()?;
        devices.retain(|d| selects(selector, &d.labels));
        for d in &mut devices {
            self.fill_live(d);
        }
        Ok(devices)
    }

    pub fn device(&self, id: &str) -> Result<Option<proto::Device>, StoreError> {
        Ok(self.store.device(id)?.map(|mut d| {
            self.fill_live(&mut d);
            d
        }))
    }
}

/// The complete desired state of a device record, if it has one: a bundle, or serving nothing.
pub fn desired_state(d: &proto::Device) -> Option<proto::DesiredState> {
    if d.desired.is_none() && !d.desired_serve_nothing {
        return None;
    }
    Some(proto::DesiredState {
        generation: d.desired_generation,
        bundle: d.desired.clone(),
        serve_nothing: d.desired_serve_nothing,
        runtime: d.desired_runtime,
        rollout_id: d.rollout_id.clone(),
        cohort: d.cohort.clone(),
        variant_digest: d.desired_variant.clone(),
    })
}

/// True when `labels` carry every key/value of `selector` (an empty selector selects everything).
pub fn selects<'a>(
    selector: impl IntoIterator<Item = (&'a String, &'a String)>,
    labels: &HashMap<String, String>,
) -> bool {
    selector.into_iter().all(|(k, v)| labels.get(k) == Some(v))
}
