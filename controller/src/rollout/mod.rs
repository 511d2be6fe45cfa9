//! Rollouts: creating them, and the reconciler that applies the pure engine's plans and persists them.

pub mod engine;

use std::sync::Arc;
use std::time::Duration;

use alki_shared::ids::RolloutId;
use alki_shared::proto::{self, RolloutState};

use crate::fleet::{Assignment, Fleet, selects};
use crate::registry::Registry;
use crate::store::StoreError;

/// How often the reconciler looks even when nothing woke it (soak timers, deadlines).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("invalid rollout: {0}")]
    Invalid(String),
    #[error(
        "bundle {repository}:{reference} is not in the registry; push it with `alkictl bundle push` or check the name"
    )]
    BundleNotFound { repository: String, reference: String },
    #[error("device {device} is already in active rollout {rollout}; wait for it, or abort it first")]
    Conflict { device: String, rollout: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry: {0}")]
    Registry(String),
}

/// Validates a spec, pins the candidate by digest, refuses overlaps with active rollouts, and stores
/// the new rollout as Pending. The reconciler takes it from there.
pub fn create(
    fleet: &Fleet,
    registry: &Registry,
    registry_host: &str,
    mut spec: proto::RolloutSpec,
    now_unix_ms: i64,
) -> Result<proto::Rollout, CreateError> {
    if spec.repository.is_empty() || spec.candidate.is_empty() {
        return Err(CreateError::Invalid("name the bundle's repository and its tag or digest".into()));
    }
    if spec.steps.is_empty() {
        spec.steps.push(proto::RolloutStep { percent: 100, min_soak_seconds: 0 });
    }
    let percents: Vec<u32> = spec.steps.iter().map(|s| s.percent).collect();
    if percents.iter().any(|p| !(1..=100).contains(p)) || percents.windows(2).any(|w| w[0] > w[1]) {
        return Err(CreateError::Invalid(format!(
            "steps {percents:?} must be percentages from 1 to 100 that never decrease"
        )));
    }
    if percents.last() != Some(&100) {
        return Err(CreateError::Invalid(format!("the last step must be 100%, not {:?}", percents.last())));
    }
    let manifest = registry
        .resolve(&spec.repository, &spec.candidate)
        .map_err(|e| CreateError::Registry(e.to_string()))?
        .ok_or_else(|| CreateError::BundleNotFound {
            repository: spec.repository.clone(),
            reference: spec.candidate.clone(),
        })?;

    let rollouts = fleet.store.rollouts()?;
    let active: Vec<&proto::Rollout> = rollouts.iter().filter(|r| is_active(r)).collect();
    for device in fleet.store.devices()? {
        if !selects(&spec.selector, &device.labels) {
            continue;
        }
        let overlapping = active.iter().find(|r| {
            r.spec.as_ref().is_some_and(|s| selects(&s.selector, &device.labels)) || r.id == device.rollout_id
        });
        if let Some(other) = overlapping {
            return Err(CreateError::Conflict { device: device.id, rollout: other.id.clone() });
        }
    }

    let tag = if spec.candidate.starts_with("sha256:") { String::new() } else { spec.candidate.clone() };
    let rollout = proto::Rollout {
        id: RolloutId::generate().to_string(),
        candidate: Some(proto::BundleRef {
            registry: registry_host.to_owned(),
            repository: spec.repository.clone(),
            digest: manifest.digest.to_string(),
            tag,
        }),
        spec: Some(spec),
        state: RolloutState::Pending as i32,
        created_unix_ms: now_unix_ms,
        updated_unix_ms: now_unix_ms,
        message: "waiting for the reconciler".into(),
        ..Default::default()
    };
    fleet.store.put_rollout(&rollout)?;
    tracing::info!(rollout_id = %rollout.id, candidate = %manifest.digest, "Created a rollout.");
    fleet.changed.notify_one();
    Ok(rollout)
}

fn is_active(r: &proto::Rollout) -> bool {
    matches!(
        RolloutState::try_from(r.state),
        Ok(RolloutState::Pending | RolloutState::Progressing | RolloutState::Paused)
    )
}

/// Applies the engine's plans until shutdown: wakes on fleet changes and on a timer.
pub async fn reconcile_loop(fleet: Fleet, shutdown: Arc<tokio::sync::Notify>) {
    loop {
        if let Err(error) = reconcile_once(&fleet, crate::now_unix_ms()) {
            tracing::error!(%error, "Rollout reconciliation failed; retrying.");
        }
        tokio::select! {
            _ = fleet.changed.notified() => {}
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            _ = shutdown.notified() => return,
        }
    }
}

/// One pass over every active rollout. Idempotent: assignments that already hold change nothing.
pub fn reconcile_once(fleet: &Fleet, now_unix_ms: i64) -> Result<(), StoreError> {
    let rollouts = fleet.store.rollouts()?;
    let active: Vec<proto::Rollout> = rollouts.into_iter().filter(is_active).collect();
    if active.is_empty() {
        return Ok(());
    }
    let devices = fleet.store.devices()?;
    for mut rollout in active {
        let plan = engine::decide(&rollout, &devices, now_unix_ms);
        let span = tracing::info_span!("rollout", rollout_id = %rollout.id);
        let _entered = span.enter();
        if let Some(candidate) = &rollout.candidate {
            let assignment = Assignment {
                bundle: candidate.clone(),
                runtime: rollout.spec.as_ref().and_then(|s| s.runtime).unwrap_or_default(),
                rollout_id: rollout.id.clone(),
                cohort: engine::COHORT_CANDIDATE.into(),
            };
            for device_id in &plan.assign {
                fleet.assign(device_id, &assignment)?;
            }
        }
        let before = (rollout.state, rollout.current_step, rollout.counts, rollout.message.clone());
        let after = (plan.state as i32, plan.current_step, Some(plan.counts), plan.message.clone());
        if before != after || rollout.step_started_unix_ms != plan.step_started_unix_ms {
            if rollout.state != plan.state as i32 || rollout.current_step != plan.current_step {
                tracing::info!(
                    state = plan.state.label(),
                    step = plan.current_step + 1,
                    message = %plan.message,
                    "Rollout moved."
                );
            }
            rollout.state = plan.state as i32;
            rollout.current_step = plan.current_step;
            rollout.step_started_unix_ms = plan.step_started_unix_ms;
            rollout.counts = Some(plan.counts);
            rollout.message = plan.message;
            rollout.updated_unix_ms = now_unix_ms;
            fleet.store.put_rollout(&rollout)?;
        }
    }
    Ok(())
}
