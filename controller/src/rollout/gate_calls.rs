//! Calls to external gates (the I/O side of `engine::external_gates`): a webhook gate is posted the step's
//! comparison, signed like event webhooks, and answers approve / reject / retry_later; a Prometheus gate is
//! an instant query per class compared with its threshold. Each answer is recorded in the rollout (only
//! while the ask is still the current one) with a `gate` event in its history, and wakes the reconciler.
//! Calls run as tasks, at most one per (rollout, gate, class, step) and [`MAX_IN_FLIGHT`] in all.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alki_shared::clock::SharedClock;
use alki_shared::ids::RolloutId;
use alki_shared::proto::{self, ExternalGateState};
use alki_shared::webhook;
use serde::Deserialize;

use super::Rollouts;
use super::engine::external_gates::Ask;
use crate::config::GatesConfig;
use crate::store::{Keyed, StoreError};

/// Gate calls in flight at most across the controller.
pub const MAX_IN_FLIGHT: usize = 64;
/// One call's deadline (a webhook answers at once; a human's decision comes as retry_later, then approve).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of a gate's answer read at most.
const MAX_ANSWER: usize = 64 * 1024;

/// What a call found.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub state: ExternalGateState,
    pub message: String,
    pub decided_by: String,
    /// With RetryLater: how long until asking again (None: the configured retry).
    pub retry_after: Option<Duration>,
    pub value: f64,
}

impl Answer {
    fn retry(message: impl Into<String>) -> Answer {
        Answer {
            state: ExternalGateState::RetryLater,
            message: message.into(),
            decided_by: String::new(),
            retry_after: None,
            value: 0.0,
        }
    }
}

/// The external gates' caller.
pub struct GateCalls {
    rollouts: Rollouts,
    config: Arc<GatesConfig>,
    clock: SharedClock,
    client: reqwest::Client,
    in_flight: Mutex<HashSet<(RolloutId, Ask)>>,
}

impl GateCalls {
    pub fn new(rollouts: Rollouts, config: GatesConfig, clock: SharedClock) -> Result<Arc<GateCalls>, String> {
        let client = crate::outbound::client(CALL_TIMEOUT)?;
        Ok(Arc::new(GateCalls { rollouts, config: Arc::new(config), clock, client, in_flight: Mutex::default() }))
    }

    /// The configuration rollouts' gates are checked against at creation.
    pub fn config(&self) -> &GatesConfig {
        &self.config
    }

    /// Starts a call for each ask not already in flight.
    pub fn ask(self: &Arc<Self>, rollout: &Keyed<proto::Rollout>, asks: Vec<Ask>) {
        for ask in asks {
            let key = (rollout.id().clone(), ask.clone());
            {
                let mut in_flight = self.lock();
                if in_flight.contains(&key) {
                    continue;
                }
                if in_flight.len() >= MAX_IN_FLIGHT {
                    tracing::warn!(gate = %ask.gate, "Too many gate calls in flight; asking later.");
                    return;
                }
                in_flight.insert(key.clone());
            }
            let span = tracing::info_span!("gate", rollout_id = %rollout.id(), gate = %ask.gate, class = %ask.class);
            let (calls, snapshot) = (self.clone(), rollout.record().clone());
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let answer = calls.call(&snapshot, &ask).await;
                    let recorded = calls.clone();
                    let key2 = key.clone();
                    let result = tokio::task::spawn_blocking(move || recorded.record(&key2.0, &key2.1, answer)).await;
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::error!(%error, "Could not record a gate's answer."),
                        Err(error) => tracing::error!(%error, "Recording a gate's answer panicked."),
                    }
                    calls.lock().remove(&key);
                    calls.rollouts.fleet.changed.notify_one();
                },
                span,
            ));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(RolloutId, Ask)>> {
        // Inserts and removes only.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call(&self, rollout: &proto::Rollout, ask: &Ask) -> Answer {
        let gate = rollout.spec.as_ref().and_then(|s| s.external_gates.iter().find(|g| g.name == ask.gate));
        let Some(gate) = gate else { return Answer::retry(format!("the rollout has no gate {}", ask.gate)) };
        if gate.webhook.is_empty() {
            self.query(rollout, gate, &ask.class).await
        } else {
            self.webhook(rollout, gate, ask).await
        }
    }

    /// Posts the step's comparison to a webhook gate and reads its decision.
    async fn webhook(&self, rollout: &proto::Rollout, gate: &proto::ExternalGate, ask: &Ask) -> Answer {
        let Some(target) = self.config.webhooks.get(&gate.webhook) else {
            return Answer::retry(format!(
                "webhook gate {:?} is not configured on this controller (--gates-file)",
                gate.webhook
            ));
        };
        let body = serde_json::json!({
            "gate": gate.name,
            "rollout_id": rollout.id,
            "step": ask.step + 1,
            "steps": rollout.spec.as_ref().map(|s| s.steps.len()).unwrap_or(0),
            "candidate": rollout.candidate,
            "classes": rollout.classes,
            "rollout": rollout,
        })
        .to_string();
        let key = match webhook::secret_key(&target.secret) {
            Ok(key) => key,
            Err(e) => return Answer::retry(e.to_string()),
        };
        let id = format!("alki-gate-{}-{}-{}", rollout.id, ask.step, gate.name);
        let timestamp = self.clock.now().as_millis() / 1000;
        let sent = self
            .client
            .post(&target.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(webhook::ID_HEADER, &id)
            .header(webhook::TIMESTAMP_HEADER, timestamp.to_string())
            .header(webhook::SIGNATURE_HEADER, webhook::sign(&key, &id, timestamp, body.as_bytes()))
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => match read_capped(response).await {
                Ok(bytes) => decision(&bytes),
                Err(e) => Answer::retry(e),
            },
            Ok(response) => Answer::retry(format!("the gate answered {}", response.status())),
            Err(e) => Answer::retry(format!("the gate could not be reached: {e}")),
        }
    }

    /// Asks the configured Prometheus for the class's value and compares it with the threshold.
    async fn query(&self, rollout: &proto::Rollout, gate: &proto::ExternalGate, class: &str) -> Answer {
        let Some(prometheus) = &self.config.prometheus else {
            return Answer::retry("no Prometheus is configured on this controller (--gates-file)");
        };
        let promql = substitute(&gate.promql, class, &rollout.id);
        let mut request =
            self.client.get(format!("{}/api/v1/query", prometheus.url)).query(&[("query", promql.as_str())]);
        if let Some(token) = &prometheus.bearer_token {
            request = request.bearer_auth(token);
        }
        let bytes = match request.send().await {
            Ok(response) if response.status().is_success() => read_capped(response).await,
            Ok(response) => Err(format!("Prometheus answered {}", response.status())),
            Err(e) => Err(format!("Prometheus could not be reached: {e}")),
        };
        match bytes.and_then(|b| instant_value(&b)) {
            Ok(Some(value)) => judge_value(gate, value, &promql),
            Ok(None) => Answer::retry(format!("no data for {promql}")),
            Err(e) => Answer::retry(e),
        }
    }

    /// Writes an answer into the rollout when the ask is still current (same step, still asked).
    fn record(&self, rollout_id: &RolloutId, ask: &Ask, answer: Answer) -> Result<(), StoreError> {
        let store = &self.rollouts.fleet.store;
        let _guard = self.rollouts.lock();
        let Some(mut rollout) = store.rollout(rollout_id)? else { return Ok(()) };
        let now = self.clock.now();
        let current = rollout.current_step == ask.step && crate::facts::rollout_is_active(&rollout);
        let Some(result) = rollout
            .external_gates
            .iter_mut()
            .find(|r| current && r.gate == ask.gate && r.class == ask.class && r.step == ask.step)
            .filter(|r| r.state == ExternalGateState::Asking as i32)
        else {
            return Ok(());
        };
        result.state = answer.state as i32;
        result.message = alki_shared::text::printable(&answer.message, 512);
        result.decided_by = alki_shared::text::printable(&answer.decided_by, 128);
        result.answered_unix_ms = now.as_millis();
        result.value = answer.value;
        result.attempts += 1;
        let retry = answer.retry_after.unwrap_or(self.config.retry);
        result.retry_unix_ms = now.plus(retry).as_millis();
        let class = if ask.class.is_empty() { String::new() } else { format!(" for class {}", ask.class) };
        let message = format!("gate {}{class} at step {}: {}", ask.gate, ask.step + 1, describe(result));
        rollout.event_seq += 1;
        let event = proto::RolloutEvent {
            rollout_id: rollout_id.to_string(),
            seq: rollout.event_seq,
            unix_ms: now.as_millis(),
            kind: "gate".into(),
            message,
            device_id: String::new(),
        };
        rollout.updated_unix_ms = now.as_millis();
        store.commit_rollout(&Keyed::with_id(rollout_id.clone(), rollout), &[], &[event])
    }
}

/// "approved by alice: looks good", "rejected: freeze", "retry later: waiting for approval", "passed: 0.2 < 1".
fn describe(result: &proto::ExternalGateResult) -> String {
    let by = if result.decided_by.is_empty() { String::new() } else { format!(" by {}", result.decided_by) };
    let what = match ExternalGateState::try_from(result.state).unwrap_or(ExternalGateState::Unspecified) {
        ExternalGateState::Passed => "passed",
        ExternalGateState::Failed => "failed",
        _ => "not yet",
    };
    format!("{what}{by}: {}", result.message)
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("reading the answer: {e}"))? {
        if out.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("the answer is larger than {MAX_ANSWER} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A webhook gate's answer: `{"decision": "approve" | "reject" | "retry_later", "by": ..., "reason": ...,
/// "retry_after_seconds": ...}`.
pub fn decision(bytes: &[u8]) -> Answer {
    #[derive(Deserialize)]
    struct Body {
        decision: String,
        #[serde(default)]
        by: String,
        #[serde(default)]
        reason: String,
        retry_after_seconds: Option<u32>,
    }
    let body: Body = match serde_json::from_slice(bytes) {
        Ok(body) => body,
        Err(e) => return Answer::retry(format!("the gate's answer is not {{\"decision\": ...}} JSON: {e}")),
    };
    let state = match body.decision.as_str() {
        "approve" => ExternalGateState::Passed,
        "reject" => ExternalGateState::Failed,
        "retry_later" => ExternalGateState::RetryLater,
        other => {
            return Answer::retry(format!(
                "the gate's decision {:?} is not approve, reject or retry_later",
                alki_shared::text::printable(other, 40)
            ));
        }
    };
    let reason = if body.reason.is_empty() { body.decision.clone() } else { body.reason };
    Answer {
        state,
        message: reason,
        decided_by: body.by,
        retry_after: body.retry_after_seconds.map(|s| Duration::from_secs(u64::from(s.max(1)))),
        value: 0.0,
    }
}

/// The query with `$class` and `$rollout` replaced by the values, escaped for a PromQL string literal (so a
/// label value cannot end the string it is put in).
pub fn substitute(promql: &str, class: &str, rollout_id: &str) -> String {
    let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    promql.replace("$rollout", &escape(rollout_id)).replace("$class", &escape(class))
}

/// The value of an instant query's answer: a scalar, or a vector of exactly one sample. None: no data.
pub fn instant_value(bytes: &[u8]) -> Result<Option<f64>, String> {
    #[derive(Deserialize)]
    struct Response {
        status: String,
        #[serde(default)]
        error: String,
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Data {
        result_type: String,
        result: serde_json::Value,
    }
    let response: Response =
        serde_json::from_slice(bytes).map_err(|e| format!("Prometheus' answer is not its API's JSON: {e}"))?;
    if response.status != "success" {
        return Err(format!("Prometheus refused the query: {}", alki_shared::text::printable(&response.error, 300)));
    }
    let data = response.data.ok_or("Prometheus' answer has no data")?;
    let sample = match data.result_type.as_str() {
        "scalar" => data.result.clone(),
        "vector" => {
            let series = data.result.as_array().ok_or("a vector answer without a list")?;
            match series.len() {
                0 => return Ok(None),
                1 => series[0]["value"].clone(),
                n => return Err(format!("the query returned {n} series; aggregate it to one (e.g. max(...))")),
            }
        }
        other => return Err(format!("the query returned a {other}; gates need a scalar or one-sample vector")),
    };
    let value = sample.get(1).and_then(|v| v.as_str()).ok_or("a sample without a value")?;
    let value: f64 = value.parse().map_err(|_| format!("sample value {value:?} is not a number"))?;
    Ok((!value.is_nan()).then_some(value))
}

/// Whether `value <op> threshold` holds, as the gate's answer.
pub fn judge_value(gate: &proto::ExternalGate, value: f64, promql: &str) -> Answer {
    let holds = match gate.op.as_str() {
        "<" => value < gate.threshold,
        "<=" => value <= gate.threshold,
        ">" => value > gate.threshold,
        ">=" => value >= gate.threshold,
        other => return Answer::retry(format!("comparison {other:?} is not <, <=, > or >=")),
    };
    let message =
        format!("{promql} = {value} ({}{} {} {})", if holds { "" } else { "not " }, value, gate.op, gate.threshold);
    Answer {
        state: if holds { ExternalGateState::Passed } else { ExternalGateState::Failed },
        message,
        decided_by: String::new(),
        retry_after: None,
        value,
    }
}

/// Checks a spec's external gates against this controller's configuration, before a rollout is created.
pub fn check_spec(gates: &[proto::ExternalGate], config: &GatesConfig) -> Result<(), String> {
    const MAX_GATES: usize = 8;
    if gates.len() > MAX_GATES {
        return Err(format!("at most {MAX_GATES} external gates per rollout"));
    }
    let mut names = HashSet::new();
    for gate in gates {
        let name = &gate.name;
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!(
                "external gate name {:?} must be 1-64 letters, digits, - _ .",
                alki_shared::text::printable(name, 80)
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(format!("external gate {name:?} is named twice"));
        }
        match (gate.webhook.is_empty(), gate.promql.is_empty()) {
            (false, true) if !config.webhooks.contains_key(&gate.webhook) => {
                let known: Vec<&str> = config.webhooks.keys().map(String::as_str).collect();
                return Err(format!(
                    "external gate {name:?}: webhook gate {:?} is not configured on the controller (--gates-file names: {})",
                    gate.webhook,
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                ));
            }
            (false, true) => {}
            (true, false) if config.prometheus.is_none() => {
                return Err(format!(
                    "external gate {name:?}: a query gate needs a [prometheus] in the controller's --gates-file"
                ));
            }
            (true, false) => {
                if !["<", "<=", ">", ">="].contains(&gate.op.as_str()) || !gate.threshold.is_finite() {
                    return Err(format!("external gate {name:?}: give op (<, <=, >, >=) and a finite threshold"));
                }
                if gate.promql.len() > 4096 {
                    return Err(format!("external gate {name:?}: the query is longer than 4096 bytes"));
                }
            }
            _ => return Err(format!("external gate {name:?}: give exactly one of webhook and promql")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_read_strictly() {
        let a = decision(br#"{"decision":"approve","by":"alice","reason":"looks good"}"#);
        assert_eq!(
            (a.state, a.decided_by.as_str(), a.message.as_str()),
            (ExternalGateState::Passed, "alice", "looks good")
        );
        let r = decision(br#"{"decision":"retry_later","retry_after_seconds":5}"#);
        assert_eq!((r.state, r.retry_after), (ExternalGateState::RetryLater, Some(Duration::from_secs(5))));
        assert_eq!(decision(br#"{"decision":"reject"}"#).state, ExternalGateState::Failed);
        for bad in [&b"{}"[..], b"approve", br#"{"decision":"yes"}"#] {
            assert_eq!(decision(bad).state, ExternalGateState::RetryLater, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn substitution_escapes_label_values() {
        let q = r#"sum(rate(alki_front_errors{class="$class",rollout="$rollout"}[5m]))"#;
        assert_eq!(substitute(q, "pi5", "ro-1"), r#"sum(rate(alki_front_errors{class="pi5",rollout="ro-1"}[5m]))"#);
        assert_eq!(
            substitute(q, r#"x"} or vector(0) #"#, "r"),
            r#"sum(rate(alki_front_errors{class="x\"} or vector(0) #",rollout="r"}[5m]))"#
        );
    }

    #[test]
    fn instant_answers_are_one_value_or_no_data() {
        let vector =
            |result: &str| format!(r#"{{"status":"success","data":{{"resultType":"vector","result":{result}}}}}"#);
        assert_eq!(instant_value(vector(r#"[{"metric":{},"value":[1,"0.25"]}]"#).as_bytes()), Ok(Some(0.25)));
        assert_eq!(instant_value(vector("[]").as_bytes()), Ok(None));
        assert_eq!(instant_value(vector(r#"[{"metric":{},"value":[1,"NaN"]}]"#).as_bytes()), Ok(None));
        let two = vector(r#"[{"value":[1,"1"]},{"value":[1,"2"]}]"#);
        assert!(instant_value(two.as_bytes()).is_err_and(|e| e.contains("aggregate")));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#;
        assert_eq!(instant_value(scalar.as_bytes()), Ok(Some(3.0)));
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(instant_value(error.as_bytes()).is_err_and(|e| e.contains("parse error")));
    }

    #[test]
    fn values_are_compared_with_the_threshold() {
        let gate = proto::ExternalGate { op: "<".into(), threshold: 0.05, ..Default::default() };
        assert_eq!(judge_value(&gate, 0.01, "q").state, ExternalGateState::Passed);
        let failed = judge_value(&gate, 0.2, "q");
        assert_eq!(failed.state, ExternalGateState::Failed);
        assert!(failed.message.contains("not 0.2 < 0.05"), "{}", failed.message);
    }

    #[test]
    fn specs_name_configured_gates_only() {
        let mut config = GatesConfig::default();
        let webhook = proto::ExternalGate { name: "ok".into(), webhook: "approval".into(), ..Default::default() };
        assert!(check_spec(std::slice::from_ref(&webhook), &config).is_err_and(|e| e.contains("not configured")));
        config.webhooks.insert(
            "approval".into(),
            crate::config::WebhookGateConfig { url: "https://a".into(), secret: String::new() },
        );
        assert!(check_spec(std::slice::from_ref(&webhook), &config).is_ok());
        let query = proto::ExternalGate {
            name: "q".into(),
            promql: "up".into(),
            op: "<".into(),
            threshold: 1.0,
            ..Default::default()
        };
        assert!(check_spec(std::slice::from_ref(&query), &config).is_err_and(|e| e.contains("[prometheus]")));
        config.prometheus = Some(crate::config::PrometheusGateConfig { url: "http://p".into(), bearer_token: None });
        assert!(check_spec(&[webhook.clone(), query.clone()], &config).is_ok());
        assert!(check_spec(&[webhook.clone(), webhook.clone()], &config).is_err_and(|e| e.contains("twice")));
        let both = proto::ExternalGate { promql: "up".into(), ..webhook.clone() };
        assert!(check_spec(&[both], &config).is_err_and(|e| e.contains("exactly one")));
        let bad_op = proto::ExternalGate { op: "=~".into(), ..query };
        assert!(check_spec(&[bad_op], &config).is_err_and(|e| e.contains("op")));
    }
}
