//! The rollout engine: a pure function from (rollout, devices, now) to a plan. No I/O, no clock.

use alki_shared::proto::{self, Phase, RolloutCounts, RolloutState};
use sha2::{Digest as _, Sha256};

use crate::fleet::selects;

/// The cohort a device belongs to within a rollout.
pub const COHORT_CANDIDATE: &str = "B";

/// What the reconciler should do for one rollout now.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Devices that must be given the candidate.
    pub assign: Vec<String>,
    pub state: RolloutState,
    pub current_step: u32,
    pub step_started_unix_ms: i64,
    pub counts: RolloutCounts,
    pub message: String,
}

/// Where a device falls in a rollout, in basis points (0..10_000): stable for a (rollout, device)
/// pair, so a device's cohort survives restarts and a device in B stays in B as the percentage grows.
pub fn bucket(rollout_id: &str, device_id: &str) -> u32 {
    let hash = Sha256::new().chain_update(rollout_id).chain_update([0u8]).chain_update(device_id).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    (u64::from_be_bytes(first) % 10_000) as u32
}

/// True when the device is in the candidate cohort at `percent`.
pub fn in_candidate(rollout_id: &str, device_id: &str, percent: u32) -> bool {
    bucket(rollout_id, device_id) < percent.min(100) * 100
}

/// Decides the next plan for a rollout given every device the controller knows.
pub fn decide(rollout: &proto::Rollout, devices: &[proto::Device], now_unix_ms: i64) -> Plan {
    let state = RolloutState::try_from(rollout.state).unwrap_or(RolloutState::Unspecified);
    let mut plan = Plan {
        assign: Vec::new(),
        state,
        current_step: rollout.current_step,
        step_started_unix_ms: rollout.step_started_unix_ms,
        counts: rollout.counts.unwrap_or_default(),
        message: rollout.message.clone(),
    };
    if !matches!(state, RolloutState::Pending | RolloutState::Progressing) {
        return plan;
    }
    if state == RolloutState::Pending {
        plan.state = RolloutState::Progressing;
        plan.step_started_unix_ms = now_unix_ms;
    }
    let (Some(spec), Some(candidate)) = (&rollout.spec, &rollout.candidate) else {
        plan.state = RolloutState::Aborted;
        plan.message = "the rollout has no spec or candidate; create it again".to_owned();
        return plan;
    };
    let Some(step) = spec.steps.get(plan.current_step as usize) else {
        plan.state = RolloutState::Completed;
        return plan;
    };

    let selected: Vec<&proto::Device> = devices
        .iter()
        .filter(|d| selects(&spec.selector, &d.labels))
        // A device in another rollout stays there; creation refuses overlaps, so this only skips
        // devices that joined the selector later.
        .filter(|d| d.rollout_id.is_empty() || d.rollout_id == rollout.id || !is_candidate_of_active(d))
        .collect();
    let mut counts = RolloutCounts { selected: selected.len() as u32, ..Default::default() };
    for device in &selected {
        if !in_candidate(&rollout.id, &device.id, step.percent) {
            continue;
        }
        counts.candidate += 1;
        let assigned =
            device.rollout_id == rollout.id && device.desired.as_ref().is_some_and(|b| b.digest == candidate.digest);
        if !assigned {
            plan.assign.push(device.id.clone());
            counts.pending += 1;
            continue;
        }
        let settled = device.applied_generation >= device.desired_generation;
        let phase = Phase::try_from(device.phase).unwrap_or(Phase::Unspecified);
        let runs_candidate = device.running.as_ref().is_some_and(|b| b.digest == candidate.digest);
        match phase {
            Phase::Active if settled && runs_candidate => counts.active += 1,
            Phase::Failed if settled => counts.failed += 1,
            _ => counts.pending += 1,
        }
    }
    plan.counts = counts;

    let last_step = plan.current_step as usize + 1 == spec.steps.len();
    let soaked = now_unix_ms.saturating_sub(plan.step_started_unix_ms) >= i64::from(step.min_soak_seconds) * 1000;
    plan.message = if counts.pending > 0 {
        format!(
            "step {}: {} of {} candidate devices still converging",
            plan.current_step + 1,
            counts.pending,
            counts.candidate
        )
    } else if counts.failed > 0 {
        format!(
            "step {}: held, {} of {} candidate devices failed to activate (alkictl devices list shows why)",
            plan.current_step + 1,
            counts.failed,
            counts.candidate
        )
    } else if !soaked {
        format!("step {}: soaking for {} s", plan.current_step + 1, step.min_soak_seconds)
    } else if last_step {
        plan.state = RolloutState::Completed;
        format!("completed: {} devices run the candidate", counts.active)
    } else {
        plan.current_step += 1;
        plan.step_started_unix_ms = now_unix_ms;
        format!("advanced to step {}", plan.current_step + 1)
    };
    plan
}

fn is_candidate_of_active(device: &proto::Device) -> bool {
    // Without other rollouts' records the engine cannot know whether that rollout is still active;
    // the cohort field says the device was moved by it, which is enough to leave it alone.
    device.cohort == COHORT_CANDIDATE
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rollout(steps: &[(u32, u32)]) -> proto::Rollout {
        proto::Rollout {
            id: "ro-1".into(),
            spec: Some(proto::RolloutSpec {
                repository: "acme/tiny".into(),
                candidate: "v2".into(),
                selector: HashMap::from([("site".to_owned(), "lab".to_owned())]),
                steps: steps
                    .iter()
                    .map(|&(percent, min_soak_seconds)| proto::RolloutStep { percent, min_soak_seconds })
                    .collect(),
                runtime: None,
            }),
            candidate: Some(proto::BundleRef { digest: "sha256:bb".into(), ..Default::default() }),
            state: RolloutState::Progressing as i32,
            ..Default::default()
        }
    }

    fn device(id: &str, site: &str) -> proto::Device {
        proto::Device {
            id: id.into(),
            labels: HashMap::from([("site".to_owned(), site.to_owned())]),
            ..Default::default()
        }
    }

    fn apply(plan: &Plan, r: &mut proto::Rollout, devices: &mut [proto::Device], outcome: Phase) {
        for d in devices.iter_mut().filter(|d| plan.assign.contains(&d.id)) {
            d.rollout_id = r.id.clone();
            d.cohort = COHORT_CANDIDATE.into();
            d.desired = r.candidate.clone();
            d.desired_generation += 1;
            d.applied_generation = d.desired_generation;
            d.phase = outcome as i32;
            if outcome == Phase::Active {
                d.running = r.candidate.clone();
            }
        }
        r.state = plan.state as i32;
        r.current_step = plan.current_step;
        r.step_started_unix_ms = plan.step_started_unix_ms;
        r.counts = Some(plan.counts);
    }

    #[test]
    fn one_step_rollout_assigns_selected_devices_then_completes() {
        let mut r = rollout(&[(100, 0)]);
        let mut devices = vec![device("a", "lab"), device("b", "lab"), device("c", "shop")];
        let plan = decide(&r, &devices, 1_000);
        assert_eq!(plan.assign, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(plan.state, RolloutState::Progressing);
        apply(&plan, &mut r, &mut devices, Phase::Active);
        let plan = decide(&r, &devices, 2_000);
        assert!(plan.assign.is_empty());
        assert_eq!(plan.state, RolloutState::Completed, "{}", plan.message);
        assert_eq!(plan.counts.active, 2);
    }

    #[test]
    fn failures_hold_the_step() {
        let mut r = rollout(&[(100, 0)]);
        let mut devices = vec![device("a", "lab")];
        let plan = decide(&r, &devices, 0);
        apply(&plan, &mut r, &mut devices, Phase::Failed);
        let plan = decide(&r, &devices, 1);
        assert_eq!(plan.state, RolloutState::Progressing);
        assert_eq!(plan.counts.failed, 1);
        assert!(plan.message.contains("failed"), "{}", plan.message);
    }

    #[test]
    fn steps_wait_for_soak_time_then_advance() {
        let mut r = rollout(&[(50, 60), (100, 0)]);
        let mut devices: Vec<_> = (0..40).map(|i| device(&format!("d{i}"), "lab")).collect();
        let plan = decide(&r, &devices, 0);
        let first_wave = plan.assign.len();
        assert!(first_wave > 5 && first_wave < 35, "about half: {first_wave}");
        apply(&plan, &mut r, &mut devices, Phase::Active);
        let plan = decide(&r, &devices, 30_000);
        assert_eq!((plan.current_step, plan.assign.len()), (0, 0), "still soaking");
        let plan = decide(&r, &devices, 60_000);
        assert_eq!(plan.current_step, 1);
        apply(&plan, &mut r, &mut devices, Phase::Active);
        let plan = decide(&r, &devices, 60_001);
        assert_eq!(plan.assign.len(), 40 - first_wave, "the rest join at 100%");
    }

    #[test]
    fn cohort_membership_is_monotonic_in_percent() {
        for i in 0..500 {
            let id = format!("dev-{i}");
            let entered = (0..=100).find(|&p| in_candidate("ro-x", &id, p)).expect("everyone is in at 100%");
            assert!((entered..=100).all(|p| in_candidate("ro-x", &id, p)));
        }
    }
}
