//! The worker builds of the versioning test (`tests/versioning.rs`), run as fleet
//! worker processes (see [`super::fleet`]): every build registers the code of
//! orchestration versions 1, 2 and 3 side by side, so that only its version policy
//! decides which instances it runs.
//!
//! Every run of orchestration code appends one line to the worker's orchestration log
//! (`worker instance code version step replay`: which version's code ran, the version of
//! the instance it ran for, where in the code, and whether it was replaying), replays
//! included, whether or not the episode was committed; the parent checks from the logs
//! that no worker ever ran code it must not run.

use std::sync::Arc;
use std::time::Duration;

use keel::{
    Activity, ActivityContext, Never, Orchestration, OrchestrationContext, OrchestrationError, VersionFailure,
    VersionMatch, Versioning, WorkerOptions,
};
use keel_store::Store;
use serde::{Deserialize, Serialize};

use super::fleet::ExecutionLog;

/// The extension of the orchestration logs.
pub const ORCHESTRATION_LOG: &str = "orchestrations";

/// A build of version 1 that runs only version 1 instances.
pub const STRICT_1: &str = "strict-1";
/// A build of version 2 that runs version 2 instances and older ones.
pub const CURRENT_OR_OLDER_2: &str = "current-or-older-2";

/// The version policy of `build`; both leave the instances they may not run for
/// another worker.
pub fn versioning(build: &str) -> Versioning {
    let (version, match_strategy) = match build {
        STRICT_1 => ("1", VersionMatch::Strict),
        CURRENT_OR_OLDER_2 => ("2", VersionMatch::CurrentOrOlder),
        other => panic!("unknown build {other}"),
    };
    Versioning {
        version: Some(version.to_owned()),
        default_version: Some(version.to_owned()),
        match_strategy,
        failure_strategy: VersionFailure::Reject,
    }
}

/// Whether a worker of `build` may run an instance of `version`.
pub fn may_run(build: &str, version: &str) -> bool {
    match build {
        STRICT_1 => version == "1",
        CURRENT_OR_OLDER_2 => version == "1" || version == "2",
        other => panic!("unknown build {other}"),
    }
}

/// The input of [`FLOW`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowInput {
    pub start: u32,
    /// Version 1's code continues as new on version 2 at its end.
    pub upgrade: bool,
}

/// Version 1: two activities, output `v1 N`; continues as new on version 2 when
/// `upgrade`. Version 2: one activity, then [`CHILD`] as a sub-orchestration
/// `<id>-child`, which inherits version 2; output `v2 <child's output>`. Version 3:
/// must never run.
pub const FLOW: Orchestration<FlowInput, String> = Orchestration::new("VersionedFlow");
/// One activity; the output names the code that ran and the instance's version.
pub const CHILD: Orchestration<u32, String> = Orchestration::new("VersionedChild");
const ADD_ONE: Activity<u32, u32, Never> = Activity::new("VersionedAddOne");

/// What a flow of `version` started with `input` ends with, and the version the
/// instance ends on.
pub fn expected_output(version: &str, input: FlowInput) -> (String, &'static str) {
    let child = |value: u32| format!("v2 {} (child: code 2, version 2)", value + 1);
    match (version, input.upgrade) {
        ("1", false) => (format!("v1 {}", input.start + 2), "1"),
        // Version 1 adds two, then version 2 starts from there.
        ("1", true) => (child(input.start + 3), "2"),
        ("2", _) => (child(input.start + 1), "2"),
        other => panic!("no expected output for {other:?}"),
    }
}

/// Appends a line for a run of `code`'s code at `step`.
fn record(log: &ExecutionLog, ctx: &OrchestrationContext, code: &str, step: &str) {
    let version = ctx.version().unwrap_or_else(|| "-".to_owned());
    let replay = if ctx.is_replaying() { "replay" } else { "new" };
    log.record(format_args!("{} {code} {version} {step} {replay}", ctx.instance_id()));
}

async fn flow_v1(
    ctx: OrchestrationContext,
    input: FlowInput,
    log: Arc<ExecutionLog>,
) -> Result<String, OrchestrationError> {
    record(&log, &ctx, "1", "start");
    let mut value = ctx.call(ADD_ONE, &input.start).await?;
    record(&log, &ctx, "1", "middle");
    value = ctx.call(ADD_ONE, &value).await?;
    record(&log, &ctx, "1", "end");
    if input.upgrade {
        return ctx.continue_as_new_with_version(&FlowInput { start: value, upgrade: false }, "2");
    }
    Ok(format!("v1 {value}"))
}

async fn flow_v2(
    ctx: OrchestrationContext,
    input: FlowInput,
    log: Arc<ExecutionLog>,
) -> Result<String, OrchestrationError> {
    record(&log, &ctx, "2", "start");
    let value = ctx.call(ADD_ONE, &input.start).await?;
    record(&log, &ctx, "2", "middle");
    let child = ctx.call_with_instance_id(CHILD, &format!("{}-child", ctx.instance_id()), &value).await?;
    record(&log, &ctx, "2", "end");
    Ok(format!("v2 {child}"))
}

async fn flow_v3(
    ctx: OrchestrationContext,
    _: FlowInput,
    log: Arc<ExecutionLog>,
) -> Result<String, OrchestrationError> {
    record(&log, &ctx, "3", "start");
    Ok("v3".to_owned())
}

async fn child(
    ctx: OrchestrationContext,
    value: u32,
    log: Arc<ExecutionLog>,
    code: &'static str,
) -> Result<String, OrchestrationError> {
    record(&log, &ctx, code, "start");
    let value = ctx.call(ADD_ONE, &value).await?;
    record(&log, &ctx, code, "end");
    let version = ctx.version().unwrap_or_else(|| "-".to_owned());
    Ok(format!("{value} (child: code {code}, version {version})"))
}

/// The worker of `build`, logging its orchestration code runs to `log`. Short leases,
/// so that the work of a killed worker is taken over quickly.
pub fn worker(store: Arc<dyn Store>, build: &str, log: Arc<ExecutionLog>) -> keel::Worker {
    let options = WorkerOptions {
        orchestration_lease: Duration::from_secs(2),
        activity_lease: Duration::from_secs(2),
        idle_poll: Duration::from_millis(100),
        versioning: versioning(build),
        ..WorkerOptions::default()
    };
    let (v1, v2, v3) = (log.clone(), log.clone(), log.clone());
    let (c1, c2, c3) = (log.clone(), log.clone(), log);
    keel::Worker::builder(store)
        .options(options)
        .orchestration_version(FLOW, "1", move |ctx, input| flow_v1(ctx, input, v1.clone()))
        .orchestration_version(FLOW, "2", move |ctx, input| flow_v2(ctx, input, v2.clone()))
        .orchestration_version(FLOW, "3", move |ctx, input| flow_v3(ctx, input, v3.clone()))
        .orchestration_version(CHILD, "1", move |ctx, value| child(ctx, value, c1.clone(), "1"))
        .orchestration_version(CHILD, "2", move |ctx, value| child(ctx, value, c2.clone(), "2"))
        .orchestration_version(CHILD, "3", move |ctx, value| child(ctx, value, c3.clone(), "3"))
        .activity(ADD_ONE, |_: ActivityContext, value: u32| async move {
            // A little work, so that a kill can land while an activity runs.
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<u32, Never>(value + 1)
        })
        .build()
}
