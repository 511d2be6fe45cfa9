//! External gates in the engine (pure): at a soaked step, each class that passed the built-in gates also
//! needs every external gate's answer for this step (a webhook's once for the whole rollout, a query's per
//! class). Answers are facts the rollout record carries (`Rollout.external_gates`, written by
//! `rollout::gate_calls` when they arrive); this module turns them into verdicts and says whom to ask.
//!
//! Per gate and class: no answer yet, or a retry that is due → ask (WAITING); asked and unanswered →
//! WAITING; a rejection or a query past its threshold → FAIL (abort, or halt the class under HALT_CLASS);
//! still undecided `deadline_seconds` after it was first asked at this step → INCONCLUSIVE (the
//! inconclusive policy applies); every gate passed → the class passes.

use std::collections::BTreeMap;
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::proto::{self, ExternalGateState, GateVerdict};

/// How long a webhook's decision may take by default (a human approves).
pub const WEBHOOK_DEADLINE: Duration = Duration::from_secs(3600);
/// How long a query may go without data by default.
pub const QUERY_DEADLINE: Duration = Duration::from_secs(300);

/// A gate to ask now for a class (empty for a webhook gate: its answer holds for every class).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ask {
    pub gate: String,
    pub class: String,
    pub step: u32,
}

/// True for a query gate (asked per class).
pub fn per_class(gate: &proto::ExternalGate) -> bool {
    !gate.promql.is_empty()
}

/// The gate's deadline at a step.
pub fn deadline(gate: &proto::ExternalGate) -> Duration {
    match gate.deadline_seconds {
        0 if per_class(gate) => QUERY_DEADLINE,
        0 => WEBHOOK_DEADLINE,
        s => Duration::from_secs(u64::from(s)),
    }
}

/// What one gate says about one class now.
enum Answer {
    Pass,
    Wait(String),
    Inconclusive(String),
    Fail(String),
}

/// Applies the external gates to the classes that passed at this step, updating the rollout's answers
/// (answers of other steps are dropped; new asks are recorded as ASKING) and returning whom to ask.
pub fn apply(
    rollout: &mut proto::Rollout,
    gates: &[proto::ExternalGate],
    classes: &mut BTreeMap<String, proto::ClassStatus>,
    now: UnixMs,
) -> Vec<Ask> {
    let step = rollout.current_step;
    rollout.external_gates.retain(|r| r.step == step);
    let mut asks: Vec<Ask> = Vec::new();
    for status in classes.values_mut().filter(|c| c.verdict == GateVerdict::Pass as i32) {
        let answers: Vec<Answer> = gates
            .iter()
            .map(|gate| {
                let class = if per_class(gate) { status.class.as_str() } else { "" };
                let (answer, ask) = judge_one(rollout, gate, class, step, now);
                if ask && !asks.iter().any(|a| a.gate == gate.name && a.class == class) {
                    asks.push(Ask { gate: gate.name.clone(), class: class.to_owned(), step });
                }
                answer
            })
            .collect();
        verdict_of(status, &answers);
    }
    asks
}

/// One gate for one class: its answer, and whether to ask it now (recording the ask).
fn judge_one(
    rollout: &mut proto::Rollout,
    gate: &proto::ExternalGate,
    class: &str,
    step: u32,
    now: UnixMs,
) -> (Answer, bool) {
    let name = &gate.name;
    let existing = rollout.external_gates.iter_mut().find(|r| r.gate == *name && r.class == class);
    let Some(result) = existing else {
        rollout.external_gates.push(proto::ExternalGateResult {
            gate: name.clone(),
            step,
            class: class.to_owned(),
            state: ExternalGateState::Asking as i32,
            asked_unix_ms: now.as_millis(),
            ..Default::default()
        });
        return (Answer::Wait(format!("gate {name}: asking")), true);
    };
    let expired = now >= UnixMs(result.asked_unix_ms).plus(deadline(gate));
    let state = ExternalGateState::try_from(result.state).unwrap_or(ExternalGateState::Unspecified);
    let by = if result.decided_by.is_empty() { String::new() } else { format!(" (by {})", result.decided_by) };
    match state {
        ExternalGateState::Passed => (Answer::Pass, false),
        ExternalGateState::Failed => (Answer::Fail(format!("gate {name}: {}{by}", result.message)), false),
        _ if expired => {
            let last = if result.message.is_empty() { "no answer".to_owned() } else { result.message.clone() };
            let why = format!("gate {name}: {last}; no decision within {} s", deadline(gate).as_secs());
            (Answer::Inconclusive(why), false)
        }
        ExternalGateState::RetryLater if now.as_millis() >= result.retry_unix_ms => {
            result.state = ExternalGateState::Asking as i32;
            (Answer::Wait(format!("gate {name}: asking again ({})", result.message)), true)
        }
        ExternalGateState::RetryLater => (Answer::Wait(format!("gate {name}: {}", result.message)), false),
        // Asked and unanswered: asked again (the caller drops a duplicate of a call in flight), so an answer
        // lost with a controller restart is asked for anew.
        _ => (Answer::Wait(format!("gate {name}: waiting for its answer")), true),
    }
}

/// The class's verdict with the gates' answers: any failure fails it, else any undecided gate makes it
/// inconclusive, else any gate still asked makes it wait.
fn verdict_of(status: &mut proto::ClassStatus, answers: &[Answer]) {
    let pick = |f: fn(&Answer) -> Option<&String>| answers.iter().filter_map(f).cloned().collect::<Vec<_>>();
    let failed = pick(|a| if let Answer::Fail(w) = a { Some(w) } else { None });
    let undecided = pick(|a| if let Answer::Inconclusive(w) = a { Some(w) } else { None });
    let waiting = pick(|a| if let Answer::Wait(w) = a { Some(w) } else { None });
    let (verdict, reasons) = if !failed.is_empty() {
        (GateVerdict::Fail, failed)
    } else if !undecided.is_empty() {
        (GateVerdict::Inconclusive, undecided)
    } else if !waiting.is_empty() {
        (GateVerdict::Waiting, waiting)
    } else {
        if !answers.is_empty() {
            status.reason = format!("{}; external gates passed", status.reason);
        }
        return;
    };
    status.verdict = verdict as i32;
    status.reason = format!("{}; {}", status.reason, reasons.join("; "));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(name: &str) -> proto::ExternalGate {
        proto::ExternalGate { name: name.into(), webhook: name.into(), ..Default::default() }
    }

    fn query(name: &str) -> proto::ExternalGate {
        proto::ExternalGate {
            name: name.into(),
            promql: "x".into(),
            op: "<".into(),
            threshold: 1.0,
            deadline_seconds: 60,
            ..Default::default()
        }
    }

    fn passing(classes: &[&str]) -> BTreeMap<String, proto::ClassStatus> {
        classes
            .iter()
            .map(|c| {
                let s = proto::ClassStatus {
                    class: (*c).into(),
                    verdict: GateVerdict::Pass as i32,
                    reason: "ok".into(),
                    ..Default::default()
                };
                ((*c).to_owned(), s)
            })
            .collect()
    }

    fn answer(rollout: &mut proto::Rollout, gate: &str, class: &str, state: ExternalGateState, message: &str) {
        let r = rollout.external_gates.iter_mut().find(|r| r.gate == gate && r.class == class).expect("asked");
        (r.state, r.message) = (state as i32, message.into());
    }

    fn verdicts(classes: &BTreeMap<String, proto::ClassStatus>) -> Vec<(String, GateVerdict)> {
        classes.values().map(|c| (c.class.clone(), GateVerdict::try_from(c.verdict).expect("verdict"))).collect()
    }

    #[test]
    fn a_webhook_is_asked_once_for_every_class_and_its_answer_decides_them_all() {
        let mut rollout = proto::Rollout { current_step: 1, ..Default::default() };
        let gates = [webhook("approval")];
        let mut classes = passing(&["pi4", "pi5"]);
        let asks = apply(&mut rollout, &gates, &mut classes, UnixMs(0));
        assert_eq!(asks, [Ask { gate: "approval".into(), class: String::new(), step: 1 }]);
        assert!(verdicts(&classes).iter().all(|(_, v)| *v == GateVerdict::Waiting));

        answer(&mut rollout, "approval", "", ExternalGateState::Failed, "change freeze");
        let mut classes = passing(&["pi4", "pi5"]);
        assert!(apply(&mut rollout, &gates, &mut classes, UnixMs(1_000)).is_empty());
        assert!(verdicts(&classes).iter().all(|(_, v)| *v == GateVerdict::Fail));
        assert!(classes["pi4"].reason.contains("gate approval: change freeze"), "{}", classes["pi4"].reason);

        answer(&mut rollout, "approval", "", ExternalGateState::Passed, "ok");
        let mut classes = passing(&["pi4", "pi5"]);
        apply(&mut rollout, &gates, &mut classes, UnixMs(2_000));
        assert!(verdicts(&classes).iter().all(|(_, v)| *v == GateVerdict::Pass));
    }

    #[test]
    fn queries_are_per_class_retried_when_due_and_inconclusive_past_their_deadline() {
        let mut rollout = proto::Rollout::default();
        let gates = [query("errors")];
        let mut classes = passing(&["pi4", "pi5"]);
        let asks = apply(&mut rollout, &gates, &mut classes, UnixMs(0));
        assert_eq!(asks.iter().map(|a| a.class.as_str()).collect::<Vec<_>>(), ["pi4", "pi5"]);

        answer(&mut rollout, "errors", "pi4", ExternalGateState::Failed, "value 3 is not < 1");
        answer(&mut rollout, "errors", "pi5", ExternalGateState::RetryLater, "no data");
        let pi5 = rollout.external_gates.iter_mut().find(|r| r.class == "pi5").expect("pi5");
        pi5.retry_unix_ms = 10_000;
        let mut classes = passing(&["pi4", "pi5"]);
        assert!(apply(&mut rollout, &gates, &mut classes, UnixMs(5_000)).is_empty(), "the retry is not due");
        assert_eq!(verdicts(&classes), [("pi4".into(), GateVerdict::Fail), ("pi5".into(), GateVerdict::Waiting)]);

        let mut classes = passing(&["pi5"]);
        let asks = apply(&mut rollout, &gates, &mut classes, UnixMs(10_000));
        assert_eq!(asks.len(), 1, "the retry is due");
        let mut classes = passing(&["pi5"]);
        apply(&mut rollout, &gates, &mut classes, UnixMs(60_000));
        assert_eq!(verdicts(&classes), [("pi5".into(), GateVerdict::Inconclusive)]);
        assert!(classes["pi5"].reason.contains("no decision within 60 s"), "{}", classes["pi5"].reason);
    }

    #[test]
    fn answers_belong_to_their_step_and_classes_that_did_not_pass_are_not_asked() {
        let mut rollout = proto::Rollout::default();
        let gates = [webhook("approval")];
        apply(&mut rollout, &gates, &mut passing(&["pi4"]), UnixMs(0));
        answer(&mut rollout, "approval", "", ExternalGateState::Passed, "ok");
        rollout.current_step = 1;
        let asks = apply(&mut rollout, &gates, &mut passing(&["pi4"]), UnixMs(1));
        assert_eq!(asks.len(), 1, "a new step asks again");
        assert!(rollout.external_gates.iter().all(|r| r.step == 1));

        let mut waiting = passing(&["pi4"]);
        waiting.get_mut("pi4").expect("pi4").verdict = GateVerdict::Waiting as i32;
        let mut fresh = proto::Rollout::default();
        assert!(apply(&mut fresh, &gates, &mut waiting, UnixMs(0)).is_empty());
        assert!(fresh.external_gates.is_empty());
    }
}
