//! The fleet as the controller sees it: device records, connected sessions, and each device's desired
//! state. Agents' reports reach the store through `reports`; the rollout reconciler is woken through
//! [`Fleet::changed`].

pub mod commands;
pub mod hub;
pub mod labels;
pub mod listing;
pub mod registry_view;
pub mod relay;
pub mod reports;

use std::collections::HashMap;
use std::sync::Arc;

use alki_shared::ids::{DeviceId, Generation, RolloutId};
use alki_shared::proto::{self, controller_message::Msg};
use tokio::sync::Notify;

use crate::facts::selects;
use crate::store::{Store, StoreError};
pub use hub::Hub;

/// What the controller wants a device to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// None: serve nothing (a rollout returned a device that ran nothing before it).
    pub bundle: Option<proto::BundleRef>,
    pub runtime: proto::RuntimeSettings,
    pub rollout_id: RolloutId,
    pub cohort: String,
    /// Variant manifest digest to run; empty: the device chooses.
    pub variant_digest: String,
    /// What the device evaluates once the bundle is active; None: no evaluation.
    pub eval: Option<EvalAssignment>,
}

/// A candidate device's evaluation order: the rollout's eval suite, against what the device ran before.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalAssignment {
    pub suite: proto::BundleRef,
    /// None: the device ran nothing before (golden prompts only).
    pub baseline: Option<proto::BundleRef>,
    pub baseline_variant: String,
}

/// Devices, their sessions and their desired state. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    pub store: Store,
    pub hub: Arc<Hub>,
    /// Woken whenever a device's facts change, so the rollout reconciler looks again at once.
    pub changed: Arc<Notify>,
    /// Commands waiting for offline devices.
    pub commands: Arc<commands::CommandQueue>,
    /// Devices' answers (diagnostics, command results) on their way to waiting operators.
    pub relay: Arc<relay::Relay>,
}

impl Fleet {
    pub fn new(store: Store) -> Fleet {
        Fleet {
            store,
            hub: Arc::new(Hub::default()),
            changed: Arc::new(Notify::new()),
            commands: Arc::default(),
            relay: Arc::default(),
        }
    }

    /// Commands to offline devices wait `ttl` for their device's return.
    pub fn with_command_ttl(mut self, ttl: std::time::Duration) -> Fleet {
        self.commands = Arc::new(commands::CommandQueue::new(ttl));
        self
    }

    /// Gives many devices their desired states in one transaction, then sends them to connected devices.
    /// Assigning what a device is already assigned changes nothing (idempotent), unless `force` bumps the
    /// generation anyway (a retry). Returns how many devices got a new generation.
    pub fn assign_many(&self, assignments: &[(&DeviceId, &Assignment, bool)]) -> Result<usize, StoreError> {
        if assignments.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&DeviceId> = assignments.iter().map(|(id, _, _)| *id).collect();
        let sent = self.store.update_devices(&ids, |d, i| {
            let (_, assignment, force) = assignments[i];
            let unchanged = d.desired == assignment.bundle
                && d.desired_serve_nothing == assignment.bundle.is_none()
                && d.desired_runtime.as_ref() == Some(&assignment.runtime)
                && assignment.rollout_id == *d.rollout_id
                && d.cohort == assignment.cohort
                && d.desired_variant == assignment.variant_digest
                && d.desired_eval_suite == assignment.eval.as_ref().map(|e| e.suite.clone())
                && d.desired_eval_baseline == assignment.eval.as_ref().and_then(|e| e.baseline.clone())
                && d.desired_eval_baseline_variant
                    == assignment.eval.as_ref().map(|e| e.baseline_variant.as_str()).unwrap_or_default();
            if unchanged && !force {
                return None;
            }
            d.desired_generation = Generation(d.desired_generation).next().0;
            d.desired = assignment.bundle.clone();
            d.desired_serve_nothing = assignment.bundle.is_none();
            d.desired_runtime = Some(assignment.runtime);
            d.rollout_id = assignment.rollout_id.to_string();
            d.cohort = assignment.cohort.clone();
            d.desired_variant = assignment.variant_digest.clone();
            d.desired_eval_suite = assignment.eval.as_ref().map(|e| e.suite.clone());
            d.desired_eval_baseline = assignment.eval.as_ref().and_then(|e| e.baseline.clone());
            d.desired_eval_baseline_variant =
                assignment.eval.as_ref().map(|e| e.baseline_variant.clone()).unwrap_or_default();
            desired_state(d)
        })?;
        let mut count = 0;
        for (desired, (device_id, _, _)) in sent.into_iter().zip(assignments) {
            let Some(desired) = desired else { continue };
            count += 1;
            tracing::debug!(
                %device_id,
                generation = desired.generation,
                cohort = %desired.cohort,
                bundle = %desired.bundle.as_ref().map(|b| b.display()).unwrap_or_default(),
                "Assigned a new desired state."
            );
            self.hub.send(device_id.as_str(), Msg::DesiredState(desired));
        }
        Ok(count)
    }

    /// What only the live sessions know: whether the device is connected, and when it was last heard from
    /// (kept in memory, written through coarsely).
    fn fill_live(&self, id: &DeviceId, d: &mut proto::Device) {
        d.connected = self.hub.is_connected(id.as_str());
        d.last_seen_unix_ms = d.last_seen_unix_ms.max(self.hub.last_seen(id.as_str()).map_or(0, |t| t.as_millis()));
    }

    /// Devices as the API shows them: stored records with `connected` filled from the live sessions.
    pub fn devices(&self, selector: &HashMap<String, String>) -> Result<Vec<proto::Device>, StoreError> {
        let mut devices = Vec::new();
        for keyed in self.store.devices()? {
            if selects(selector, &keyed.record().labels) {
                let id = keyed.id().clone();
                let mut device = keyed.into_record();
                self.fill_live(&id, &mut device);
                devices.push(device);
            }
        }
        Ok(devices)
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<proto::Device>, StoreError> {
        Ok(self.store.device(id)?.map(|mut d| {
            self.fill_live(id, &mut d);
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
        eval_suite: d.desired_eval_suite.clone(),
        eval_baseline: d.desired_eval_baseline.clone(),
        eval_baseline_variant_digest: d.desired_eval_baseline_variant.clone(),
    })
}
