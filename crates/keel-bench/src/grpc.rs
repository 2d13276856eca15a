//! `--scenario grpc`: the gRPC path (issue 15), with an in-process gRPC client standing
//! where an SDK worker would.
//!
//! The keel-grpc server runs in the bench process on 127.0.0.1:0, on a fresh task hub
//! whose own worker registers no functions, so every orchestration and activity goes to
//! the remote worker (as `keel serve` without `--samples`). The remote worker is the
//! generated tonic client on its own thread (a current-thread runtime): it opens
//! `GetWorkItems` and handles every work item in a task of its own, a no-op SDK worker:
//! an orchestrator decides from the history (past + new events) a chain of N
//! activities (N the orchestration's input): fewer than N `TaskCompleted` events, it
//! schedules the next `Noop`; else it completes. An activity returns its input.
//!
//! Two sub-runs, each on a fresh hub: `grpc-chain` (1 instance, 100 activities) and
//! `grpc-throughput` (1000 instances x 5 activities, started together). Instances are
//! started and awaited with the in-process `keel::Client`.
//!
//! CPU: client and server share the process, so `cpu_ms_per_step_process` is the whole
//! process's CPU (getrusage RUSAGE_SELF) per activity step (one activity work item and
//! the orchestrator episode it leads to) — Keel's server, store and worker, *and* the
//! in-process tonic client. The client's own thread is measured too (RUSAGE_THREAD:
//! `cpu_ms_per_step_client`), and `cpu_ms_per_step_keel` is the difference: an
//! estimate, since what the client's thread costs the kernel on the server's behalf
//! (loopback socket work) is counted on whichever side does it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel::{Orchestration, Worker};
use keel_grpc::proto::history_event::EventType;
use keel_grpc::proto::orchestrator_action::OrchestratorActionType;
use keel_grpc::proto::task_hub_sidecar_service_client::TaskHubSidecarServiceClient;
use keel_grpc::proto::work_item::Request;
use keel_grpc::proto::{self, WorkItem};
use keel_grpc::{GrpcRemoteWorkers, Options};
use serde_json::json;
use tonic::transport::Channel;

use crate::hub::{FreshHub, HubSpec};
use crate::{percentile, round2, WAIT};

/// The chain the remote worker runs: `length` activities one after the other; the
/// output is `length`. Not registered in this process: it runs over gRPC.
const CHAIN: Orchestration<u32, u32> = Orchestration::new("GrpcChain");
/// The activity the remote worker runs: returns its input.
const NOOP: &str = "Noop";

const CPU_NOTE: &str = "client and server share the process: cpu_ms_per_step_process includes the in-process \
     tonic client (small but not zero, measured on its own thread as cpu_ms_per_step_client); \
     cpu_ms_per_step_keel is the difference";

/// CPU time used so far, in milliseconds: `RUSAGE_SELF` (the process) or
/// `RUSAGE_THREAD` (the calling thread).
fn cpu_ms(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return 0.0;
    }
    let ms = |time: libc::timeval| time.tv_sec as f64 * 1000.0 + time.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// A fresh hub served over gRPC on 127.0.0.1:0, with the remote worker connected.
struct GrpcHub {
    hub: FreshHub,
    client: keel::Client,
    worker: keel::WorkerHandle,
    stop_server: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), keel_grpc::Error>>,
    remote_worker: RemoteWorker,
}

impl GrpcHub {
    async fn start(spec: &HubSpec) -> anyhow::Result<GrpcHub> {
        let hub = spec.create().await?;
        let remote = GrpcRemoteWorkers::new();
        // Registers nothing: every orchestration and activity goes to the remote worker.
        let worker = Worker::builder(hub.store.clone()).remote_workers(remote.clone()).build().start();
        // A client of the hub, not of the worker: the worker registers no `GrpcChain`.
        let client = keel::Client::new(hub.store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        // As `keel serve` does: the activities the in-process worker hosts (none) stay
        // with it, every other one goes to the SDK worker at its creation.
        let options = Options { hosted_activities: Some(worker.client().activity_names()), ..Options::default() };
        let server = tokio::spawn(keel_grpc::serve(listener, hub.store.clone(), remote, options, async {
            let _ = stopped.await;
        }));
        let remote_worker = RemoteWorker::start(address).await?;
        Ok(GrpcHub { hub, client, worker, stop_server, server, remote_worker })
    }

    /// Stops the remote worker (returning its thread's CPU in ms and the errors it
    /// saw), the server and the worker, and deletes the hub.
    async fn finish(self) -> anyhow::Result<(f64, u64)> {
        let (client_cpu, errors) = self.remote_worker.stop().await?;
        let _ = self.stop_server.send(());
        self.server.await?.context("the gRPC server")?;
        self.worker.shutdown(Duration::from_secs(5)).await;
        drop(self.client);
        if let Err(error) = self.hub.delete().await {
            eprintln!("could not delete the bench's task hub: {error:#}");
        }
        Ok((client_cpu, errors))
    }
}

/// The no-op SDK worker: the tonic client on a thread of its own.
struct RemoteWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    /// The thread's CPU (ms) from connecting to stopping, and the errors seen.
    done: tokio::sync::oneshot::Receiver<anyhow::Result<(f64, u64)>>,
}

impl RemoteWorker {
    /// Connects, opens `GetWorkItems` and returns once the stream is open.
    async fn start(address: String) -> anyhow::Result<RemoteWorker> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("grpc-bench-client".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready_tx.send(Err(error.into()));
                    return;
                }
            };
            let result = runtime.block_on(serve_work(address, ready_tx, stopped));
            drop(runtime);
            let _ = done_tx.send(result);
        })?;
        ready.await.context("the remote worker's thread")??;
        Ok(RemoteWorker { stop, done })
    }

    async fn stop(self) -> anyhow::Result<(f64, u64)> {
        let _ = self.stop.send(());
        self.done.await.context("the remote worker's thread")?
    }
}

/// The remote worker's loop (on its own thread's runtime): a task per work item.
async fn serve_work(
    address: String,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<(f64, u64)> {
    let opened = async {
        let mut client = TaskHubSidecarServiceClient::connect(address).await?;
        let request = proto::GetWorkItemsRequest {
            max_concurrent_orchestration_work_items: 1000,
            max_concurrent_activity_work_items: 1000,
            ..Default::default()
        };
        let stream = client.get_work_items(request).await?.into_inner();
        anyhow::Ok((client, stream))
    }
    .await;
    let (client, mut stream) = match opened {
        Ok(opened) => {
            let _ = ready.send(Ok(()));
            opened
        }
        Err(error) => {
            let _ = ready.send(Err(error));
            anyhow::bail!("the remote worker could not connect");
        }
    };
    let errors = Arc::new(AtomicU64::new(0));
    let started = cpu_ms(libc::RUSAGE_THREAD);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            item = stream.message() => match item {
                Ok(Some(item)) => {
                    let client = client.clone();
                    let errors = errors.clone();
                    tokio::spawn(async move {
                        if let Err(status) = handle(client, item).await {
                            if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("grpc bench worker: {status}");
                            }
                        }
                    });
                }
                Ok(None) => break,
                Err(status) => {
                    eprintln!("grpc bench worker: the work item stream failed: {status}");
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
        }
    }
    let cpu = cpu_ms(libc::RUSAGE_THREAD) - started;
    Ok((cpu, errors.load(Ordering::Relaxed)))
}

/// Answers one work item as a no-op SDK worker.
async fn handle(mut client: TaskHubSidecarServiceClient<Channel>, item: WorkItem) -> Result<(), tonic::Status> {
    match item.request {
        Some(Request::OrchestratorRequest(request)) => {
            let mut length = 0u32;
            let mut completed = 0u32;
            for event in request.past_events.iter().chain(&request.new_events) {
                match &event.event_type {
                    Some(EventType::ExecutionStarted(started)) => {
                        length = started.input.as_deref().and_then(|input| input.parse().ok()).unwrap_or(0);
                    }
                    Some(EventType::TaskCompleted(_)) => completed += 1,
                    _ => {}
                }
            }
            let action = if completed < length {
                proto::OrchestratorAction {
                    id: completed as i32 + 1,
                    orchestrator_action_type: Some(OrchestratorActionType::ScheduleTask(proto::ScheduleTaskAction {
                        name: NOOP.into(),
                        input: Some((completed + 1).to_string()),
                        ..Default::default()
                    })),
                }
            } else {
                proto::OrchestratorAction {
                    id: length as i32 + 1,
                    orchestrator_action_type: Some(OrchestratorActionType::CompleteOrchestration(
                        proto::CompleteOrchestrationAction {
                            orchestration_status: proto::OrchestrationStatus::Completed as i32,
                            result: Some(completed.to_string()),
                            ..Default::default()
                        },
                    )),
                }
            };
            let response = proto::OrchestratorResponse {
                instance_id: request.instance_id,
                actions: vec![action],
                completion_token: item.completion_token,
                ..Default::default()
            };
            client.complete_orchestrator_task(response).await?;
        }
        Some(Request::ActivityRequest(activity)) => {
            let response = proto::ActivityResponse {
                instance_id: activity.orchestration_instance.map(|instance| instance.instance_id).unwrap_or_default(),
                task_id: activity.task_id,
                result: activity.input,
                completion_token: item.completion_token,
                failure_details: None,
            };
            client.complete_activity_task(response).await?;
        }
        Some(Request::HealthPing(_)) | None => {}
        Some(other) => return Err(tonic::Status::unimplemented(format!("the bench worker got {other:?}"))),
    }
    Ok(())
}

/// The CPU figures of a sub-run, in ms per activity step.
fn cpu_fields(result: &mut serde_json::Value, process_cpu: f64, client_cpu: f64, steps: f64) {
    let round3 = |value: f64| (value * 1000.0).round() / 1000.0;
    result["cpu_ms_per_step_process"] = json!(round3(process_cpu / steps));
    result["cpu_ms_per_step_client"] = json!(round3(client_cpu / steps));
    result["cpu_ms_per_step_keel"] = json!(round3((process_cpu - client_cpu) / steps));
    result["cpu_note"] = json!(CPU_NOTE);
}

pub(crate) async fn run_chain(store: &str, spec: &HubSpec) -> anyhow::Result<serde_json::Value> {
    const LENGTH: u32 = 100;
    let hub = GrpcHub::start(spec).await?;
    crate::warm_up(&hub.client, CHAIN).await?;
    let compiled_before = crate::sql_compiled(spec);
    let cpu_before = cpu_ms(libc::RUSAGE_SELF);
    let started = Instant::now();
    let instance = hub.client.start(CHAIN, &LENGTH).await?;
    let done = hub.client.wait_for_completion(instance.id(), WAIT).await?;
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let process_cpu = cpu_ms(libc::RUSAGE_SELF) - cpu_before;
    let compiled = crate::sql_compiled(spec) - compiled_before;
    let (client_cpu, errors) = hub.finish().await?;
    anyhow::ensure!(done.output.as_deref() == Some("100"), "the gRPC chain ended wrong: {done:?}");
    anyhow::ensure!(errors == 0, "the remote worker saw {errors} errors");
    let steps = f64::from(LENGTH);
    let mut result = json!({"scenario": "grpc-chain", "store": store, "activities": LENGTH, "wall_ms": round2(wall),
        "ms_per_activity": round2(wall / steps), "activities_per_s": round2(steps / (wall / 1000.0)),
        "cpu_ms_process": round2(process_cpu), "cpu_ms_client": round2(client_cpu),
        "sql_compiled_per_step": crate::round3(compiled as f64 / steps), "peak_rss_mib": round2(crate::peak_rss_mib())});
    cpu_fields(&mut result, process_cpu, client_cpu, steps);
    Ok(result)
}

pub(crate) async fn run_throughput(store: &str, spec: &HubSpec) -> anyhow::Result<serde_json::Value> {
    const INSTANCES: usize = 1000;
    const LENGTH: u32 = 5;
    let hub = GrpcHub::start(spec).await?;
    let cpu_before = cpu_ms(libc::RUSAGE_SELF);
    let started = Instant::now();
    let ids = crate::start_many(&hub.client, CHAIN, LENGTH, INSTANCES, "g").await?;
    let mut latencies = Vec::with_capacity(INSTANCES);
    let mut wrong = None;
    for id in &ids {
        let done = hub.client.wait_for_completion(id, WAIT).await?;
        if done.output.as_deref() != Some("5") {
            wrong.get_or_insert(format!("{id} ended wrong: {done:?}"));
        }
        let completed = done.completed_at.context("a completion time")?;
        latencies.push((completed - done.created_at).num_milliseconds() as f64);
    }
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let process_cpu = cpu_ms(libc::RUSAGE_SELF) - cpu_before;
    let (client_cpu, errors) = hub.finish().await?;
    if let Some(wrong) = wrong {
        anyhow::bail!(wrong);
    }
    anyhow::ensure!(errors == 0, "the remote worker saw {errors} errors");
    latencies.sort_by(f64::total_cmp);
    let activities = INSTANCES as f64 * f64::from(LENGTH);
    let mut result = json!({"scenario": "grpc-throughput", "store": store, "instances": INSTANCES,
        "activities": activities, "wall_ms": round2(wall), "activities_per_s": round2(activities / (wall / 1000.0)),
        "orchestrations_per_s": round2(INSTANCES as f64 / (wall / 1000.0)),
        "p50_ms": percentile(&latencies, 50.0), "p99_ms": percentile(&latencies, 99.0),
        "cpu_ms_process": round2(process_cpu), "cpu_ms_client": round2(client_cpu),
        "peak_rss_mib": round2(crate::peak_rss_mib())});
    cpu_fields(&mut result, process_cpu, client_cpu, activities);
    Ok(result)
}

/// `--scenario grpc`: `grpc-chain` and `grpc-throughput`, each on a fresh hub.
pub(crate) async fn run_grpc(store: &str, spec: &HubSpec) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(vec![run_chain(store, spec).await?, run_throughput(store, spec).await?])
}
