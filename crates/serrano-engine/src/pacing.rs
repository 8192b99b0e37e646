//! The engine's pacing decisions, on a clock handed to it: a request's urgency (its latency
//! targets and deadline) when it is queued, and the caps of the next step (see [`StepCaps`]).
//! The engine's worker calls it with its monotonic clock; the simulator (`serrano-sim`) with
//! its virtual one, so both plan the same steps: there is one copy of this policy.

use std::time::Duration;

use crate::scheduler::{Scheduler, SloClass, StepCaps, Urgency};
use crate::steptime::StepModel;

/// The time to first token an interactive request is owed (counted in
/// `serrano:slo_violations_total{kind="ttft"}` when missed).
pub const INTERACTIVE_TTFT_TARGET: Duration = Duration::from_secs(2);

/// How far off a batch request's first token is due, for ordering only: after every
/// interactive deadline of its time, and no batch request is late by it.
pub const BATCH_TTFT_HORIZON: Duration = Duration::from_secs(600);

/// How long after an interactive request arrives batch prompts are kept to short steps
/// ([`StepCaps::batch`]): a request arriving mid-step waits for the step's end, so while
/// interactive traffic is about a batch step costs no more than an interactive decode would
/// allow. Long enough to span the gaps of a tenant sending a request every few seconds; the
/// cost is batch prompt throughput, and only then.
pub const INTERACTIVE_WATCH: Duration = Duration::from_secs(30);

/// Share of the inter-token target a step is planned to take: the model predicts a mean,
/// and the target is a tail.
pub const STEP_SHARE: f64 = 0.75;

/// What a request asks for, as pacing needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Asks {
    pub class: SloClass,
    pub priority: i32,
    pub ttft_target: Option<Duration>,
    pub itl_target: Option<Duration>,
}

/// The pacing state of one engine: its default inter-token target and the interactive
/// requests seen lately.
#[derive(Debug, Clone, Default)]
pub struct Pacing {
    /// The engine's `--itl-target-ms`.
    pub default_itl: Option<Duration>,
    /// The last interactive arrival with an inter-token target, and the tightest target among
    /// those arriving within [`INTERACTIVE_WATCH`] of each other (times on the caller's clock).
    interactive_seen: Option<(Duration, Duration)>,
}

impl Pacing {
    pub fn new(default_itl: Option<Duration>) -> Pacing {
        Pacing {
            default_itl,
            interactive_seen: None,
        }
    }

    /// A request's latency targets, time to first token and between tokens: its own, else the
    /// defaults; none for batch requests.
    pub fn targets(&self, asks: &Asks) -> (Option<Duration>, Option<Duration>) {
        match asks.class {
            SloClass::Interactive => (
                Some(asks.ttft_target.unwrap_or(INTERACTIVE_TTFT_TARGET)),
                asks.itl_target.or(self.default_itl),
            ),
            SloClass::Batch => (None, None),
        }
    }

    /// The urgency of a request submitted at `submitted` and queued at `now` (both on the
    /// caller's clock), noting an interactive one for [`StepCaps::batch`].
    pub fn urgency(&mut self, asks: &Asks, submitted: Duration, now: Duration) -> Urgency {
        let (ttft, itl) = self.targets(asks);
        if let Some(t) = itl {
            let target = match self.interactive_seen {
                Some((at, was)) if now.saturating_sub(at) < INTERACTIVE_WATCH => was.min(t),
                _ => t,
            };
            self.interactive_seen = Some((now, target));
        }
        let due = submitted + ttft.unwrap_or(BATCH_TTFT_HORIZON);
        Urgency {
            priority: asks.priority,
            class: asks.class,
            deadline: u64::try_from(due.as_micros()).unwrap_or(u64::MAX),
            itl_target: itl,
        }
    }

    /// The next step's prompt-token caps at `now`, from the step-time model: beside decodes
    /// owed an inter-token target, prompt tokens fit in [`STEP_SHARE`] of the tightest one;
    /// batch prompt tokens likewise, by the tightest target of the interactive requests seen
    /// within [`INTERACTIVE_WATCH`]. `None` where nothing asks for a cap, and both `None` when
    /// no prompt tokens could run (the caps bound nothing then, and pricing them is most of a
    /// decode-only step's planning in the simulator).
    pub fn caps<P>(&self, sched: &Scheduler<P>, steps: &StepModel, now: Duration) -> StepCaps {
        if !sched.has_prompt_work() {
            return StepCaps::default();
        }
        let (decode, start, owed) = sched.decode_shape();
        let cap = |target: Duration| {
            steps.prefill_budget(decode, start, target.as_secs_f64() * STEP_SHARE)
        };
        let watched = self
            .interactive_seen
            .filter(|(at, _)| now.saturating_sub(*at) < INTERACTIVE_WATCH)
            .map(|(_, target)| target);
        StepCaps {
            prefill: owed.and_then(cap),
            batch: watched.and_then(cap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged::SharedAllocator;
    use crate::scheduler::SchedulerConfig;

    fn asks(class: SloClass) -> Asks {
        Asks {
            class,
            priority: 0,
            ttft_target: None,
            itl_target: None,
        }
    }

    #[test]
    fn urgency_and_caps_follow_the_callers_clock() {
        let ms = Duration::from_millis;
        let mut p = Pacing::new(Some(ms(100)));
        let batch = p.urgency(&asks(SloClass::Batch), ms(5), ms(5));
        assert_eq!(batch.itl_target, None);
        assert_eq!(
            batch.deadline,
            (ms(5) + BATCH_TTFT_HORIZON).as_micros() as u64
        );
        let mut sched: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 4,
                max_batch_tokens: 64,
            },
            SharedAllocator::new(16),
        );
        // 1 ms a step and 1 ms a prompt token: 75 ms of a 100 ms target holds 74 tokens.
        let steps = StepModel::from_coefficients([1e-3, 1e-3, 1e-3, 0.0]);
        // Caps bound prompt tokens: with none to run there is nothing to price.
        let _ = p.urgency(&asks(SloClass::Interactive), ms(1), ms(1));
        assert_eq!(p.caps(&sched, &steps, ms(2)), StepCaps::default());
        let mut p = Pacing::new(Some(ms(100)));
        let _ = p.urgency(&asks(SloClass::Batch), ms(5), ms(5));
        sched.add(1, "t".into(), batch, vec![1; 40], 48, true, ());
        assert_eq!(
            p.caps(&sched, &steps, ms(10)).batch,
            None,
            "no interactive yet"
        );
        let i = p.urgency(&asks(SloClass::Interactive), ms(10), ms(10));
        assert_eq!(i.itl_target, Some(ms(100)));
        assert_eq!(
            i.deadline,
            (ms(10) + INTERACTIVE_TTFT_TARGET).as_micros() as u64
        );
        assert_eq!(p.caps(&sched, &steps, ms(20)).batch, Some(74));
        // Past the watch, batch prompts run uncapped again.
        let later = ms(10) + INTERACTIVE_WATCH + ms(1);
        assert_eq!(p.caps(&sched, &steps, later).batch, None);
    }
}
