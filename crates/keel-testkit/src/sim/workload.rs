//! A seed's workload: which instances to start, what the driver does to each
//! (events, suspend, resume, terminate, rewind), the signals it sends to an entity, and
//! the outcome each must reach, computed from the plan alone.

use serde_json::{json, Value};

use crate::rng::Rng;
use crate::sim::functions::{Round, ESCALATED};

/// What one instance does.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Activities in sequence.
    Chain {
        /// The first value.
        start: u32,
        /// How many activities.
        steps: u32,
    },
    /// Activities at once.
    FanOut {
        /// The first activity's input.
        base: u32,
        /// How many activities.
        width: u32,
    },
    /// A failing activity with a retry policy.
    Retry {
        /// How many attempts fail.
        failures: u32,
        /// The policy's attempts.
        max_attempts: u32,
    },
    /// A durable timer.
    Timer {
        /// The timer.
        delay_ms: u64,
        /// Incremented after it fires.
        value: u32,
    },
    /// An external event before a timeout.
    Await {
        /// Raised at once when `Some` (before a long timeout), never when `None`.
        value: Option<u32>,
        /// The wait's timeout.
        timeout_ms: u64,
    },
    /// Sub-orchestrations.
    Parent {
        /// The children's inputs.
        children: Vec<u32>,
    },
    /// Continue-as-new.
    Loop {
        /// Executions in all.
        rounds: u32,
        /// The first value.
        start: u32,
        /// The timer of each round.
        nap_ms: u64,
    },
    /// Suspended and resumed, then given the go-ahead.
    Gate {
        /// Suspend/resume pairs.
        cycles: u32,
        /// The go-ahead's data.
        value: u32,
    },
    /// Terminated while it waits for ever.
    Terminate {
        /// Suspended before the termination.
        suspended: bool,
    },
    /// Fails until the world repairs it; then the driver rewinds it.
    Rewind {
        /// The input.
        value: u32,
    },
    /// Entity operations from an orchestration.
    Tally {
        /// The amounts added.
        adds: Vec<i64>,
        /// Inside a critical section (calls) rather than by signals.
        locked: bool,
    },
}

/// The outcome an instance must reach.
#[derive(Clone, Debug, PartialEq)]
pub enum Expected {
    /// Completed with this output.
    Completed(Value),
    /// Failed with this error type.
    Failed(&'static str),
    /// Terminated with this output.
    Terminated(Value),
}

impl Plan {
    /// The pattern's name, for instance ids and reports.
    pub fn pattern(&self) -> &'static str {
        match self {
            Plan::Chain { .. } => "chain",
            Plan::FanOut { .. } => "fanout",
            Plan::Retry { .. } => "retry",
            Plan::Timer { .. } => "timer",
            Plan::Await { .. } => "event",
            Plan::Parent { .. } => "suborch",
            Plan::Loop { .. } => "continue",
            Plan::Gate { .. } => "suspend",
            Plan::Terminate { .. } => "terminate",
            Plan::Rewind { .. } => "rewind",
            Plan::Tally { .. } => "entity",
        }
    }

    /// What the instance must end as.
    pub fn expected(&self, instance_id: &str) -> Expected {
        match self {
            Plan::Chain { start, steps } => Expected::Completed(json!(start + steps)),
            Plan::FanOut { base, width } => Expected::Completed(json!((0..*width).map(|i| base + i + 1).sum::<u32>())),
            Plan::Retry { failures, max_attempts } if failures < max_attempts => {
                Expected::Completed(json!(failures + 1))
            }
            Plan::Retry { .. } => Expected::Failed(crate::sim::functions::TRANSIENT),
            Plan::Timer { value, .. } => Expected::Completed(json!(value + 1)),
            Plan::Await { value: Some(value), .. } => Expected::Completed(json!(value * 2)),
            Plan::Await { value: None, .. } => Expected::Completed(json!(ESCALATED)),
            Plan::Parent { children } => {
                Expected::Completed(json!(children.iter().map(|input| input + 2).sum::<u32>()))
            }
            Plan::Loop { rounds, start, .. } => Expected::Completed(json!(start + rounds)),
            Plan::Gate { value, .. } => Expected::Completed(json!(value + 1)),
            Plan::Terminate { .. } => Expected::Terminated(json!(termination_reason(instance_id))),
            Plan::Rewind { value } => Expected::Completed(json!((value + 1) * 3)),
            Plan::Tally { adds, .. } => Expected::Completed(json!(adds.iter().sum::<i64>())),
        }
    }

    /// The orchestration's input, JSON.
    pub fn input(&self, instance_id: &str) -> Value {
        match self {
            Plan::Chain { start, steps } => json!([start, steps]),
            Plan::FanOut { base, width } => json!([base, width]),
            Plan::Retry { failures, max_attempts } => json!([failures, max_attempts]),
            Plan::Timer { delay_ms, value } => json!([delay_ms, value]),
            Plan::Await { timeout_ms, .. } => json!(timeout_ms),
            Plan::Parent { children } => json!(children),
            Plan::Loop { rounds, start, nap_ms } => {
                serde_json::to_value(Round { round: 0, rounds: *rounds, value: *start, nap_ms: *nap_ms })
                    .expect("a round serializes")
            }
            Plan::Gate { .. } | Plan::Terminate { .. } => json!(null),
            Plan::Rewind { value } => json!(value),
            Plan::Tally { adds, locked } => json!([counter_key(instance_id), adds, locked]),
        }
    }

    /// The orchestration the instance runs.
    pub fn orchestration(&self) -> &'static str {
        use crate::sim::functions::*;
        match self {
            Plan::Chain { .. } => CHAIN.name(),
            Plan::FanOut { .. } => FAN_OUT.name(),
            Plan::Retry { .. } => RETRY.name(),
            Plan::Timer { .. } => TIMER.name(),
            Plan::Await { .. } => AWAIT.name(),
            Plan::Parent { .. } => PARENT.name(),
            Plan::Loop { .. } => LOOP.name(),
            Plan::Gate { .. } => GATE.name(),
            Plan::Terminate { .. } => FOREVER.name(),
            Plan::Rewind { .. } => MENDED.name(),
            Plan::Tally { .. } => TALLY.name(),
        }
    }

    /// The suspend/resume events the history must show, in order.
    pub fn expected_suspensions(&self) -> Vec<&'static str> {
        match self {
            Plan::Gate { cycles, .. } => {
                (0..*cycles).flat_map(|_| ["ExecutionSuspended", "ExecutionResumed"]).collect()
            }
            Plan::Terminate { suspended: true } => vec!["ExecutionSuspended"],
            _ => Vec::new(),
        }
    }
}

/// The output a terminated instance gets.
pub fn termination_reason(instance_id: &str) -> String {
    format!("terminated by the simulation: {instance_id}")
}

/// The key of the counter an instance's [`Plan::Tally`] adds to.
pub fn counter_key(instance_id: &str) -> String {
    instance_id.to_string()
}

/// One instance of the workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// Its id.
    pub instance_id: String,
    /// What it does.
    pub plan: Plan,
    /// When the driver starts it, in virtual milliseconds from the start of the run.
    pub start_after_ms: u64,
}

/// A seed's whole workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// The instances.
    pub instances: Vec<Planned>,
    /// How many `append` signals the driver sends to the log entity.
    pub log_signals: u32,
}

/// Draws a plan of each kind `rng` picks.
fn draw_plan(rng: &mut Rng, kind: u64) -> Plan {
    let small = |rng: &mut Rng| u32::try_from(rng.range(0, 1000)).expect("small");
    match kind {
        0 => Plan::Chain { start: small(rng), steps: rng.range(1, 7) as u32 },
        1 => Plan::FanOut { base: small(rng), width: rng.range(1, 13) as u32 },
        2 => {
            let max_attempts = rng.range(1, 5) as u32;
            Plan::Retry { failures: rng.range(0, u64::from(max_attempts) + 2) as u32, max_attempts }
        }
        3 => Plan::Timer { delay_ms: rng.range(10, 120_000), value: small(rng) },
        4 => {
            if rng.chance(0.6) {
                // Raised at once; the timeout is far beyond any clock jump of a run.
                Plan::Await { value: Some(small(rng)), timeout_ms: 86_400_000 }
            } else {
                Plan::Await { value: None, timeout_ms: rng.range(100, 60_000) }
            }
        }
        5 => Plan::Parent { children: (0..rng.range(1, 5)).map(|_| small(rng)).collect() },
        6 => Plan::Loop { rounds: rng.range(1, 6) as u32, start: small(rng), nap_ms: rng.range(1, 5_000) },
        7 => Plan::Gate { cycles: rng.range(1, 4) as u32, value: small(rng) },
        8 => Plan::Terminate { suspended: rng.chance(0.5) },
        9 => Plan::Rewind { value: small(rng) },
        _ => Plan::Tally {
            adds: (0..rng.range(1, 6)).map(|_| rng.range(1, 100) as i64).collect(),
            locked: rng.chance(0.5),
        },
    }
}

/// How many kinds of plan there are.
const KINDS: u64 = 11;

impl Workload {
    /// The workload of `seed`: every pattern at least once, a few more at random.
    pub fn generate(seed: u64, rng: &mut Rng) -> Workload {
        let extra = rng.range(0, 8);
        let mut kinds: Vec<u64> = (0..KINDS).collect();
        kinds.extend((0..extra).map(|_| rng.range(0, KINDS)));
        let instances = kinds
            .into_iter()
            .enumerate()
            .map(|(index, kind)| {
                let plan = draw_plan(rng, kind);
                let instance_id = format!("s{seed}-{index}-{}", plan.pattern());
                Planned { instance_id, plan, start_after_ms: rng.range(0, 3_000) }
            })
            .collect();
        Workload { instances, log_signals: rng.range(0, 30) as u32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_workload_with_every_pattern() {
        let workload = |seed| Workload::generate(seed, &mut Rng::new(seed));
        assert_eq!(workload(3), workload(3));
        assert_ne!(workload(3), workload(4));
        let patterns: std::collections::HashSet<&str> =
            workload(3).instances.iter().map(|planned| planned.plan.pattern()).collect();
        assert_eq!(patterns.len(), KINDS as usize);
    }

    #[test]
    fn expected_outcomes_follow_from_the_plan() {
        assert_eq!(Plan::Chain { start: 5, steps: 3 }.expected("i"), Expected::Completed(json!(8)));
        assert_eq!(Plan::FanOut { base: 10, width: 3 }.expected("i"), Expected::Completed(json!(36)));
        assert_eq!(Plan::Retry { failures: 2, max_attempts: 3 }.expected("i"), Expected::Completed(json!(3)));
        assert_eq!(Plan::Retry { failures: 3, max_attempts: 3 }.expected("i"), Expected::Failed("Transient"));
        assert_eq!(Plan::Rewind { value: 1 }.expected("i"), Expected::Completed(json!(6)));
        assert_eq!(
            Plan::Gate { cycles: 2, value: 1 }.expected_suspensions(),
            ["ExecutionSuspended", "ExecutionResumed", "ExecutionSuspended", "ExecutionResumed"]
        );
    }
}
