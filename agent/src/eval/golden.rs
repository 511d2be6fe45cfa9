//! Golden prompts on a loopback llama-server of the candidate (a port of its own, never behind the front
//! proxy, at a low CPU priority; or, after a stop-then-start gap, the candidate's new serving instance before
//! the proxy sends it anything): each asked deterministically, its reply judged with the prompt's checks and
//! the model's control tokens (from its GGUF and `/props`).

use std::net::SocketAddr;
use std::time::Duration;

use alki_shared::eval::checks::CheckFailure;
use alki_shared::eval::prompts::GoldenPrompt;
use alki_shared::eval::quality::GoldenSummary;
use tokio::time::Instant;

use crate::runtime::instance::request;
use crate::runtime::priority::Priority;
use crate::runtime::{HttpClient, Instance, InstanceOptions, LaunchSpec, StopPolicy};

/// The context golden prompts run with when the bundle names none (llama-server would take the model's
/// training context, which can be far larger than a golden prompt needs).
pub const GOLDEN_CONTEXT: u32 = 4096;
/// Bound on `/props`.
const PROPS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why golden prompts could not be run at all (a failing prompt is a result, not this).
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error("the candidate's loopback llama-server did not start for the golden prompts: {0}")]
    Start(String),
    /// The deadline passed; the instance was stopped.
    #[error("the golden prompts did not finish before the deadline")]
    OutOfTime,
}

/// How golden prompts run: the instance options, at what priority, until when.
pub struct Golden<'a> {
    pub instance: &'a InstanceOptions,
    pub http: &'a HttpClient,
    pub priority: Priority,
    pub deadline: Instant,
}

impl Golden<'_> {
    /// Starts the candidate as `spec` says (one slot, a bounded context), asks every prompt with `seed`,
    /// judges the replies (with `control_tokens` from the model's GGUF, and `/props`' own), and stops it.
    pub async fn run(
        &self,
        spec: LaunchSpec,
        prompts: &[GoldenPrompt],
        seed: u32,
        control_tokens: &[String],
    ) -> Result<GoldenSummary, GoldenError> {
        if prompts.is_empty() {
            return Ok(GoldenSummary::new(0, Vec::new()));
        }
        let start = Instance::start_at(self.instance, golden_spec(spec), self.http, self.priority);
        let instance = match tokio::time::timeout_at(self.deadline, start).await {
            Ok(Ok(instance)) => instance,
            Ok(Err(e)) => return Err(GoldenError::Start(e.to_string())),
            Err(_) => return Err(GoldenError::OutOfTime),
        };
        let asked = self.ask_at(instance.addr(), prompts, seed, control_tokens).await;
        // Nothing else uses this instance and every request has ended: stop it at once.
        instance.stop(&StopPolicy::default()).await;
        asked
    }

    /// Asks every prompt of a llama-server already running on `addr` (loopback, nothing else asking it), and
    /// judges the replies as [`Golden::run`] does.
    pub async fn ask_at(
        &self,
        addr: SocketAddr,
        prompts: &[GoldenPrompt],
        seed: u32,
        control_tokens: &[String],
    ) -> Result<GoldenSummary, GoldenError> {
        let asked = tokio::time::timeout_at(self.deadline, self.ask_all(addr, prompts, seed, control_tokens)).await;
        let failures = asked.map_err(|_| GoldenError::OutOfTime)?;
        Ok(GoldenSummary::new(prompts.len() as u32, failures))
    }

    async fn ask_all(
        &self,
        addr: SocketAddr,
        prompts: &[GoldenPrompt],
        seed: u32,
        control_tokens: &[String],
    ) -> Vec<CheckFailure> {
        let mut tokens = control_tokens.to_vec();
        tokens.extend(props_tokens(self.http, addr).await);
        tokens.sort();
        tokens.dedup();
        let mut failures = Vec::new();
        for prompt in prompts {
            failures.extend(self.ask(addr, prompt, seed, &tokens).await);
        }
        failures
    }

    /// One prompt's failures: its failed checks, or the reply itself when llama-server gave none.
    async fn ask(&self, addr: SocketAddr, prompt: &GoldenPrompt, seed: u32, tokens: &[String]) -> Vec<CheckFailure> {
        let asked = prompt.request(seed);
        let body = asked.body.to_string();
        let remaining = self.deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let no_reply = |reason: String| {
            vec![CheckFailure { prompt: prompt.id.clone(), check: 0, label: "reply".to_owned(), reason }]
        };
        match request(self.http, addr, "POST", asked.path, Some(&body), remaining).await {
            Ok((200, answer)) => match prompt.read_reply(&answer) {
                Ok(reply) => prompt.judge(&reply, tokens),
                Err(e) => no_reply(e.to_string()),
            },
            Ok((code, answer)) => {
                let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
                no_reply(format!("llama-server answered {code}: {text}"))
            }
            Err(e) => no_reply(format!("llama-server did not answer: {e}")),
        }
    }
}

/// The candidate's spec for golden prompts: one slot (deterministic replies), and a bounded context when the
/// bundle names none.
fn golden_spec(mut spec: LaunchSpec) -> LaunchSpec {
    spec.settings.parallel_slots = 1;
    if spec.settings.context_size == 0 {
        spec.settings.context_size = GOLDEN_CONTEXT;
    }
    spec
}

/// The BOS and EOS tokens and the template's markers, as the running llama-server reports them in `/props`.
async fn props_tokens(http: &HttpClient, addr: SocketAddr) -> Vec<String> {
    let Ok((200, body)) = request(http, addr, "GET", "/props", None, PROPS_TIMEOUT).await else {
        return Vec::new();
    };
    let Ok(props) = serde_json::from_slice::<serde_json::Value>(&body) else { return Vec::new() };
    let mut tokens: Vec<String> = ["bos_token", "eos_token"]
        .iter()
        .filter_map(|k| props[*k].as_str())
        .filter(|t| !t.trim().is_empty())
        .map(str::to_owned)
        .collect();
    tokens.extend(super::vocab::control_tokens(props["chat_template"].as_str().unwrap_or_default(), &[], &[]));
    tokens
}
