//! The rollout engine: pure functions from (rollout, fleet facts, now) to a plan. No I/O, no clock.
//!
//! # Semantics
//!
//! - **Cohorts.** A selected device is in the candidate cohort B at p% when `bucket(rollout, device)` falls
//!   under p% (stable hashing: a device in B stays in B as p grows). A device that joins the selector
//!   mid-rollout is judged against the current step's percentage. Once moved to B a device has a
//!   [`proto::RolloutDevice`] record and stays in B until an abort or a halted class returns it.
//! - **Baseline A.** When a device is first moved to B, its record keeps what it ran then (`running` and,
//!   when its desired state named the same bundle, the runtime settings). Abort gives every B device a new
//!   desired-state generation naming exactly that baseline, cohort "A". A device that ran *nothing* before
//!   (no `baseline`) is returned to nothing: its desired state says `serve_nothing` and names no bundle.
//! - **Outcomes per device**, derived from facts on every pass (so they are idempotent): ACTIVE when the
//!   device settled its B generation and serves B; FAILED when it settled it as FAILED (the reason is the
//!   error code) or when it is not ACTIVE `device_deadline_seconds` after assignment ("deadline"); otherwise
//!   PENDING, offline devices included.
//! - **Gates**, per hardware class (label `class`, else `inventory.hardware_class`, else "unknown"), at
//!   every step: a class fails when its failures exceed `max_failures`, or, once `min_devices` B devices
//!   settled, when the failure ratio exceeds `max_failure_ratio` or the success ratio is under
//!   `min_success_ratio`. A class with no B device yet is NOT_SAMPLED (it is judged at a later step; at 100%
//!   every class is sampled); with devices still converging it is WAITING; settled but under `min_devices`,
//!   INCONCLUSIVE. Without any failure gate configured, a failed device holds the step for a human.
//!   Performance gates (generation tokens/s, time to first token, relative to A) use the same comparison
//!   as `alkictl bench compare` ([`crate::insight::compare`]): per class, B's paired (or median) ratio to A,
//!   once `min_devices` devices are measured on both sides. A class whose failure gates pass but whose
//!   active candidate devices have not all reported a measurement yet WAITS for them; with everyone
//!   measured and still too few samples it is INCONCLUSIVE (the inconclusive policy applies); a ratio
//!   past its threshold FAILS the class like any other gate.
//! - **Quality gates** (`max_kld`, `min_top1_agreement`, `max_perplexity_ratio`, `min_golden_pass`; they
//!   need `spec.eval_suite`, pinned as `rollout.eval_suite`): a sample is an ACTIVE candidate device's newest
//!   evaluation ([`Facts::evaluations`]) of the candidate with that suite against its own baseline (its
//!   record's `baseline`; none when it ran nothing, which leaves golden prompts only). Per class,
//!   `alki_shared::eval::quality::judge_class` with `min_devices` samples decides (its module doc is the
//!   gate math). A breach FAILS the class at once, even while other devices converge (more samples cannot
//!   undo it), its reason naming the gate, the worst value, its device and the limit. Otherwise, once the
//!   class's devices settled: while an active candidate device has not reported, the class WAITS (a device
//!   still silent `device_deadline_seconds` after its assignment, when a deadline is set, is no longer
//!   waited for); then too few samples is INCONCLUSIVE (the inconclusive policy applies), else the quality
//!   gates pass. Devices that could not run the suite give no sample; the reason counts them by kind.
//!   With a suite and no quality gate, evaluations are only shown. `ClassStatus.quality` holds the class's
//!   worst values and counts whenever the rollout has a suite.
//! - **Error-rate gate** (`max_error_rate_ratio`), by `crate::insight::errors`: per class, B's pooled error
//!   rate against A's from the front proxy's per-bundle counters, judged with the speed gates once the
//!   class settled: it WAITS while an active candidate device has served no request on B (until its
//!   `device_deadline_seconds`, when set), is
//!   INCONCLUSIVE with fewer than `min_devices` devices serving traffic on either side, and FAILS past the
//!   ratio. `ClassStatus.b_error_rate` / `a_error_rate` show both rates once both sides served traffic.
//! - **p95 latency gate** (`max_p95_latency_ratio`), by `crate::insight::latency`: per class, B's p95 request
//!   latency at the front port against A's, each pooled from the proxy's per-bundle histograms (same sides
//!   as the error rate), judged with the speed gates once the class settled: it WAITS while an active
//!   candidate device has no latency sample of B (a report without requests says nothing about latency,
//!   and the first report after a swap usually has none; a device still without one
//!   `device_deadline_seconds` after its assignment, when a deadline is set, is no longer waited for), is
//!   INCONCLUSIVE with fewer than `min_devices` sampled devices on either side, and FAILS when B's p95 is
//!   over the ratio times A's, both values in the reason. `ClassStatus.b_p95_latency_ms` /
//!   `a_p95_latency_ms` show each side's p95 once it has samples.
//! - **External gates** (`spec.external_gates`, [`external_gates`]): once a class passed the built-in gates
//!   and the step soaked (and the rollout is not paused), each external gate's answer for this step is
//!   needed too: a webhook's (one for the whole rollout) and a Prometheus query's (per class). Missing or
//!   due answers are asked for ([`Plan::external_asks`]) and the class WAITS; a rejection or a query past its
//!   threshold FAILS the class; no decision within the gate's deadline is INCONCLUSIVE.
//! - **Outcomes per step**: a failing class aborts the rollout, or with `HALT_CLASS` only that class is
//!   halted (its B devices return to A) while the others continue; if every sampled class is halted the
//!   rollout aborts. An inconclusive class pauses the rollout for a human (`resume` accepts the step) or,
//!   with `ADVANCE`, passes. When every class passes and the step has soaked, the rollout advances, and
//!   after the last step it completes.
//! - **States**: Pending → Progressing(step) ⇄ Paused → Completed | Aborted. Operator verbs ([`command`]):
//!   pause, resume, promote (jump to the last step; inconclusive gates pass, failures still count), abort,
//!   retry (failed B devices get a new generation and a fresh deadline).
//! - `max_concurrent` bounds B devices converging at once; the rest wait their turn in bucket order.
//! - **Schedule window** (`spec.schedule`, [`alki_shared::schedule`]): while it is closed the rollout does not
//!   start, advance or move any new device to B (refills under `max_concurrent` and devices joining the
//!   selector included); it says when the window opens (`window_opens_unix_ms`, message). Safety acts at any
//!   time: gates still fail classes and abort, devices return to A, and a rollout whose last step has
//!   settled completes (that moves no device). An operator's `promote` is explicit and ignores the window.
//! - **Pre-staging** (`spec.prestage`): while the rollout is active, every selected device that is connected,
//!   does not run or report the candidate staged, and was not already told, gets a Prestage command
//!   ([`Plan::prestage`]), once per rollout; a device that reports a failure (or does not answer within
//!   [`PRESTAGE_ANSWER`]) is told again after a backoff, at most [`PRESTAGE_MAX_ATTEMPTS`] times. The
//!   window does not apply: staging downloads, it does not change what a device serves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto::{
    self, ClassFailurePolicy, DeviceOutcome, GateVerdict, InconclusivePolicy, PauseReason, Phase, RolloutCounts,
    RolloutState,
};
use sha2::{Digest as _, Sha256};

use alki_shared::eval::quality::{Verdict, judge_class};
use alki_shared::schedule::Window;

use crate::facts::{hardware_class, is_active, selects};
use crate::insight::compare::{self, Measurements, PerfVerdict};
use crate::insight::errors::{self, ClassErrors};
use crate::insight::latency::{self, ClassLatency};
use crate::insight::quality::{self, Evaluations};
use crate::store::Keyed;

pub mod external_gates;

/// The candidate cohort within a rollout.
pub const COHORT_CANDIDATE: &str = "B";
/// The baseline cohort: devices returned to what they ran before.
pub const COHORT_BASELINE: &str = "A";
/// Prestage commands sent to one device per rollout, retries after failures included.
pub const PRESTAGE_MAX_ATTEMPTS: u32 = 4;
/// Wait before telling a device again after its failed staging: this, doubled per attempt.
pub const PRESTAGE_BACKOFF: Duration = Duration::from_secs(30);
/// A Prestage command unanswered this long counts as failed (the device may have restarted mid-download).
pub const PRESTAGE_ANSWER: Duration = Duration::from_secs(30 * 60);

/// Where a device falls in a rollout, in basis points (0..10_000): stable for a (rollout, device)
/// pair, so a device's cohort survives restarts and a device in B stays in B as the percentage grows.
pub fn bucket(rollout_id: &RolloutId, device_id: &DeviceId) -> u32 {
    let hash =
        Sha256::new().chain_update(rollout_id.as_str()).chain_update([0u8]).chain_update(device_id.as_str()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    (u64::from_be_bytes(first) % 10_000) as u32
}

/// True when the device is in the candidate cohort at `percent`.
pub fn in_candidate(rollout_id: &RolloutId, device_id: &DeviceId, percent: u32) -> bool {
    bucket(rollout_id, device_id) < percent.min(100) * 100
}

/// What the engine needs to know about the fleet besides the rollout itself.
pub struct Facts<'a> {
    pub devices: &'a [Keyed<proto::Device>],
    /// This rollout's per-device records.
    pub records: &'a [Keyed<proto::RolloutDevice>],
    /// Ids of the other active rollouts: their devices are left alone.
    pub other_active: &'a HashSet<RolloutId>,
    /// Devices' measurements per bundle, for the performance and error-rate gates (empty when no gate
    /// needs them).
    pub measurements: &'a Measurements,
    /// Devices' evaluations of this rollout's candidate with its eval suite (empty without a suite).
    pub evaluations: &'a Evaluations,
}

impl<'a> Facts<'a> {
    /// Devices still in the fleet: decommissioned ones leave every rollout (not selected, not waited for,
    /// not counted by any gate).
    fn live_devices(&self) -> impl Iterator<Item = &'a Keyed<proto::Device>> + 'a {
        self.devices.iter().filter(|d| !d.record().decommissioned)
    }
}

/// A device going back to its baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct Revert {
    pub device_id: DeviceId,
    /// None: the device ran nothing before the rollout and must serve nothing again.
    pub bundle: Option<proto::BundleRef>,
    pub runtime: proto::RuntimeSettings,
}

/// A Prestage command to send: the reconciler records it on the device when it is delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct PrestageOrder {
    pub device_id: DeviceId,
    /// The device's hardware class (the variant policy picks a variant per class).
    pub class: String,
    /// The attempt this is (1 for the first).
    pub attempt: u32,
}

/// What the reconciler should persist and apply for one rollout now.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The rollout record after this pass.
    pub rollout: proto::Rollout,
    /// Device records that are new or changed.
    pub records: Vec<Keyed<proto::RolloutDevice>>,
    pub events: Vec<proto::RolloutEvent>,
    /// Devices that must be given the candidate (idempotent: only devices not already assigned it).
    pub to_candidate: Vec<DeviceId>,
    /// Devices that must go back to their baseline.
    pub to_baseline: Vec<Revert>,
    /// Failed devices to give a new generation of the candidate (operator retry).
    pub retry: Vec<DeviceId>,
    /// Devices to send a Prestage command for the candidate (not persisted in the plan: the device record
    /// keeps what was sent, so this is recomputed, idempotently, from facts on every pass).
    pub prestage: Vec<PrestageOrder>,
    /// External gates to ask now (recomputed on every pass; the caller drops asks already in flight).
    pub external_asks: Vec<external_gates::Ask>,
}

impl Plan {
    fn new(rollout: &proto::Rollout) -> Plan {
        Plan {
            rollout: rollout.clone(),
            records: Vec::new(),
            events: Vec::new(),
            to_candidate: Vec::new(),
            to_baseline: Vec::new(),
            retry: Vec::new(),
            prestage: Vec::new(),
            external_asks: Vec::new(),
        }
    }

    fn event(&mut self, now: UnixMs, kind: &str, message: String, device_id: &str) {
        self.rollout.event_seq += 1;
        self.events.push(proto::RolloutEvent {
            rollout_id: self.rollout.id.clone(),
            seq: self.rollout.event_seq,
            unix_ms: now.as_millis(),
            kind: kind.to_owned(),
            message,
            device_id: device_id.to_owned(),
        });
    }

    fn state(&self) -> RolloutState {
        RolloutState::try_from(self.rollout.state).unwrap_or(RolloutState::Unspecified)
    }

    fn set_state(&mut self, state: RolloutState) {
        self.rollout.state = state as i32;
    }

    /// True when applying it would change anything.
    pub fn changes(&self, before: &proto::Rollout) -> bool {
        !(self.records.is_empty()
            && self.events.is_empty()
            && self.to_candidate.is_empty()
            && self.to_baseline.is_empty()
            && self.retry.is_empty()
            && self.prestage.is_empty()
            && self.rollout == *before)
    }

    /// Adds a device's new or changed record to what the reconciler persists.
    fn push_record(&mut self, device_id: &DeviceId, record: &proto::RolloutDevice) {
        self.records.push(Keyed::with_id(device_id.clone(), record.clone()));
    }
}

/// A device's deadline (none when `seconds` is 0), for the outcome and the quality gates.
fn deadline_of(seconds: u32) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(u64::from(seconds)))
}

/// True once `deadline` has passed since `assigned_unix_ms` (a record's assignment time).
fn past_deadline(deadline: Option<Duration>, assigned_unix_ms: i64, now: UnixMs) -> bool {
    deadline.is_some_and(|d| now >= UnixMs(assigned_unix_ms).plus(d))
}

fn assigned_candidate(rollout: &proto::Rollout, device: &proto::Device) -> bool {
    let candidate = rollout.candidate.as_ref().map(|c| c.digest.as_str());
    device.rollout_id == rollout.id
        && device.cohort == COHORT_CANDIDATE
        && device.desired.as_ref().map(|b| b.digest.as_str()) == candidate
}

/// The outcome of a B device from its facts, with a reason when it failed.
fn derive_outcome(
    rollout: &proto::Rollout,
    record: &proto::RolloutDevice,
    device: Option<&proto::Device>,
    deadline: Option<Duration>,
    now: UnixMs,
) -> (DeviceOutcome, String) {
    if let Some(d) = device.filter(|d| assigned_candidate(rollout, d) && d.applied_generation >= d.desired_generation) {
        let candidate = rollout.candidate.as_ref().map(|c| c.digest.as_str());
        let phase = Phase::try_from(d.phase).unwrap_or(Phase::Unspecified);
        if phase == Phase::Active && d.running.as_ref().map(|b| b.digest.as_str()) == candidate {
            return (DeviceOutcome::Active, String::new());
        }
        if phase == Phase::Failed {
            let code = d.error.as_ref().map(|e| proto::ErrorCode::try_from(e.code).unwrap_or_default().label());
            return (DeviceOutcome::Failed, code.unwrap_or("failed").to_owned());
        }
    }
    if past_deadline(deadline, record.assigned_unix_ms, now) {
        return (DeviceOutcome::Failed, "deadline".to_owned());
    }
    (DeviceOutcome::Pending, String::new())
}

fn outcome_of(record: &proto::RolloutDevice) -> DeviceOutcome {
    DeviceOutcome::try_from(record.outcome).unwrap_or(DeviceOutcome::Unspecified)
}

/// Returns every B device still in B to its baseline (serving nothing when it ran nothing before).
/// Returns how many, and how many of them go back to serving nothing.
fn revert(plan: &mut Plan, records: &mut Records, class: Option<&str>) -> (u32, u32) {
    let (mut reverted, mut to_nothing) = (0, 0);
    for (device_id, record) in records.iter_mut() {
        if outcome_of(record) == DeviceOutcome::Reverted || class.is_some_and(|c| c != record.class) {
            continue;
        }
        record.outcome = DeviceOutcome::Reverted as i32;
        // A device assigned B earlier in this same decision must not be sent B after all.
        plan.to_candidate.retain(|id| id != device_id);
        plan.retry.retain(|id| id != device_id);
        plan.to_baseline.push(revert_of(device_id, record));
        reverted += 1;
        if record.baseline.is_none() {
            to_nothing += 1;
        }
        plan.push_record(device_id, record);
    }
    (reverted, to_nothing)
}

fn revert_of(device_id: &DeviceId, record: &proto::RolloutDevice) -> Revert {
    Revert {
        device_id: device_id.clone(),
        bundle: record.baseline.clone(),
        runtime: record.baseline_runtime.unwrap_or_default(),
    }
}

/// "12 devices return to A" and, when some ran nothing before, how many of them serve nothing again.
fn returned(reverted: u32, to_nothing: u32) -> String {
    if to_nothing == 0 {
        format!("{reverted} devices return to A")
    } else {
        format!("{reverted} devices return to A ({to_nothing} of them to serving nothing, as before)")
    }
}

/// Decides the next plan for a rollout. Idempotent: deciding again on the facts after applying a plan
/// changes nothing until time passes or facts change.
pub fn decide(rollout: &Keyed<proto::Rollout>, facts: &Facts<'_>, now: UnixMs) -> Plan {
    let mut plan = decide_steps(rollout, facts, now);
    if is_active(plan.state()) && rollout.record().spec.as_ref().is_some_and(|s| s.prestage) {
        plan_prestage(&mut plan, rollout.id(), facts, now);
    }
    if !is_active(plan.state()) {
        // A finished rollout waits for no window.
        plan.rollout.window_opens_unix_ms = 0;
    }
    plan
}

/// The schedule window of a rollout, if it has a valid one (specs are validated at creation).
fn window_of(rollout: &proto::Rollout) -> Option<Window> {
    rollout.spec.as_ref()?.schedule.as_ref().and_then(|w| Window::new(w).ok())
}

/// "outside the schedule window 01:00-05:00 UTC; opens 2026-11-24T01:00:00Z".
fn closed_message(window: &Window, opens: i64) -> String {
    format!("outside the schedule window {}; opens {}", window.describe(), rfc3339(opens))
}

fn rfc3339(unix_ms: i64) -> String {
    u64::try_from(unix_ms)
        .map(|ms| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
        })
        .unwrap_or_default()
}

/// What one pass over an active rollout at its current step reads; fixed for the whole pass.
struct Pass<'a> {
    id: &'a RolloutId,
    rollout: &'a proto::Rollout,
    facts: &'a Facts<'a>,
    spec: &'a proto::RolloutSpec,
    step: proto::RolloutStep,
    gates: proto::RolloutGates,
    halted: HashSet<String>,
    /// The schedule window while it is closed (an operator's promote opens it for good).
    closed: Option<Window>,
    paused: bool,
    /// How long a B device has to become active (none: no deadline).
    deadline: Option<Duration>,
    now: UnixMs,
}

/// The device records of a rollout, by device id, as this pass changes them.
type Records = BTreeMap<DeviceId, proto::RolloutDevice>;

/// The facts' devices by id.
type Devices<'a> = HashMap<&'a DeviceId, &'a proto::Device>;

fn records_of(records: &[Keyed<proto::RolloutDevice>]) -> Records {
    records.iter().map(|r| (r.id().clone(), r.record().clone())).collect()
}

fn decide_steps(rollout: &Keyed<proto::Rollout>, facts: &Facts<'_>, now: UnixMs) -> Plan {
    let mut plan = Plan::new(rollout.record());
    let mut records = records_of(facts.records);
    let gone: HashSet<&DeviceId> = facts.devices.iter().filter(|d| d.record().decommissioned).map(Keyed::id).collect();
    records.retain(|id, _| !gone.contains(id));
    let devices: Devices<'_> = facts.live_devices().map(|d| (d.id(), d.record())).collect();
    enforce_records(&mut plan, rollout.record(), &records, &devices);
    if !is_active(plan.state()) {
        return plan;
    }
    let Some(pass) = start_step(&mut plan, rollout, facts, now) else { return plan };
    update_outcomes(&pass, &mut plan, &mut records, &devices);
    let selected = selected_devices(&pass, &records);
    let mut classes = selected_per_class(&selected, &records);
    let waiting_turn = move_to_candidate(&pass, &mut plan, &mut records, &selected);
    count_candidates(&mut classes, &records, &waiting_turn);
    judge_classes(&pass, &plan, &records, &mut classes);
    if !pass.spec.external_gates.is_empty() && !pass.paused && soaked(&pass, &plan) {
        plan.external_asks = external_gates::apply(&mut plan.rollout, &pass.spec.external_gates, &mut classes, now);
    }
    halt_or_abort(&pass, &mut plan, &mut records, &mut classes);
    finish_counts(&mut plan, &classes);
    if plan.state() != RolloutState::Progressing {
        if plan.state() == RolloutState::Paused && plan.rollout.message.is_empty() {
            plan.rollout.message = "paused".into();
        }
        return plan;
    }
    advance_hold_or_wait(&pass, &mut plan, &classes);
    plan
}

/// Level-based enforcement of what the records say, whatever the state (a crash between persisting a
/// plan and applying it is repaired here).
fn enforce_records(plan: &mut Plan, rollout: &proto::Rollout, records: &Records, devices: &Devices<'_>) {
    let active = is_active(plan.state());
    for (device_id, record) in records {
        let Some(device) = devices.get(device_id) else { continue };
        if outcome_of(record) == DeviceOutcome::Reverted {
            if device.rollout_id == rollout.id && device.cohort == COHORT_CANDIDATE {
                plan.to_baseline.push(revert_of(device_id, record));
            }
        } else if active && !assigned_candidate(rollout, device) {
            plan.to_candidate.push(device_id.clone());
        }
    }
}

/// Starts a pending rollout unless its schedule window is closed, and reads the current step. None when
/// the pass ends here (waiting for the window, no spec or candidate, no step left), the plan saying why.
fn start_step<'a>(
    plan: &mut Plan,
    keyed: &'a Keyed<proto::Rollout>,
    facts: &'a Facts<'a>,
    now: UnixMs,
) -> Option<Pass<'a>> {
    let (state, rollout) = (plan.state(), keyed.record());
    let (Some(spec), Some(_)) = (&rollout.spec, &rollout.candidate) else {
        plan.set_state(RolloutState::Aborted);
        plan.rollout.message = "the rollout has no spec or candidate; create it again".to_owned();
        plan.event(now, "aborted", plan.rollout.message.clone(), "");
        return None;
    };
    // Closed window: no start, no advance, no new B device. An operator's promote overrides it.
    let closed = window_of(rollout).filter(|w| !rollout.promoted && !w.is_open(now.as_millis()));
    plan.rollout.window_opens_unix_ms = closed.as_ref().map(|w| w.next_opening(now.as_millis())).unwrap_or(0);
    if state == RolloutState::Pending {
        if let Some(w) = &closed {
            plan.rollout.message =
                format!("waiting to start: {}", closed_message(w, plan.rollout.window_opens_unix_ms));
            return None;
        }
        plan.set_state(RolloutState::Progressing);
        plan.rollout.step_started_unix_ms = now.as_millis();
        plan.event(now, "started", format!("step 1 of {} started", spec.steps.len()), "");
    }
    let Some(step) = spec.steps.get(plan.rollout.current_step as usize).copied() else {
        plan.set_state(RolloutState::Completed);
        plan.event(now, "completed", "no steps left".into(), "");
        return None;
    };
    Some(Pass {
        id: keyed.id(),
        rollout,
        facts,
        spec,
        step,
        gates: spec.gates.unwrap_or_default(),
        halted: plan.rollout.halted_classes.iter().cloned().collect(),
        closed,
        paused: state == RolloutState::Paused,
        deadline: deadline_of(spec.device_deadline_seconds),
        now,
    })
}

/// Outcomes of devices already in B, from their facts; a new failure is an event.
fn update_outcomes(pass: &Pass<'_>, plan: &mut Plan, records: &mut Records, devices: &Devices<'_>) {
    for (device_id, record) in records.iter_mut() {
        // A halted class is out of the rollout: its devices' outcomes no longer change anything.
        if outcome_of(record) == DeviceOutcome::Reverted || pass.halted.contains(&record.class) {
            continue;
        }
        let device = devices.get(device_id).copied();
        let (outcome, reason) = derive_outcome(pass.rollout, record, device, pass.deadline, pass.now);
        if outcome as i32 != record.outcome || (outcome == DeviceOutcome::Failed && reason != record.reason) {
            if outcome == DeviceOutcome::Failed {
                plan.event(
                    pass.now,
                    "device_failed",
                    format!("{device_id} ({}) failed: {reason}", record.class),
                    device_id.as_str(),
                );
            }
            record.outcome = outcome as i32;
            record.reason = reason;
            plan.push_record(device_id, record);
        }
    }
}

/// Devices the rollout selects: its members, and devices its selector picks that no other active rollout has.
fn selected_devices<'a>(pass: &Pass<'a>, records: &Records) -> Vec<&'a Keyed<proto::Device>> {
    pass.facts
        .live_devices()
        .filter(|d| selects(&pass.spec.selector, &d.record().labels) || records.contains_key(d.id()))
        .filter(|d| records.contains_key(d.id()) || !pass.facts.other_active.contains(d.record().rollout_id.as_str()))
        .collect()
}

/// Per class, how many devices are selected (a member counts in the class it joined with).
fn selected_per_class(selected: &[&Keyed<proto::Device>], records: &Records) -> BTreeMap<String, proto::ClassStatus> {
    let mut classes: BTreeMap<String, proto::ClassStatus> = BTreeMap::new();
    for device in selected {
        let class =
            records.get(device.id()).map(|r| r.class.clone()).unwrap_or_else(|| hardware_class(device.record()));
        let entry = classes.entry(class.clone()).or_insert_with(|| proto::ClassStatus { class, ..Default::default() });
        entry.counts.get_or_insert_default().selected += 1;
    }
    classes
}

/// New members of B at the current percentage, within the concurrency budget, in bucket order; each keeps
/// what it ran as its baseline. Returns, per class, the devices due in B that wait their turn (paused,
/// over budget, or the window closed).
fn move_to_candidate(
    pass: &Pass<'_>,
    plan: &mut Plan,
    records: &mut Records,
    selected: &[&Keyed<proto::Device>],
) -> HashMap<String, u32> {
    let rollout_id = pass.id;
    let mut eligible: Vec<(u32, &Keyed<proto::Device>)> = selected
        .iter()
        .filter(|d| !records.contains_key(d.id()) && in_candidate(rollout_id, d.id(), pass.step.percent))
        .filter(|d| !pass.halted.contains(&hardware_class(d.record())))
        .map(|d| (bucket(rollout_id, d.id()), *d))
        .collect();
    eligible.sort_by_key(|(b, d)| (*b, d.id().clone()));
    let converging = records.values().filter(|r| outcome_of(r) == DeviceOutcome::Pending).count() as u64;
    let mut budget = if pass.spec.max_concurrent == 0 { u64::MAX } else { u64::from(pass.spec.max_concurrent) };
    budget = budget.saturating_sub(converging);
    let mut waiting_turn: HashMap<String, u32> = HashMap::new();
    for (_, device) in eligible {
        let class = hardware_class(device.record());
        if pass.paused || budget == 0 || pass.closed.is_some() {
            *waiting_turn.entry(class).or_default() += 1;
            continue;
        }
        budget -= 1;
        let record = new_member(rollout_id, device.record(), class, pass.now);
        plan.to_candidate.push(device.id().clone());
        plan.push_record(device.id(), &record);
        records.insert(device.id().clone(), record);
    }
    waiting_turn
}

/// A device's record as it joins B: what it runs now is its baseline (with its runtime settings when its
/// desired state named the same bundle).
fn new_member(rollout_id: &RolloutId, device: &proto::Device, class: String, now: UnixMs) -> proto::RolloutDevice {
    let baseline_runtime = if device.desired.as_ref().map(|b| &b.digest) == device.running.as_ref().map(|b| &b.digest) {
        device.desired_runtime
    } else {
        None
    };
    let baseline_variant = if device.running.is_some() { device.running_variant.clone() } else { String::new() };
    proto::RolloutDevice {
        rollout_id: rollout_id.to_string(),
        device_id: device.id.clone(),
        class,
        baseline: device.running.clone(),
        baseline_runtime,
        assigned_unix_ms: now.as_millis(),
        outcome: DeviceOutcome::Pending as i32,
        reason: String::new(),
        attempts: 1,
        baseline_variant,
    }
}

/// Per class, B's devices by outcome (those waiting their turn count as pending).
fn count_candidates(
    classes: &mut BTreeMap<String, proto::ClassStatus>,
    records: &Records,
    waiting_turn: &HashMap<String, u32>,
) {
    for record in records.values() {
        let entry = classes
            .entry(record.class.clone())
            .or_insert_with(|| proto::ClassStatus { class: record.class.clone(), ..Default::default() });
        let counts = entry.counts.get_or_insert_default();
        match outcome_of(record) {
            DeviceOutcome::Reverted => continue,
            DeviceOutcome::Active => counts.active += 1,
            DeviceOutcome::Failed => counts.failed += 1,
            _ => counts.pending += 1,
        }
        counts.candidate += 1;
    }
    for (class, n) in waiting_turn {
        if let Some(entry) = classes.get_mut(class) {
            let counts = entry.counts.get_or_insert_default();
            counts.candidate += n;
            counts.pending += n;
        }
    }
}

/// Each class's verdict from its counts, its A/B comparison, its evaluations, its traffic and the gates.
fn judge_classes(pass: &Pass<'_>, plan: &Plan, records: &Records, classes: &mut BTreeMap<String, proto::ClassStatus>) {
    let (gates, measurements) = (&pass.gates, pass.facts.measurements);
    let perf_on = gates.min_tokens_per_second_ratio.is_some() || gates.max_ttft_ratio.is_some();
    let current: Vec<proto::RolloutDevice> = records.values().cloned().collect();
    let comparison: HashMap<String, proto::ClassComparison> = if perf_on || !measurements.is_empty() {
        let min_samples = gates.min_devices.max(1) as usize;
        let devices = pass.facts.live_devices().map(Keyed::record);
        let c = compare::compare(&plan.rollout, devices, &current, measurements, min_samples);
        c.classes.into_iter().map(|c| (c.class.clone(), c)).collect()
    } else {
        HashMap::new()
    };
    let traffic = if gates.max_error_rate_ratio.is_some() {
        errors::per_class(&plan.rollout, pass.facts.live_devices().map(Keyed::record), &current, measurements)
    } else {
        BTreeMap::new()
    };
    let latency = if gates.max_p95_latency_ratio.is_some() {
        latency::per_class(&plan.rollout, pass.facts.live_devices().map(Keyed::record), &current, measurements)
    } else {
        BTreeMap::new()
    };
    let candidate_digest = pass.rollout.candidate.as_ref().map(|c| c.digest.as_str()).unwrap_or_default();
    for status in classes.values_mut() {
        let active: Vec<&proto::RolloutDevice> =
            records.values().filter(|r| r.class == status.class && outcome_of(r) == DeviceOutcome::Active).collect();
        let unreported =
            |measured: &dyn Fn(&str) -> bool| active.iter().filter(|r| !measured(&r.device_id)).count() as u32;
        let perf = Perf {
            comparison: comparison.get(&status.class),
            unmeasured: unreported(&|d| measurements.speed(d, candidate_digest).is_some()),
            traffic: traffic.get(&status.class),
            untrafficked: waiting_for(pass, &active, |d| {
                measurements.get(d, candidate_digest).and_then(|m| m.traffic).is_some_and(|t| t.requests > 0)
            }),
            latency: latency.get(&status.class),
            unsampled: waiting_for(pass, &active, |d| measurements.latency(d, candidate_digest).is_some()),
        };
        let halted = pass.halted.contains(&status.class);
        // A halted class still shows what its devices measured of B before they returned to A.
        let evaluated: Vec<&proto::RolloutDevice> = if halted {
            records.values().filter(|r| r.class == status.class && outcome_of(r) == DeviceOutcome::Reverted).collect()
        } else {
            active.clone()
        };
        let quality = pass.rollout.eval_suite.is_some().then(|| class_quality(pass, &evaluated));
        judge(status, gates, halted, &perf, quality.as_ref());
    }
}

/// Active candidate devices without a serving sample of the candidate yet (`sampled` says which have one),
/// except those still without one `device_deadline_seconds` after their assignment (when a deadline is set):
/// the class is judged without them. A telemetry report without requests is no sample: right after a swap
/// the first report usually comes before any request finished, and judging then would hold most rollouts.
fn waiting_for(pass: &Pass<'_>, active: &[&proto::RolloutDevice], sampled: impl Fn(&str) -> bool) -> u32 {
    let deadline = deadline_of(pass.spec.device_deadline_seconds);
    active
        .iter()
        .filter(|r| !sampled(&r.device_id))
        .filter(|r| !past_deadline(deadline, r.assigned_unix_ms, pass.now))
        .count() as u32
}

/// The quality facts of one class: its active candidate devices' newest evaluations against their own
/// baselines, judged by the shared gate math, and how many devices the class still waits for.
fn class_quality(pass: &Pass<'_>, active: &[&proto::RolloutDevice]) -> QualityFacts {
    let mut results = Vec::new();
    let mut unreported = 0;
    for r in active {
        match pass.facts.evaluations.newest(&r.device_id, r.baseline.as_ref().map(|b| b.digest.as_str())) {
            Some(sample) => results.push((r.device_id.as_str(), &sample.outcome)),
            // Still silent past its deadline: judged without it.
            None if past_deadline(pass.deadline, r.assigned_unix_ms, pass.now) => {}
            None => unreported += 1,
        }
    }
    let gates = quality::rollout_gates(&pass.gates);
    QualityFacts {
        verdict: judge_class(&gates, results.iter().copied(), pass.gates.min_devices),
        summary: quality::summarize(results.iter().map(|(_, o)| *o)),
        gates_set: !gates.is_empty(),
        unreported,
    }
}

/// Failing classes: each is halted (its B devices return to A) under `HALT_CLASS`, else, or when every
/// sampled class is halted, the rollout aborts. A paused rollout waits for its operator.
fn halt_or_abort(
    pass: &Pass<'_>,
    plan: &mut Plan,
    records: &mut Records,
    classes: &mut BTreeMap<String, proto::ClassStatus>,
) {
    let failing: Vec<String> =
        classes.values().filter(|c| c.verdict == GateVerdict::Fail as i32).map(|c| c.class.clone()).collect();
    if failing.is_empty() || pass.paused {
        return;
    }
    let halt_only = pass.spec.on_class_failure == ClassFailurePolicy::HaltClass as i32;
    if halt_only {
        for class in &failing {
            let (reverted, to_nothing) = revert(plan, records, Some(class));
            plan.rollout.halted_classes.push(class.clone());
            let reason = classes.get(class).map(|c| c.reason.clone()).unwrap_or_default();
            plan.event(
                pass.now,
                "class_halted",
                format!("class {class} halted ({reason}); {}", returned(reverted, to_nothing)),
                "",
            );
            if let Some(c) = classes.get_mut(class) {
                c.verdict = GateVerdict::Halted as i32;
                // Its devices left B in this pass: count them as the next pass will.
                let selected = c.counts.map(|n| n.selected).unwrap_or(0);
                c.counts = Some(RolloutCounts { selected, ..Default::default() });
            }
        }
    }
    let all_halted = classes
        .values()
        .all(|c| c.verdict == GateVerdict::Halted as i32 || c.verdict == GateVerdict::NotSampled as i32);
    if !halt_only || all_halted {
        let (reverted, to_nothing) = revert(plan, records, None);
        let why: Vec<String> = failing
            .iter()
            .map(|c| format!("{c}: {}", classes.get(c).map(|s| s.reason.as_str()).unwrap_or("")))
            .collect();
        plan.set_state(RolloutState::Aborted);
        plan.rollout.message = format!(
            "aborted at step {}: gates failed ({}); {}",
            plan.rollout.current_step + 1,
            why.join("; "),
            returned(reverted, to_nothing)
        );
        plan.event(pass.now, "aborted", plan.rollout.message.clone(), "");
    }
}

/// "class: reason" of the judged classes with `verdict`, joined.
fn reasons_of(judged: &[&proto::ClassStatus], verdict: GateVerdict) -> Vec<String> {
    judged.iter().filter(|c| c.verdict == verdict as i32).map(|c| format!("{}: {}", c.class, c.reason)).collect()
}

/// Advance, hold or wait: a waiting class waits; an inconclusive one holds the rollout for a human unless
/// accepted; once every class passed and the step soaked, the rollout advances (the window permitting)
/// or, after its last step, completes.
fn advance_hold_or_wait(pass: &Pass<'_>, plan: &mut Plan, classes: &BTreeMap<String, proto::ClassStatus>) {
    let now = pass.now;
    let step_no = plan.rollout.current_step + 1;
    let judged: Vec<&proto::ClassStatus> =
        classes.values().filter(|c| c.verdict != GateVerdict::Halted as i32).collect();
    let waiting = reasons_of(&judged, GateVerdict::Waiting);
    let inconclusive = reasons_of(&judged, GateVerdict::Inconclusive);
    let accept_inconclusive = plan.rollout.inconclusive_accepted
        || plan.rollout.promoted
        || pass.spec.on_inconclusive == InconclusivePolicy::Advance as i32;
    let soaked = soaked(pass, plan);
    let last_step = plan.rollout.current_step as usize + 1 >= pass.spec.steps.len();
    let closed = pass.closed.as_ref();
    if !waiting.is_empty() {
        plan.rollout.message = format!("step {step_no}: waiting ({})", waiting.join("; "));
    } else if !inconclusive.is_empty() && !accept_inconclusive {
        plan.set_state(RolloutState::Paused);
        plan.rollout.pause_reason = PauseReason::Inconclusive as i32;
        plan.rollout.message = format!(
            "step {step_no}: held for a human, inconclusive ({}; min {} devices); resume to accept, or abort",
            inconclusive.join("; "),
            pass.gates.min_devices.max(1)
        );
        plan.event(now, "held", plan.rollout.message.clone(), "");
    } else if !soaked {
        plan.rollout.message = format!("step {step_no}: soaking for {} s", pass.step.min_soak_seconds);
    } else if let Some(w) = closed.filter(|_| !last_step) {
        plan.rollout.message =
            format!("step {step_no}: done; {}", closed_message(w, plan.rollout.window_opens_unix_ms));
    } else if last_step {
        complete(plan, now);
    } else {
        advance(plan, pass.spec, now);
    }
    if let Some(w) = closed
        && plan.state() == RolloutState::Progressing
        && !plan.rollout.message.contains("schedule window")
    {
        let note = closed_message(w, plan.rollout.window_opens_unix_ms);
        plan.rollout.message = format!("{}; {note}", plan.rollout.message);
    }
}

/// True once the current step has run its minimum soak time.
fn soaked(pass: &Pass<'_>, plan: &Plan) -> bool {
    let soak = Duration::from_secs(u64::from(pass.step.min_soak_seconds));
    pass.now >= UnixMs(plan.rollout.step_started_unix_ms).plus(soak)
}

fn complete(plan: &mut Plan, now: UnixMs) {
    plan.set_state(RolloutState::Completed);
    let active: u32 = plan.rollout.counts.map(|c| c.active).unwrap_or(0);
    let halted = if plan.rollout.halted_classes.is_empty() {
        String::new()
    } else {
        format!("; halted classes: {}", plan.rollout.halted_classes.join(", "))
    };
    plan.rollout.message = format!("completed: {active} devices run the candidate{halted}");
    plan.event(now, "completed", plan.rollout.message.clone(), "");
}

fn advance(plan: &mut Plan, spec: &proto::RolloutSpec, now: UnixMs) {
    let step_no = plan.rollout.current_step + 1;
    plan.rollout.current_step += 1;
    plan.rollout.step_started_unix_ms = now.as_millis();
    plan.rollout.inconclusive_accepted = false;
    plan.rollout.external_gates.clear();
    let percent = spec.steps.get(plan.rollout.current_step as usize).map(|s| s.percent).unwrap_or(100);
    plan.rollout.message = format!("advanced to step {} ({percent}%)", step_no + 1);
    plan.event(now, "advanced", plan.rollout.message.clone(), "");
}

/// Which selected devices to tell to pre-stage the candidate now, and per class how many report it staged
/// or failed to stage it. Idempotent: the device records keep what was sent and answered.
fn plan_prestage(plan: &mut Plan, rollout_id: &RolloutId, facts: &Facts<'_>, now: UnixMs) {
    let Some(spec) = plan.rollout.spec.as_ref() else { return };
    let Some(candidate) = plan.rollout.candidate.as_ref().map(|c| c.digest.clone()) else { return };
    let records: HashMap<&DeviceId, &proto::RolloutDevice> =
        facts.records.iter().map(|r| (r.id(), r.record())).collect();
    let halted: HashSet<&str> = plan.rollout.halted_classes.iter().map(String::as_str).collect();
    let mut per_class: BTreeMap<String, (u32, u32, u32)> = BTreeMap::new();
    let mut orders = Vec::new();
    let mut failures = Vec::new();
    for keyed in facts.live_devices() {
        let (device_id, device) = (keyed.id(), keyed.record());
        let record = records.get(device_id);
        let member = record.is_some();
        if !(member || selects(&spec.selector, &device.labels)) {
            continue;
        }
        if !member && facts.other_active.contains(device.rollout_id.as_str()) {
            continue;
        }
        let class = record.map(|r| r.class.clone()).unwrap_or_else(|| hardware_class(device));
        // Returned to A, or in a halted class: the candidate is not coming to this device.
        if halted.contains(class.as_str()) || record.is_some_and(|r| outcome_of(r) == DeviceOutcome::Reverted) {
            continue;
        }
        let entry = per_class.entry(class.clone()).or_default();
        entry.0 += 1;
        let ours = device.prestage.as_ref().filter(|p| p.rollout_id == rollout_id.as_str());
        let state = ours.map(|p| proto::PrestageState::try_from(p.state).unwrap_or_default());
        let staged = device.staged.iter().any(|b| b.digest == candidate)
            || state == Some(proto::PrestageState::Ready)
            || device.running.as_ref().is_some_and(|b| b.digest == candidate);
        if staged {
            entry.1 += 1;
            continue;
        }
        if state == Some(proto::PrestageState::Failed) {
            entry.2 += 1;
        }
        if !device.connected {
            continue;
        }
        let attempts = ours.map(|p| p.attempts).unwrap_or(0);
        let sent = UnixMs(ours.map(|p| p.sent_unix_ms).unwrap_or(0));
        let due = match state {
            None | Some(proto::PrestageState::Unspecified) => true,
            Some(proto::PrestageState::Ready) => false,
            Some(proto::PrestageState::Sent) => now >= sent.plus(PRESTAGE_ANSWER),
            Some(proto::PrestageState::Failed) => {
                now >= sent.plus(PRESTAGE_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(10)))
            }
        };
        if due && attempts < PRESTAGE_MAX_ATTEMPTS {
            if state == Some(proto::PrestageState::Failed) {
                let why = ours.and_then(|p| p.error.as_ref()).map(|e| e.message.as_str()).unwrap_or("no reason given");
                failures.push((
                    device_id,
                    format!(
                        "{device_id} failed to stage the candidate ({why}); attempt {} of {PRESTAGE_MAX_ATTEMPTS}",
                        attempts + 1
                    ),
                ));
            }
            orders.push(PrestageOrder { device_id: device_id.clone(), class, attempt: attempts + 1 });
        }
    }
    for (device_id, message) in failures {
        plan.event(now, "prestage_retry", message, device_id.as_str());
    }
    plan.prestage = orders;
    for (class, (selected, staged, failed)) in per_class {
        let classes = &mut plan.rollout.classes;
        let i = match classes.iter().position(|c| c.class == class) {
            Some(i) => i,
            None => {
                let counts = RolloutCounts { selected, ..Default::default() };
                classes.push(proto::ClassStatus { class, counts: Some(counts), ..Default::default() });
                classes.len() - 1
            }
        };
        let status = &mut classes[i];
        status.staged = staged;
        status.stage_failed = failed;
    }
    plan.rollout.classes.sort_by(|a, b| a.class.cmp(&b.class));
}

fn finish_counts(plan: &mut Plan, classes: &BTreeMap<String, proto::ClassStatus>) {
    let mut total = RolloutCounts::default();
    for c in classes.values() {
        let n = c.counts.unwrap_or_default();
        total.selected += n.selected;
        total.candidate += n.candidate;
        total.active += n.active;
        total.failed += n.failed;
        total.pending += n.pending;
    }
    plan.rollout.counts = Some(total);
    plan.rollout.classes = classes.values().cloned().collect();
}

/// What the performance and error-rate gates of one class see.
struct Perf<'a> {
    comparison: Option<&'a proto::ClassComparison>,
    /// Active candidate devices with no speed measurement of the candidate yet.
    unmeasured: u32,
    traffic: Option<&'a ClassErrors>,
    /// Active candidate devices that served no request on the candidate yet (see [`waiting_for`]).
    untrafficked: u32,
    latency: Option<&'a ClassLatency>,
    /// Active candidate devices with no latency sample of the candidate yet (see [`unsampled_latency`]).
    unsampled: u32,
}

/// What the quality gates of one class see (only for rollouts with an eval suite).
struct QualityFacts {
    verdict: Verdict,
    summary: proto::ClassQuality,
    /// Whether any quality threshold is set (else the evaluations are only shown).
    gates_set: bool,
    /// Active candidate devices the class still waits for.
    unreported: u32,
}

/// Sets a class's verdict, ratios, quality and reason from its counts, its A/B comparison, its
/// evaluations, its traffic and the gates.
fn judge(
    status: &mut proto::ClassStatus,
    gates: &proto::RolloutGates,
    halted: bool,
    perf: &Perf<'_>,
    quality: Option<&QualityFacts>,
) {
    let n = status.counts.unwrap_or_default();
    let settled = n.active + n.failed;
    let min_devices = gates.min_devices.max(1);
    let (mut values, mut failed_gate) = failure_gates(status, gates, min_devices);
    fill_measures(status, perf, quality);
    // A quality breach is a fact more samples cannot undo: it fails the class at once.
    if let (None, Some(QualityFacts { verdict: Verdict::Fail(breach), .. })) = (&failed_gate, quality) {
        failed_gate = Some(format!("quality: {breach}"));
    }
    // Not measured yet: (devices still to report, why). Judged once the class's devices settled.
    let mut unmeasured: Vec<(u32, String)> = Vec::new();
    if failed_gate.is_none() && n.pending == 0 && settled >= min_devices {
        let min = min_devices as usize;
        let measured = [
            (compare::judge(perf.comparison, gates), perf.unmeasured, "measurements"),
            (errors::judge(perf.traffic, gates.max_error_rate_ratio, min), perf.untrafficked, "requests served on B"),
            (latency::judge(perf.latency, gates.max_p95_latency_ratio, min), perf.unsampled, "latency samples"),
        ];
        for (verdict, missing, what) in measured {
            match verdict {
                PerfVerdict::Off => {}
                PerfVerdict::Pass(v) => values.push(v),
                PerfVerdict::Fail(why) => failed_gate = failed_gate.or(Some(why)),
                PerfVerdict::Unmeasured(why) if missing > 0 => {
                    unmeasured.push((missing, format!("waiting for {what} from {missing} candidate devices; {why}")))
                }
                PerfVerdict::Unmeasured(why) => unmeasured.push((0, why)),
            }
        }
        if let Some(q) = quality.filter(|q| q.gates_set) {
            match &q.verdict {
                _ if q.unreported > 0 => unmeasured.push((
                    q.unreported,
                    format!("waiting for quality evaluations from {} candidate devices", q.unreported),
                )),
                Verdict::Pass => values.push(quality::describe(&q.summary, &quality::rollout_gates(gates))),
                Verdict::Inconclusive { why } => unmeasured.push((0, why.clone())),
                Verdict::Fail(_) => {}
            }
        }
    }
    let no_failure_gate =
        gates.max_failures.is_none() && gates.max_failure_ratio.is_none() && gates.min_success_ratio.is_none();
    let (verdict, reason) = if halted {
        (GateVerdict::Halted, "halted by its gates; its devices returned to A".to_owned())
    } else if let Some(why) = failed_gate {
        (GateVerdict::Fail, why)
    } else if n.candidate == 0 {
        (GateVerdict::NotSampled, "no candidate device at this step yet".to_owned())
    } else if n.pending > 0 {
        (
            GateVerdict::Waiting,
            format!("{} of {} candidate devices converging; {}", n.pending, n.candidate, values.join(", ")),
        )
    } else if no_failure_gate && n.failed > 0 {
        (
            GateVerdict::Waiting,
            format!(
                "held: {} of {} candidate devices failed and no failure gate is set; retry, promote or abort",
                n.failed, n.candidate
            ),
        )
    } else if settled < min_devices {
        (GateVerdict::Inconclusive, format!("{settled} settled, fewer than min {min_devices}"))
    } else if unmeasured.iter().any(|(missing, _)| *missing > 0) {
        let waiting: Vec<String> = unmeasured.into_iter().filter(|(m, _)| *m > 0).map(|(_, why)| why).collect();
        (GateVerdict::Waiting, waiting.join("; "))
    } else if !unmeasured.is_empty() {
        (GateVerdict::Inconclusive, unmeasured.into_iter().map(|(_, why)| why).collect::<Vec<_>>().join("; "))
    } else {
        (GateVerdict::Pass, values.join(", "))
    };
    status.verdict = verdict as i32;
    status.reason = reason;
}

/// The failure-count gates: the values shown, and the first gate the class breaks.
fn failure_gates(
    status: &mut proto::ClassStatus,
    gates: &proto::RolloutGates,
    min_devices: u32,
) -> (Vec<String>, Option<String>) {
    let n = status.counts.unwrap_or_default();
    let settled = n.active + n.failed;
    if settled > 0 {
        status.success_ratio = f64::from(n.active) / f64::from(settled);
        status.failure_ratio = f64::from(n.failed) / f64::from(settled);
    }
    let mut values = vec![format!("{}/{} settled active", n.active, settled)];
    let mut failed_gate: Option<String> = None;
    if let Some(max) = gates.max_failures {
        values.push(format!("failures {} (max {max})", n.failed));
        if n.failed > max {
            failed_gate = Some(format!("{} failures > max {max}", n.failed));
        }
    }
    if settled >= min_devices && failed_gate.is_none() {
        if let Some(max) = gates.max_failure_ratio {
            values.push(format!("failure ratio {:.2} (max {max:.2})", status.failure_ratio));
            if status.failure_ratio > max {
                failed_gate = Some(format!("failure ratio {:.2} > max {max:.2}", status.failure_ratio));
            }
        }
        if let Some(min) = gates.min_success_ratio {
            values.push(format!("success ratio {:.2} (min {min:.2})", status.success_ratio));
            if status.success_ratio < min {
                failed_gate = Some(format!("success ratio {:.2} < min {min:.2}", status.success_ratio));
            }
        }
    }
    (values, failed_gate)
}

/// Copies what the class measured into its status: speed ratios, error rates, p95 latencies, quality.
fn fill_measures(status: &mut proto::ClassStatus, perf: &Perf<'_>, quality: Option<&QualityFacts>) {
    if let Some(c) = perf.comparison {
        status.tokens_per_second_ratio = c.generation_tokens_per_second.as_ref().map(|m| m.gate_ratio).unwrap_or(0.0);
        status.ttft_ratio = c.ttft_ms.as_ref().map(|m| m.gate_ratio).unwrap_or(0.0);
        status.a_samples = c.a_samples;
        status.b_samples = c.b_samples;
    }
    if let Some(t) = perf.traffic
        && let (Some(a), Some(b)) = (t.a.rate(), t.b.rate())
    {
        (status.a_error_rate, status.b_error_rate) = (a, b);
    }
    if let Some(l) = perf.latency {
        status.a_p95_latency_ms = l.a.p95().unwrap_or(0.0);
        status.b_p95_latency_ms = l.b.p95().unwrap_or(0.0);
    }
    status.quality = quality.map(|q| q.summary);
}

/// An operator's verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Pause,
    Resume,
    Promote,
    Abort,
    Retry,
}

impl Verb {
    pub fn label(self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Promote => "promote",
            Verb::Abort => "abort",
            Verb::Retry => "retry",
        }
    }

    /// The verb a label names (as the JSON API's path spells it).
    pub fn from_label(label: &str) -> Option<Verb> {
        [Verb::Pause, Verb::Resume, Verb::Promote, Verb::Abort, Verb::Retry].into_iter().find(|v| v.label() == label)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerbError {
    #[error("rollout {id} is {state}; {verb} applies only to {allowed} rollouts")]
    WrongState { id: RolloutId, state: &'static str, verb: &'static str, allowed: &'static str },
    #[error("rollout {id} has no failed candidate devices to retry")]
    NothingToRetry { id: RolloutId },
}

/// Applies an operator's verb to a rollout. Pure: the reconciler persists and applies the plan.
pub fn command(
    keyed: &Keyed<proto::Rollout>,
    records: &[Keyed<proto::RolloutDevice>],
    verb: Verb,
    reason: &str,
    now: UnixMs,
) -> Result<Plan, VerbError> {
    let rollout = keyed.record();
    let mut plan = Plan::new(rollout);
    let state = plan.state();
    let wrong = |allowed: &'static str| VerbError::WrongState {
        id: keyed.id().clone(),
        state: state.label(),
        verb: verb.label(),
        allowed,
    };
    let by = if reason.is_empty() { String::new() } else { format!(": {reason}") };
    match verb {
        Verb::Pause => {
            if !matches!(state, RolloutState::Pending | RolloutState::Progressing) {
                return Err(wrong("pending or progressing"));
            }
            plan.set_state(RolloutState::Paused);
            plan.rollout.pause_reason = PauseReason::Operator as i32;
            plan.rollout.message = format!("paused by an operator{by}");
        }
        Verb::Resume => {
            if state != RolloutState::Paused {
                return Err(wrong("paused"));
            }
            if plan.rollout.pause_reason == PauseReason::Inconclusive as i32 {
                plan.rollout.inconclusive_accepted = true;
            }
            plan.set_state(RolloutState::Progressing);
            plan.rollout.pause_reason = PauseReason::Unspecified as i32;
            plan.rollout.message = format!("resumed{by}");
        }
        Verb::Promote => {
            if !is_active(state) {
                return Err(wrong("pending, progressing or paused"));
            }
            let steps = rollout.spec.as_ref().map(|s| s.steps.len()).unwrap_or(1).max(1);
            plan.set_state(RolloutState::Progressing);
            plan.rollout.pause_reason = PauseReason::Unspecified as i32;
            plan.rollout.current_step = steps as u32 - 1;
            plan.rollout.step_started_unix_ms = now.as_millis();
            plan.rollout.promoted = true;
            plan.rollout.message = format!("promoted to the last step{by}");
        }
        Verb::Abort => {
            if !is_active(state) {
                return Err(wrong("pending, progressing or paused"));
            }
            let (reverted, to_nothing) = revert(&mut plan, &mut records_of(records), None);
            plan.set_state(RolloutState::Aborted);
            plan.rollout.message = format!("aborted by an operator{by}; {}", returned(reverted, to_nothing));
        }
        Verb::Retry => {
            if !is_active(state) {
                return Err(wrong("pending, progressing or paused"));
            }
            for (device_id, mut r) in records_of(records) {
                if outcome_of(&r) != DeviceOutcome::Failed || rollout.halted_classes.contains(&r.class) {
                    continue;
                }
                r.outcome = DeviceOutcome::Pending as i32;
                r.reason.clear();
                r.assigned_unix_ms = now.as_millis();
                r.attempts += 1;
                plan.push_record(&device_id, &r);
                plan.retry.push(device_id);
            }
            if plan.retry.is_empty() {
                return Err(VerbError::NothingToRetry { id: keyed.id().clone() });
            }
            plan.rollout.message = format!("retrying {} failed devices{by}", plan.retry.len());
        }
    }
    if verb == Verb::Abort || verb == Verb::Promote {
        // Neither waits for the schedule window.
        plan.rollout.window_opens_unix_ms = 0;
    }
    let message = plan.rollout.message.clone();
    plan.event(now, verb.label(), message, "");
    Ok(plan)
}

#[cfg(test)]
mod tests;
