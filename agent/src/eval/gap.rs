//! Evaluation in a stop-then-start swap's gap: when the candidate of an activation that names a suite would
//! not fit beside itself once it serves, the memory-heavy part (the baseline's logits when not cached, then
//! the candidate's perplexity or KL divergence) runs after the old model stopped and before the candidate
//! starts, within `[eval] gap_budget_seconds` of extra outage; the golden prompts then go to the candidate's
//! new instance before the proxy releases the held requests. The candidate starts whatever the evaluation
//! does: the rollout's gate judges the report, not the agent.
//!
//! Where it runs is decided in the gap, with the memory the old model freed ([`place`]): beside the
//! candidate (then nothing happens in the gap: the evaluation after the activation runs as usual), in the
//! gap, or nowhere (the evaluation after the activation reports "does not fit" with its numbers).

use std::net::SocketAddr;
use std::time::Duration;

use alki_shared::eval::quality::{CouldNotRun, Measurement, Outcome};
use tokio::time::Instant;
use tracing::Instrument;

use super::jobs::{Reporter, activation_key, report};
use super::measure::{Limit, Model, Scored};
use super::run::{Env, Named, Request, outcome_label, suite_ref};
use super::subject::Memory;
use super::suite::AcquiredSuite;
use crate::metrics::EvalPlace;
use crate::runtime::GapWork;

/// Where an evaluation can run during a stop-then-start swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Beside the candidate once it serves: after the activation, as usual.
    Beside,
    /// Only in the gap, with the old model stopped and the candidate not started.
    Gap,
    /// Nowhere: it needs more than the gap has.
    Neither,
}

/// Where an evaluation needing `needs` bytes at once can run, with `memory` free in the gap and the candidate
/// to need `serving` bytes once it serves.
pub fn place(memory: Memory, serving: u64, needs: u64) -> Place {
    let budget = memory.budget();
    if needs <= budget.saturating_sub(serving) {
        Place::Beside
    } else if needs <= budget {
        Place::Gap
    } else {
        Place::Neither
    }
}

/// What the device loop needs to evaluate candidates in swap gaps: an environment of its own (its own work
/// directory, so the evaluation task's clean-up never removes its files) and where reports go.
#[derive(Clone)]
pub struct GapEvaluator {
    pub env: Env,
    pub reporter: Reporter,
}

impl std::fmt::Debug for GapEvaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GapEvaluator").field("work_dir", &self.env.work_dir).finish_non_exhaustive()
    }
}

impl GapEvaluator {
    /// Before a stop-then-start swap to `request`'s candidate (needing `serving` bytes once it serves): the
    /// evaluation to try in its gap, with at most `budget` more of outage. The suite is acquired now, while
    /// the old model still serves. None when the budget is zero, the candidate was evaluated already, or the
    /// suite cannot be had (the evaluation after the activation then runs as usual and reports why).
    pub async fn plan(
        &self,
        rollout_id: &str,
        request: Request,
        serving: u64,
        budget: Duration,
    ) -> Option<GapEvaluation> {
        if budget.is_zero() || self.reporter.done.contains(&activation_key(&request)).await {
            return None;
        }
        let options = self.env.pull_options().await;
        let suite = match self.env.suite(&request.suite, &options).await {
            Ok(suite) => suite,
            Err(why) => {
                tracing::warn!(%why, "The eval suite cannot be had before the swap; not evaluating in its gap.");
                return None;
            }
        };
        let named = Named::of(&request);
        Some(GapEvaluation {
            evaluator: self.clone(),
            rollout_id: rollout_id.to_owned(),
            request,
            suite,
            serving,
            budget,
            named,
            state: State::Planned,
            spent: Duration::ZERO,
        })
    }
}

/// An evaluation planned for a swap's gap, carried out through [`GapWork`] and reported by
/// [`GapEvaluation::conclude`].
pub struct GapEvaluation {
    evaluator: GapEvaluator,
    rollout_id: String,
    request: Request,
    suite: AcquiredSuite,
    serving: u64,
    budget: Duration,
    named: Named,
    state: State,
    /// Time the evaluation added to the gap.
    spent: Duration,
}

enum State {
    /// The gap has not come.
    Planned,
    /// Not for the gap: the evaluation after the activation runs (or refuses) it.
    Left(Place),
    /// Scored in the gap; the golden prompts wait for the candidate's instance. `paused` is when the gap's
    /// work paused for the candidate to start (that time is not the evaluation's).
    Scored { candidate: Box<Model>, scored: Box<Scored>, paused: Instant },
    /// Measured, or why not.
    Done(Result<Measurement, CouldNotRun>),
}

impl GapWork for GapEvaluation {
    async fn freed(&mut self) {
        let began = Instant::now();
        let limit = Limit { at: began + self.budget, budget_seconds: self.budget_seconds() };
        let scored = match tokio::time::timeout_at(limit.at, self.score(limit)).await {
            Ok(scored) => scored,
            Err(_) => Err(CouldNotRun::OutOfTime { budget_seconds: limit.budget_seconds }),
        };
        self.spent += began.elapsed();
        self.state = match scored {
            Ok(Ok((candidate, scored))) => {
                State::Scored { candidate: Box::new(candidate), scored: Box::new(scored), paused: Instant::now() }
            }
            Ok(Err(place)) => State::Left(place),
            Err(why) => State::Done(Err(why)),
        };
    }

    /// The golden prompts go to the candidate's new instance, before the proxy releases held requests. The
    /// other way, a loopback instance of its own after the release, needs the candidate's memory a second
    /// time beside the serving one: the memory that, by the time an evaluation runs here, was not there. The
    /// new instance is idle (requests are held), so its replies at temperature 0 with the suite's seed, one
    /// request at a time, are those of a private instance, and no second load of the model is paid.
    async fn started(&mut self, addr: SocketAddr) {
        let (candidate, mut scored, paused) = match std::mem::replace(&mut self.state, State::Planned) {
            State::Scored { candidate, scored, paused } => (candidate, scored, paused),
            other => {
                self.state = other;
                return;
            }
        };
        // The candidate's start is the swap's, not the evaluation's: the budget resumes where it paused.
        scored.limit.at += paused.elapsed();
        let began = Instant::now();
        let env = &self.evaluator.env;
        let measured = env.meter().golden_at(addr, &candidate, suite_ref(&self.suite), *scored).await;
        self.spent += began.elapsed();
        self.state = State::Done(measured);
    }
}

impl GapEvaluation {
    fn budget_seconds(&self) -> u32 {
        u32::try_from(self.budget.as_secs()).unwrap_or(u32::MAX)
    }

    /// In the gap: where the evaluation can run now that the memory is free, and when that is here, the
    /// candidate's (and the baseline's) perplexity runs within `limit`. `Ok(Err(place))`: not here.
    async fn score(&mut self, limit: Limit) -> Result<Result<(Model, Scored), Place>, CouldNotRun> {
        let env = &self.evaluator.env;
        let options = env.pull_options().await;
        let memory = Memory::probe(env.memory_reserve).await;
        let chosen = match env.choose(&self.request, &self.suite, memory, &options, &mut self.named).await {
            Ok(chosen) => chosen,
            Err(why) => {
                // It fails the same way after the activation, which reports it.
                tracing::info!(%why, "The evaluation cannot be prepared in the gap; it runs after the activation.");
                return Ok(Err(Place::Neither));
            }
        };
        let needs = chosen.needs();
        let place = place(memory, self.serving, needs);
        tracing::info!(
            ?place,
            needs,
            available = memory.available,
            reserve = memory.reserve,
            serving = self.serving,
            "Where the evaluation fits."
        );
        if place != Place::Gap {
            return Ok(Err(place));
        }
        let (candidate, baseline) = env.load(chosen, memory, &options).await?;
        let scored = env.meter().score(&candidate, baseline, suite_ref(&self.suite), Some(limit)).await?;
        Ok(Ok((candidate, scored)))
    }

    /// After the swap (`serving`: the candidate serves now): the outcome reported (counted as run in the gap)
    /// and remembered, so the evaluation after the activation does not run it again. Nothing is reported when
    /// it was left to that evaluation, or when the candidate did not start (its activation failed and says
    /// why; the candidate was not evaluated as it would serve).
    pub async fn conclude(mut self, serving: bool) {
        let state = std::mem::replace(&mut self.state, State::Planned);
        let outcome = match state {
            State::Done(outcome) if serving => outcome,
            State::Left(place) => {
                tracing::info!(?place, "Not evaluated in the gap; the evaluation after the activation runs it.");
                return;
            }
            _ => {
                tracing::warn!("The candidate did not start after the gap; its evaluation is not reported.");
                self.evaluator.env.tidy().await;
                return;
            }
        };
        let cut = self.cut_by_budget(&outcome);
        let outcome = match outcome {
            Ok(measurement) => Outcome::Measured(measurement),
            Err(why) => Outcome::CouldNotRun(why),
        };
        let env = &self.evaluator.env;
        env.tidy().await;
        let result = self.named.result(&self.request.suite.digest, outcome);
        let request = &self.request;
        let baseline = request.baseline.as_ref().map(|b| &b.bundle);
        let mut report = report("", &self.rollout_id, &request.candidate, &request.suite, baseline, &result);
        if let Some(problem) = cut {
            tracing::warn!(%problem, "The evaluation in the gap was cut at its budget; the candidate serves.");
            if let Some(alki_shared::proto::quality_result::Outcome::CouldNotRun(c)) =
                report.result.as_mut().and_then(|r| r.outcome.as_mut())
            {
                c.problem = problem;
            }
        }
        tracing::info!(
            outcome = outcome_label(&result.outcome),
            spent_ms = self.spent.as_millis() as u64,
            "Evaluated in the swap's gap."
        );
        // Remembered before the device loop offers the activation's evaluation, which then skips it.
        self.evaluator.reporter.done.insert(activation_key(request)).await;
        let (reporter, label, spent) = (self.evaluator.reporter.clone(), outcome_label(&result.outcome), self.spent);
        // Reporting may wait for the session's queue; the device loop does not.
        tokio::spawn(async move { reporter.finished(report, label, EvalPlace::Gap, spent).await }.in_current_span());
    }

    /// Why the evaluation stopped, when the gap's budget (not the suite's own) stopped it: for the report.
    /// On the wire it is the existing over-budget kinds with the gap's budget in seconds; this says which.
    fn cut_by_budget(&self, outcome: &Result<Measurement, CouldNotRun>) -> Option<String> {
        let budget = self.budget_seconds();
        let own = self.suite.suite.manifest.time_budget_seconds;
        let seconds = match outcome {
            Err(CouldNotRun::OutOfTime { budget_seconds })
            | Err(CouldNotRun::SuiteTooLargeForBudget { budget_seconds, .. }) => *budget_seconds,
            _ => return None,
        };
        (seconds == budget && budget <= own).then(|| {
            format!(
                "stopped at the swap gap's budget ([eval] gap_budget_seconds = {budget} in the agent's config): the \
                 evaluation did not fit beside the candidate, so it ran while requests were held, and the candidate \
                 started without it; raise gap_budget_seconds, use a smaller suite, or give the device memory to \
                 evaluate beside the served model"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_goes_beside_the_candidate_when_it_can_else_in_the_gap_else_nowhere() {
        let memory = Memory { available: 10_000, reserve: 1_000 };
        assert_eq!(place(memory, 4_000, 5_000), Place::Beside, "9,000 free: 4,000 serving and 5,000 evaluating");
        assert_eq!(place(memory, 4_000, 5_001), Place::Gap);
        assert_eq!(place(memory, 4_000, 9_000), Place::Gap, "all of the gap's memory but the reserve");
        assert_eq!(place(memory, 4_000, 9_001), Place::Neither);
        assert_eq!(place(memory, 20_000, 1), Place::Gap, "a candidate bigger than the memory left");
        let short = Memory { available: 500, reserve: 1_000 };
        assert_eq!(place(short, 0, 0), Place::Beside, "needs nothing");
        assert_eq!(place(short, 0, 1), Place::Neither);
    }
}
