//! The functions the simulation runs: one orchestration per pattern, the activities
//! and entities they use, and the [`World`] outside the task hub that activities act
//! on (it outlives every simulated process, as a real database or mail server would).
//!
//! Activities record each execution in the world, keyed by the call they serve, so the
//! checker can tell at-least-once executions from results recorded once. Each checks
//! the [`Life`] of the process that runs it: a dead process does no more work.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::{
    Activity, ActivityContext, ActivityError, EntityContext, EntityError, EntityId, Event, Never, Orchestration,
    OrchestrationContext, OrchestrationError, RetryPolicy, WorkerBuilder,
};
use serde::{Deserialize, Serialize};

use crate::faults::Life;
use crate::rng;

/// `(start, steps)`: adds one `steps` times, in sequence.
pub const CHAIN: Orchestration<(u32, u32), u32> = Orchestration::new("SimChain");
/// `(base, width)`: adds one to `base + i` for each `i < width` at once, sums.
pub const FAN_OUT: Orchestration<(u32, u32), u32> = Orchestration::new("SimFanOut");
/// `(failures, max_attempts)`: a call that fails `failures` times, retried; the
/// attempt that succeeded.
pub const RETRY: Orchestration<(u32, u32), u32> = Orchestration::new("SimRetry");
/// `(delay_ms, value)`: a durable timer, then adds one.
pub const TIMER: Orchestration<(u64, u32), u32> = Orchestration::new("SimTimer");
/// `timeout_ms`: waits for [`VALUE`] (twice its data) or escalates ([`ESCALATED`]).
pub const AWAIT: Orchestration<u64, u32> = Orchestration::new("SimAwait");
/// Children's inputs: runs [`CHILD`] for each, sums their outputs.
pub const PARENT: Orchestration<Vec<u32>, u32> = Orchestration::new("SimParent");
/// Adds one twice.
pub const CHILD: Orchestration<u32, u32> = Orchestration::new("SimChild");
/// Adds one and sleeps per round, continuing as new until the last round.
pub const LOOP: Orchestration<Round, u32> = Orchestration::new("SimLoop");
/// Waits for [`GO`], then adds one to its data (driven by suspend and resume).
pub const GATE: Orchestration<(), u32> = Orchestration::new("SimGate");
/// Waits for an event nobody sends: only a termination ends it.
pub const FOREVER: Orchestration<(), ()> = Orchestration::new("SimForever");
/// Adds one, then calls [`FRAGILE`], which fails until the world repairs it; a rewind
/// completes it.
pub const MENDED: Orchestration<u32, u32> = Orchestration::new("SimMended");
/// `(key, adds, locked)`: signals `add` to `SimCounter@key` for each amount (inside a
/// critical section when `locked`), then reads it.
pub const TALLY: Orchestration<(String, Vec<i64>, bool), i64> = Orchestration::new("SimTally");

/// Adds one.
pub const ADD_ONE: Activity<u32, u32, Never> = Activity::new("SimAddOne");
/// Fails its first `input` attempts (error type [`TRANSIENT`]); returns the attempt.
pub const FLAKY: Activity<u32, u32> = Activity::new("SimFlaky");
/// Fails (error type [`BROKEN`]) until the world repairs the instance; then triples.
pub const FRAGILE: Activity<u32, u32> = Activity::new("SimFragile");
/// What a wait that timed out falls back to.
pub const ESCALATE: Activity<(), u32, Never> = Activity::new("SimEscalate");

/// The data of [`AWAIT`]'s event.
pub const VALUE: Event<u32> = Event::new("Value");
/// The go-ahead of [`GATE`].
pub const GO: Event<u32> = Event::new("Go");
/// The event [`FOREVER`] waits for, never sent.
pub const NEVER: Event<()> = Event::new("Never");

/// The entity [`TALLY`] adds to: an `i64` with `add` and `get`.
pub const COUNTER: &str = "SimCounter";
/// The entity the driver signals: keeps every `append` input in the order applied.
pub const LOG: &str = "SimLog";

/// [`ESCALATE`]'s answer.
pub const ESCALATED: u32 = 7777;
/// [`FLAKY`]'s error type.
pub const TRANSIENT: &str = "Transient";
/// [`FRAGILE`]'s error type.
pub const BROKEN: &str = "Broken";

/// [`LOOP`]'s input: where the loop stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// This round's number, from 0.
    pub round: u32,
    /// How many rounds in all.
    pub rounds: u32,
    /// The running value.
    pub value: u32,
    /// The timer of each round.
    pub nap_ms: u64,
}

async fn chain(ctx: OrchestrationContext, (start, steps): (u32, u32)) -> Result<u32, OrchestrationError> {
    let mut value = start;
    for _ in 0..steps {
        value = ctx.call(ADD_ONE, &value).await?;
    }
    Ok(value)
}

async fn fan_out(ctx: OrchestrationContext, (base, width): (u32, u32)) -> Result<u32, OrchestrationError> {
    let results = ctx.try_when_all((0..width).map(|i| ctx.call(ADD_ONE, &(base + i)))).await?;
    Ok(results.into_iter().sum())
}

async fn retry(ctx: OrchestrationContext, (failures, max_attempts): (u32, u32)) -> Result<u32, OrchestrationError> {
    let policy = RetryPolicy::new(max_attempts, Duration::from_millis(200))?.with_backoff_coefficient(2.0)?;
    Ok(ctx.call(FLAKY, &failures).with_retry(policy).await?)
}

async fn timer(ctx: OrchestrationContext, (delay_ms, value): (u64, u32)) -> Result<u32, OrchestrationError> {
    ctx.sleep(Duration::from_millis(delay_ms)).await;
    Ok(ctx.call(ADD_ONE, &value).await?)
}

async fn wait_for_value(ctx: OrchestrationContext, timeout_ms: u64) -> Result<u32, OrchestrationError> {
    match ctx.wait(VALUE).timeout(Duration::from_millis(timeout_ms)).await? {
        Some(value) => Ok(value * 2),
        None => Ok(ctx.call(ESCALATE, &()).await?),
    }
}

async fn parent(ctx: OrchestrationContext, children: Vec<u32>) -> Result<u32, OrchestrationError> {
    let outputs = ctx.try_when_all(children.iter().map(|input| ctx.call(CHILD, input))).await?;
    Ok(outputs.into_iter().sum())
}

async fn child(ctx: OrchestrationContext, input: u32) -> Result<u32, OrchestrationError> {
    let once = ctx.call(ADD_ONE, &input).await?;
    Ok(ctx.call(ADD_ONE, &once).await?)
}

async fn loop_rounds(ctx: OrchestrationContext, round: Round) -> Result<u32, OrchestrationError> {
    let value = ctx.call(ADD_ONE, &round.value).await?;
    ctx.sleep(Duration::from_millis(round.nap_ms)).await;
    if round.round + 1 >= round.rounds {
        return Ok(value);
    }
    ctx.continue_as_new(&Round { round: round.round + 1, value, ..round })
}

async fn gate(ctx: OrchestrationContext, (): ()) -> Result<u32, OrchestrationError> {
    let value = ctx.wait(GO).await?;
    Ok(ctx.call(ADD_ONE, &value).await?)
}

async fn forever(ctx: OrchestrationContext, (): ()) -> Result<(), OrchestrationError> {
    Ok(ctx.wait(NEVER).await?)
}

async fn mended(ctx: OrchestrationContext, value: u32) -> Result<u32, OrchestrationError> {
    let once = ctx.call(ADD_ONE, &value).await?;
    Ok(ctx.call(FRAGILE, &once).await?)
}

async fn tally(
    ctx: OrchestrationContext,
    (key, adds, locked): (String, Vec<i64>, bool),
) -> Result<i64, OrchestrationError> {
    let counter = EntityId::new(COUNTER, &key).map_err(OrchestrationError::msg)?;
    if locked {
        let _section = ctx.lock_entities([&counter]).await?;
        for amount in &adds {
            ctx.call_entity::<i64>(&counter, "add", amount).await?;
        }
        return Ok(ctx.call_entity(&counter, "get", &()).await?);
    }
    for amount in &adds {
        ctx.signal_entity(&counter, "add", amount)?;
    }
    Ok(ctx.call_entity(&counter, "get", &()).await?)
}

fn counter(ctx: &mut EntityContext<i64>) -> Result<i64, EntityError> {
    match ctx.operation() {
        "add" => *ctx.state_mut() += ctx.input::<i64>()?,
        "get" => {}
        _ => return Err(ctx.unknown_operation()),
    }
    Ok(ctx.state().copied().unwrap_or_default())
}

fn log(ctx: &mut EntityContext<Vec<u32>>) -> Result<usize, EntityError> {
    match ctx.operation() {
        "append" => {
            let value: u32 = ctx.input()?;
            ctx.state_mut().push(value);
        }
        _ => return Err(ctx.unknown_operation()),
    }
    Ok(ctx.state().map_or(0, Vec::len))
}

/// One call an activity served: instance, execution, task id.
pub type CallKey = (String, String, i32);

/// The world outside the task hub: what activities did, and what the driver repaired.
#[derive(Debug, Default)]
pub struct World {
    executions: Mutex<HashMap<CallKey, u32>>,
    /// Per instance and execution, the task ids [`FLAKY`] was called with.
    flaky_calls: Mutex<HashMap<(String, String), BTreeSet<i32>>>,
    repaired: Mutex<HashSet<String>>,
}

impl World {
    fn executed(&self, ctx: &ActivityContext) {
        let key = (ctx.instance_id.clone(), ctx.execution_id.clone(), ctx.task_id);
        *self.executions.lock().expect("world lock").entry(key).or_default() += 1;
    }

    /// How many times the call was executed.
    pub fn executions(&self, key: &CallKey) -> u32 {
        self.executions.lock().expect("world lock").get(key).copied().unwrap_or(0)
    }

    /// Executions beyond the first, over every call: the at-least-once re-runs.
    pub fn reruns(&self) -> u64 {
        self.executions.lock().expect("world lock").values().map(|runs| u64::from(runs.saturating_sub(1))).sum()
    }

    /// Which attempt of its retried call this [`FLAKY`] task is (from 1): its rank
    /// among the task ids of the calls of its execution. A re-run of the same task gets
    /// the same answer, so the outcome does not depend on how often it ran.
    fn flaky_attempt(&self, ctx: &ActivityContext) -> u32 {
        let mut calls = self.flaky_calls.lock().expect("world lock");
        let tasks = calls.entry((ctx.instance_id.clone(), ctx.execution_id.clone())).or_default();
        tasks.insert(ctx.task_id);
        u32::try_from(tasks.range(..ctx.task_id).count()).expect("few attempts") + 1
    }

    /// Makes [`FRAGILE`] succeed for the instance from now on.
    pub fn repair(&self, instance_id: &str) {
        self.repaired.lock().expect("world lock").insert(instance_id.to_string());
    }

    fn is_repaired(&self, instance_id: &str) -> bool {
        self.repaired.lock().expect("world lock").contains(instance_id)
    }
}

/// Virtual time an activity takes: a few milliseconds, by its call.
fn work_time(ctx: &ActivityContext) -> Duration {
    let draw =
        rng::hash(&[ctx.task_id as u64, ctx.instance_id.len() as u64, ctx.instance_id.bytes().map(u64::from).sum()]);
    Duration::from_millis(draw % 40)
}

/// Runs one activity of a process whose life is `life`: works a little, then (if
/// still alive) records the execution in the world and answers.
async fn act<T>(life: &Life, world: &World, ctx: &ActivityContext, answer: impl FnOnce() -> T) -> T {
    life.alive().await;
    tokio::time::sleep(work_time(ctx)).await;
    life.alive().await;
    world.executed(ctx);
    answer()
}

/// Registers every orchestration, activity and entity of the simulation, for a process
/// whose life is `life`, acting on `world`.
pub fn register(builder: WorkerBuilder, world: &Arc<World>, life: &Arc<Life>) -> WorkerBuilder {
    let activity = |world: &Arc<World>, life: &Arc<Life>| (world.clone(), life.clone());
    let (add_world, add_life) = activity(world, life);
    let (flaky_world, flaky_life) = activity(world, life);
    let (fragile_world, fragile_life) = activity(world, life);
    let (escalate_world, escalate_life) = activity(world, life);
    builder
        .orchestration(CHAIN, chain)
        .orchestration(FAN_OUT, fan_out)
        .orchestration(RETRY, retry)
        .orchestration(TIMER, timer)
        .orchestration(AWAIT, wait_for_value)
        .orchestration(PARENT, parent)
        .orchestration(CHILD, child)
        .orchestration(LOOP, loop_rounds)
        .orchestration(GATE, gate)
        .orchestration(FOREVER, forever)
        .orchestration(MENDED, mended)
        .orchestration(TALLY, tally)
        .activity(ADD_ONE, move |ctx: ActivityContext, value: u32| {
            let (world, life) = (add_world.clone(), add_life.clone());
            async move { act(&life, &world, &ctx, || Ok::<_, Never>(value + 1)).await }
        })
        .activity(FLAKY, move |ctx: ActivityContext, failures: u32| {
            let (world, life) = (flaky_world.clone(), flaky_life.clone());
            async move {
                act(&life, &world, &ctx, || {
                    let attempt = world.flaky_attempt(&ctx);
                    if attempt <= failures {
                        return Err(ActivityError::new(TRANSIENT, format!("attempt {attempt} failed")));
                    }
                    Ok(attempt)
                })
                .await
            }
        })
        .activity(FRAGILE, move |ctx: ActivityContext, value: u32| {
            let (world, life) = (fragile_world.clone(), fragile_life.clone());
            async move {
                act(&life, &world, &ctx, || {
                    if !world.is_repaired(&ctx.instance_id) {
                        return Err(ActivityError::new(BROKEN, "not repaired yet"));
                    }
                    Ok(value * 3)
                })
                .await
            }
        })
        .activity(ESCALATE, move |ctx: ActivityContext, ()| {
            let (world, life) = (escalate_world.clone(), escalate_life.clone());
            async move { act(&life, &world, &ctx, || Ok::<_, Never>(ESCALATED)).await }
        })
        .entity(COUNTER, counter)
        .entity(LOG, log)
}
