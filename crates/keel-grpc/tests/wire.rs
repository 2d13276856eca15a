//! The protocol on the wire, driven by the generated Rust client standing where an SDK
//! worker would: the full round trip of an orchestration with an activity, completion
//! tokens, a dropped stream giving its work back, a Rust orchestrator in the same task
//! hub, an entity signalled by the client and called by an orchestration, and the API
//! key. (The real Python SDK runs against `keel serve` in
//! `tests/python`.)

use std::time::Duration;

use keel::{OrchestrationContext, OrchestrationError, Worker, WorkerHandle};
use keel_grpc::proto::history_event::EventType;
use keel_grpc::proto::orchestrator_action::OrchestratorActionType;
use keel_grpc::proto::task_hub_sidecar_service_client::TaskHubSidecarServiceClient;
use keel_grpc::proto::work_item::Request;
use keel_grpc::proto::{self, WorkItem};
use keel_grpc::{GrpcRemoteWorkers, Options};
use tonic::transport::Channel;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(20);

struct Hub {
    client: TaskHubSidecarServiceClient<Channel>,
    worker: Option<WorkerHandle>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), keel_grpc::Error>>,
    address: String,
    _dir: tempfile::TempDir,
}

const RUST_GREETING: keel::Orchestration<String, String> = keel::Orchestration::new("RustGreeting");

async fn rust_greeting(_ctx: OrchestrationContext, name: String) -> Result<String, OrchestrationError> {
    Ok(format!("Hello from Rust, {name}"))
}

impl Hub {
    async fn start(api_key: Option<&str>) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let store = keel::store::open(&format!("sqlite://{}", dir.path().join("hub.db").display())).await.unwrap();
        let remote = GrpcRemoteWorkers::new();
        let worker =
            Worker::builder(store.clone()).orchestration(RUST_GREETING, rust_greeting).remote_workers(remote.clone());
        let worker = worker.build().start();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let options = Options {
            api_key: api_key.map(str::to_string),
            health_ping_interval: Duration::from_millis(200),
            ..Options::default()
        };
        let server = tokio::spawn(keel_grpc::serve(listener, store, remote, options, async {
            let _ = stopped.await;
        }));
        let client = TaskHubSidecarServiceClient::connect(address.clone()).await.unwrap();
        Hub { client, worker: Some(worker), stop: Some(stop), server, address, _dir: dir }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.await.unwrap().unwrap();
        self.worker.take().unwrap().shutdown(WAIT).await;
    }

    async fn start_instance(&mut self, name: &str, input: &str) -> String {
        let request = proto::CreateInstanceRequest {
            instance_id: String::new(),
            name: name.into(),
            input: Some(input.into()),
            ..Default::default()
        };
        self.client.start_instance(request).await.unwrap().into_inner().instance_id
    }

    async fn work_items(&mut self) -> Streaming<WorkItem> {
        let request = proto::GetWorkItemsRequest {
            max_concurrent_orchestration_work_items: 10,
            max_concurrent_activity_work_items: 10,
            ..Default::default()
        };
        self.client.get_work_items(request).await.unwrap().into_inner()
    }

    async fn wait_for_completion(&mut self, instance_id: &str) -> proto::OrchestrationState {
        let mut request = tonic::Request::new(proto::GetInstanceRequest {
            instance_id: instance_id.into(),
            get_inputs_and_outputs: true,
        });
        request.set_timeout(WAIT);
        let response = self.client.wait_for_instance_completion(request).await.unwrap().into_inner();
        assert!(response.exists);
        response.orchestration_state.unwrap()
    }
}

/// The next work item that is not a health ping.
async fn next_work(stream: &mut Streaming<WorkItem>) -> WorkItem {
    loop {
        let item = tokio::time::timeout(WAIT, stream.message()).await.expect("a work item in time").unwrap().unwrap();
        if !matches!(item.request, Some(Request::HealthPing(_))) {
            return item;
        }
    }
}

fn orchestrator_request(item: &WorkItem) -> &proto::OrchestratorRequest {
    match &item.request {
        Some(Request::OrchestratorRequest(request)) => request,
        other => panic!("expected an orchestrator request, got {other:?}"),
    }
}

fn kinds(events: &[proto::HistoryEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|event| match event.event_type.as_ref().unwrap() {
            EventType::OrchestratorStarted(_) => "OrchestratorStarted",
            EventType::ExecutionStarted(_) => "ExecutionStarted",
            EventType::TaskScheduled(_) => "TaskScheduled",
            EventType::TaskCompleted(_) => "TaskCompleted",
            _ => "other",
        })
        .collect()
}

fn action(id: i32, kind: OrchestratorActionType) -> proto::OrchestratorAction {
    proto::OrchestratorAction { id, orchestrator_action_type: Some(kind) }
}

#[tokio::test]
async fn an_orchestration_with_an_activity_round_trips_over_the_wire() {
    let mut hub = Hub::start(None).await;
    let mut stream = hub.work_items().await;
    let instance_id = hub.start_instance("Remote", "\"world\"").await;

    // First episode: [OrchestratorStarted, ExecutionStarted] → schedule an activity.
    let item = next_work(&mut stream).await;
    let request = orchestrator_request(&item);
    assert_eq!(request.instance_id, instance_id);
    assert!(request.past_events.is_empty());
    assert_eq!(kinds(&request.new_events), ["OrchestratorStarted", "ExecutionStarted"]);
    let response = proto::OrchestratorResponse {
        instance_id: instance_id.clone(),
        actions: vec![action(
            1,
            OrchestratorActionType::ScheduleTask(proto::ScheduleTaskAction {
                name: "Greet".into(),
                input: Some("\"world\"".into()),
                ..Default::default()
            }),
        )],
        custom_status: Some("\"greeting\"".into()),
        completion_token: item.completion_token.clone(),
        ..Default::default()
    };
    hub.client.complete_orchestrator_task(response.clone()).await.unwrap();
    let stale = hub.client.complete_orchestrator_task(response).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::NotFound, "a token is settled once");

    // The activity.
    let item = next_work(&mut stream).await;
    let Some(Request::ActivityRequest(activity)) = &item.request else { panic!("{item:?}") };
    assert_eq!((activity.name.as_str(), activity.task_id), ("Greet", 1));
    assert_eq!(activity.orchestration_instance.as_ref().unwrap().instance_id, instance_id);
    let wrong_task = proto::ActivityResponse {
        instance_id: instance_id.clone(),
        task_id: 7,
        result: Some("\"x\"".into()),
        completion_token: item.completion_token.clone(),
        failure_details: None,
    };
    let refused = hub.client.complete_activity_task(wrong_task).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // The refused item went back to the task hub and comes again under a new token.
    let item = next_work(&mut stream).await;
    let Some(Request::ActivityRequest(_)) = &item.request else { panic!("{item:?}") };
    hub.client
        .complete_activity_task(proto::ActivityResponse {
            instance_id: instance_id.clone(),
            task_id: 1,
            result: Some("\"Hello world\"".into()),
            completion_token: item.completion_token.clone(),
            failure_details: None,
        })
        .await
        .unwrap();

    // Second episode: the committed history is replayed, the result is new.
    let item = next_work(&mut stream).await;
    let request = orchestrator_request(&item);
    assert_eq!(kinds(&request.past_events), ["OrchestratorStarted", "ExecutionStarted", "TaskScheduled"]);
    assert_eq!(request.past_events[2].event_id, 1, "event ids are the action ids");
    assert_eq!(kinds(&request.new_events), ["OrchestratorStarted", "TaskCompleted"]);
    hub.client
        .complete_orchestrator_task(proto::OrchestratorResponse {
            instance_id: instance_id.clone(),
            actions: vec![action(
                2,
                OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
                    orchestration_status: proto::OrchestrationStatus::Completed as i32,
                    result: Some("\"Hello world\"".into()),
                    ..Default::default()
                }),
            )],
            custom_status: Some("\"done\"".into()),
            completion_token: item.completion_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let state = hub.wait_for_completion(&instance_id).await;
    assert_eq!(state.orchestration_status, proto::OrchestrationStatus::Completed as i32);
    assert_eq!(state.output.as_deref(), Some("\"Hello world\""));
    assert_eq!(state.custom_status.as_deref(), Some("\"done\""));
    assert!(state.completed_timestamp.is_some());

    // A Rust orchestrator in the same task hub never reaches the remote worker.
    let rust = hub.start_instance("RustGreeting", "\"Ada\"").await;
    let state = hub.wait_for_completion(&rust).await;
    assert_eq!(state.output.as_deref(), Some("\"Hello from Rust, Ada\""));
    hub.stop().await;
}

#[tokio::test]
async fn work_on_a_dropped_stream_goes_to_the_next_worker() {
    let mut hub = Hub::start(None).await;
    let mut first = hub.work_items().await;
    let instance_id = hub.start_instance("Remote", "1").await;
    let lost = next_work(&mut first).await;
    assert_eq!(orchestrator_request(&lost).instance_id, instance_id);
    drop(first);

    let mut second = hub.work_items().await;
    let again = next_work(&mut second).await;
    let request = orchestrator_request(&again);
    assert_eq!(request.instance_id, instance_id);
    assert_ne!(again.completion_token, lost.completion_token);
    let complete = |token: &str| proto::OrchestratorResponse {
        instance_id: instance_id.clone(),
        actions: vec![action(
            1,
            OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
                orchestration_status: proto::OrchestrationStatus::Completed as i32,
                result: Some("2".into()),
                ..Default::default()
            }),
        )],
        completion_token: token.to_string(),
        ..Default::default()
    };
    let late = hub.client.complete_orchestrator_task(complete(&lost.completion_token)).await.unwrap_err();
    assert_eq!(late.code(), tonic::Code::NotFound, "the dropped stream's token is void");
    hub.client.complete_orchestrator_task(complete(&again.completion_token)).await.unwrap();
    assert_eq!(hub.wait_for_completion(&instance_id).await.output.as_deref(), Some("2"));
    hub.stop().await;
}

/// Issue 14, defect 5: a worker that goes away holding a step (its stream dropped, as
/// when its process is killed) gives the step back without counting it toward poison:
/// far more drops than the poison threshold, and the instance still completes.
#[tokio::test]
async fn workers_that_drop_their_stream_holding_a_step_never_make_it_poison() {
    let mut hub = Hub::start(None).await;
    let instance_id = hub.start_instance("Remote", "1").await;
    let drops = 3 * keel_core::limits::MAX_DELIVERY_ATTEMPTS;
    for _ in 0..drops {
        let mut stream = hub.work_items().await;
        let held = next_work(&mut stream).await;
        assert_eq!(orchestrator_request(&held).instance_id, instance_id, "the same step, given back each time");
        drop(stream);
    }
    let mut last = hub.work_items().await;
    let item = next_work(&mut last).await;
    let response = proto::OrchestratorResponse {
        instance_id: instance_id.clone(),
        actions: vec![action(
            1,
            OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
                orchestration_status: proto::OrchestrationStatus::Completed as i32,
                result: Some("\"survived\"".into()),
                ..Default::default()
            }),
        )],
        completion_token: item.completion_token.clone(),
        ..Default::default()
    };
    hub.client.complete_orchestrator_task(response).await.unwrap();
    let state = hub.wait_for_completion(&instance_id).await;
    assert_eq!(state.orchestration_status, proto::OrchestrationStatus::Completed as i32, "{state:?}");
    assert_eq!(state.output.as_deref(), Some("\"survived\""));
    hub.stop().await;
}

#[tokio::test]
async fn malformed_and_unknown_requests_get_status_codes() {
    let mut hub = Hub::start(None).await;
    let unknown = hub
        .client
        .get_instance(proto::GetInstanceRequest { instance_id: "nobody".into(), get_inputs_and_outputs: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.exists);
    let code = |result: Result<tonic::Response<proto::RaiseEventResponse>, tonic::Status>| result.unwrap_err().code();
    let raise = proto::RaiseEventRequest { instance_id: "nobody".into(), name: "E".into(), input: None };
    assert_eq!(code(hub.client.raise_event(raise).await), tonic::Code::NotFound);

    let mut stream = hub.work_items().await;
    let instance_id = hub.start_instance("Remote", "null").await;
    let item = next_work(&mut stream).await;
    let malformed = proto::OrchestratorResponse {
        instance_id: instance_id.clone(),
        actions: vec![proto::OrchestratorAction { id: 1, orchestrator_action_type: None }],
        completion_token: item.completion_token.clone(),
        ..Default::default()
    };
    let refused = hub.client.complete_orchestrator_task(malformed).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // Nothing of it was applied; the episode comes again.
    let item = next_work(&mut stream).await;
    assert_eq!(kinds(&orchestrator_request(&item).new_events), ["OrchestratorStarted", "ExecutionStarted"]);
    hub.client
        .abandon_task_orchestrator_work_item(proto::AbandonOrchestrationTaskRequest {
            completion_token: item.completion_token.clone(),
        })
        .await
        .unwrap();
    let item = next_work(&mut stream).await;
    assert_eq!(orchestrator_request(&item).instance_id, instance_id, "an abandoned item is delivered again");
    hub.stop().await;
}

#[tokio::test]
async fn the_api_key_is_required_when_set() {
    let mut hub = Hub::start(Some("s3cret")).await;
    let denied = hub.client.hello(()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(());
    request.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    hub.client.hello(request).await.unwrap();
    let channel = Channel::from_shared(hub.address.clone()).unwrap().connect().await.unwrap();
    let mut keyed = TaskHubSidecarServiceClient::with_interceptor(channel, |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        Ok(request)
    });
    let started = keyed
        .start_instance(proto::CreateInstanceRequest {
            instance_id: "keyed".into(),
            name: "RustGreeting".into(),
            input: Some("\"key\"".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(started.into_inner().instance_id, "keyed");
    hub.stop().await;
}

fn success(result: &str) -> proto::OperationResult {
    proto::OperationResult {
        result_type: Some(proto::operation_result::ResultType::Success(proto::OperationResultSuccess {
            result: Some(result.into()),
            ..Default::default()
        })),
    }
}

fn entity_request(item: &WorkItem) -> &proto::EntityRequest {
    match &item.request {
        Some(Request::EntityRequestV2(request)) => request,
        other => panic!("expected an entity request, got {other:?}"),
    }
}

#[tokio::test]
async fn entities_round_trip_over_the_wire() {
    let mut hub = Hub::start(None).await;
    let mut stream = hub.work_items().await;
    hub.client
        .signal_entity(proto::SignalEntityRequest {
            instance_id: "@counter@w1".into(),
            name: "add".into(),
            input: Some("5".into()),
            request_id: "client-request".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let item = next_work(&mut stream).await;
    let batch = entity_request(&item);
    assert_eq!((batch.instance_id.as_str(), batch.entity_state.as_deref()), ("@counter@w1", None));
    let [operation] = batch.operation_requests.as_slice() else { panic!("{batch:?}") };
    let Some(EventType::EntityOperationSignaled(signal)) = &operation.event_type else { panic!("{operation:?}") };
    assert_eq!((signal.operation.as_str(), signal.input.as_deref()), ("add", Some("5")));

    // A result count that does not match is refused and nothing is applied: the batch
    // comes again, under a new token.
    let wrong = proto::EntityBatchResult { completion_token: item.completion_token.clone(), ..Default::default() };
    let refused = hub.client.complete_entity_task(wrong).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let item = next_work(&mut stream).await;
    assert_eq!(entity_request(&item).operation_requests.len(), 1);
    let done = proto::EntityBatchResult {
        results: vec![success("")],
        entity_state: Some("5".into()),
        completion_token: item.completion_token.clone(),
        ..Default::default()
    };
    hub.client.complete_entity_task(done.clone()).await.unwrap();
    let stale = hub.client.complete_entity_task(done).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::NotFound, "a token is settled once");
    let entity = hub
        .client
        .get_entity(proto::GetEntityRequest { instance_id: "@counter@w1".into(), include_state: true })
        .await
        .unwrap()
        .into_inner();
    assert!(entity.exists);
    assert_eq!(entity.entity.unwrap().serialized_state.as_deref(), Some("5"));

    // An orchestration calls the entity and gets its answer.
    let instance_id = hub.start_instance("Remote", "null").await;
    let item = next_work(&mut stream).await;
    let execution_id = orchestrator_request(&item).execution_id.clone();
    let call = proto::EntityOperationCalledEvent {
        request_id: "call-1".into(),
        operation: "get".into(),
        parent_instance_id: Some(instance_id.clone()),
        target_instance_id: Some("@counter@w1".into()),
        ..Default::default()
    };
    hub.client
        .complete_orchestrator_task(proto::OrchestratorResponse {
            instance_id: instance_id.clone(),
            actions: vec![action(
                1,
                OrchestratorActionType::SendEntityMessage(proto::SendEntityMessageAction {
                    entity_message_type: Some(
                        proto::send_entity_message_action::EntityMessageType::EntityOperationCalled(call),
                    ),
                }),
            )],
            completion_token: item.completion_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let item = next_work(&mut stream).await;
    let batch = entity_request(&item);
    assert_eq!(batch.entity_state.as_deref(), Some("5"));
    let Some(EventType::EntityOperationCalled(called)) = &batch.operation_requests[0].event_type else { panic!() };
    assert_eq!(called.parent_instance_id.as_deref(), Some(instance_id.as_str()));
    assert_eq!(called.parent_execution_id, execution_id, "the caller's execution, which the SDK does not send");
    hub.client
        .complete_entity_task(proto::EntityBatchResult {
            results: vec![success("5")],
            entity_state: Some("5".into()),
            completion_token: item.completion_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let item = next_work(&mut stream).await;
    let request = orchestrator_request(&item);
    let echo = request
        .past_events
        .iter()
        .find(|event| matches!(event.event_type, Some(EventType::EntityOperationCalled(_))))
        .expect("the call is in history");
    assert_eq!(echo.event_id, 1, "its event id is the action id");
    let answer = request
        .new_events
        .iter()
        .find_map(|event| match &event.event_type {
            Some(EventType::EntityOperationCompleted(completed)) => Some(completed),
            _ => None,
        })
        .expect("the answer is a new event");
    assert_eq!((answer.request_id.as_str(), answer.output.as_deref()), ("call-1", Some("5")));
    hub.client
        .complete_orchestrator_task(proto::OrchestratorResponse {
            instance_id: instance_id.clone(),
            actions: vec![action(
                2,
                OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
                    orchestration_status: proto::OrchestrationStatus::Completed as i32,
                    result: Some("5".into()),
                    ..Default::default()
                }),
            )],
            completion_token: item.completion_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(hub.wait_for_completion(&instance_id).await.output.as_deref(), Some("5"));

    // Queries return entity ids only; ids that are not entity ids are refused.
    let page = hub
        .client
        .query_entities(proto::QueryEntitiesRequest {
            query: Some(proto::EntityQuery { instance_id_starts_with: Some("@counter@".into()), ..Default::default() }),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = page.entities.iter().map(|entity| entity.instance_id.as_str()).collect();
    assert_eq!(ids, ["@counter@w1"]);
    assert!(page.entities[0].serialized_state.is_none(), "no state unless asked for");
    let bad = hub
        .client
        .get_entity(proto::GetEntityRequest { instance_id: "counter-w1".into(), include_state: false })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let missing = hub
        .client
        .get_entity(proto::GetEntityRequest { instance_id: "@counter@nobody".into(), include_state: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!missing.exists);
    hub.stop().await;
}

/// A worker that advertises `WORKER_CAPABILITY_HISTORY_STREAMING` gets orchestrator work
/// items whose history would exceed the 4 MiB message limit without their past events
/// (`requiresHistoryStreaming`) and streams them with `StreamInstanceHistory`, in chunks
/// under the limit. (This client keeps tonic's default 4 MiB receive limit.)
#[tokio::test]
async fn histories_over_the_message_limit_are_streamed_to_workers_that_ask() {
    const TASKS: i32 = 6;
    let mut hub = Hub::start(None).await;
    let request = proto::GetWorkItemsRequest {
        capabilities: vec![proto::WorkerCapability::HistoryStreaming as i32],
        ..Default::default()
    };
    let mut stream = hub.client.get_work_items(request).await.unwrap().into_inner();
    let instance_id = hub.start_instance("Big", "null").await;
    let big_result = format!("\"{}\"", "x".repeat(900 * 1024));
    let mut streamed = 0;
    loop {
        let item = next_work(&mut stream).await;
        match &item.request {
            Some(Request::ActivityRequest(activity)) => {
                let response = proto::ActivityResponse {
                    instance_id: instance_id.clone(),
                    task_id: activity.task_id,
                    result: Some(big_result.clone()),
                    completion_token: item.completion_token.clone(),
                    failure_details: None,
                };
                hub.client.complete_activity_task(response).await.unwrap();
            }
            Some(Request::OrchestratorRequest(request)) => {
                let mut past = request.past_events.clone();
                if request.requires_history_streaming {
                    assert!(past.is_empty(), "a streamed history is not in the work item");
                    let mut chunks = hub
                        .client
                        .stream_instance_history(proto::StreamInstanceHistoryRequest {
                            instance_id: instance_id.clone(),
                            execution_id: request.execution_id.clone(),
                            for_work_item_processing: true,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    while let Some(chunk) = chunks.message().await.unwrap() {
                        past.extend(chunk.events);
                    }
                    streamed += 1;
                }
                if let Some(first) = past.first() {
                    assert_eq!(kinds(std::slice::from_ref(first)), ["OrchestratorStarted"], "the whole history");
                }
                let events = past.iter().chain(&request.new_events);
                let completed =
                    events.filter(|event| matches!(event.event_type, Some(EventType::TaskCompleted(_)))).count();
                // One activity at a time (each episode's new events stay small).
                let actions = if completed < TASKS as usize {
                    vec![action(
                        completed as i32 + 1,
                        OrchestratorActionType::ScheduleTask(proto::ScheduleTaskAction {
                            name: "Big".into(),
                            ..Default::default()
                        }),
                    )]
                } else {
                    vec![action(
                        TASKS + 1,
                        OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
                            orchestration_status: proto::OrchestrationStatus::Completed as i32,
                            result: Some(completed.to_string()),
                            ..Default::default()
                        }),
                    )]
                };
                let done = completed == TASKS as usize;
                let response = proto::OrchestratorResponse {
                    instance_id: instance_id.clone(),
                    actions,
                    completion_token: item.completion_token.clone(),
                    ..Default::default()
                };
                hub.client.complete_orchestrator_task(response).await.unwrap();
                if done {
                    break;
                }
            }
            other => panic!("unexpected work: {other:?}"),
        }
    }
    assert!(streamed > 0, "the last episodes' histories were streamed");
    let state = hub.wait_for_completion(&instance_id).await;
    assert_eq!(state.output.as_deref(), Some("6"));
    drop(stream);
    hub.stop().await;
}

/// A codec that sends and receives raw bytes, to put what is not a protobuf message
/// into a gRPC frame.
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buffer: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buffer, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buffer: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let length = prost::bytes::Buf::remaining(buffer);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(buffer, length).to_vec()))
    }
}

/// Every RPC of the protocol definition: its name, and whether it answers with a stream.
fn rpcs() -> Vec<(String, bool)> {
    let proto = include_str!("../proto/orchestrator_service.proto");
    proto
        .lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix("rpc ")?;
            let name = line.split('(').next()?.trim().to_string();
            Some((name, line.contains("returns (stream ")))
        })
        .collect()
}

#[tokio::test]
async fn a_request_that_is_not_a_protobuf_message_is_invalid_argument_on_every_rpc() {
    let hub = Hub::start(None).await;
    let channel = Channel::from_shared(hub.address.clone()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let rpcs = rpcs();
    assert!(rpcs.len() > 20, "the RPCs are read from the .proto file: {rpcs:?}");
    // Eleven bytes with the continuation bit set: a field key that is not a varint,
    // whatever the message.
    let garbage = vec![0xff; 11];
    for (rpc, streams) in rpcs {
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("/TaskHubSidecarService/{rpc}")).unwrap();
        let request = tonic::Request::new(garbage.clone());
        let status = if streams {
            match grpc.server_streaming(request, path, RawBytes).await {
                Ok(response) => response.into_inner().message().await.expect_err("a stream of a garbage request"),
                Err(status) => status,
            }
        } else {
            grpc.unary(request, path, RawBytes).await.expect_err("a reply to a garbage request")
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{rpc}: {status:?}");
    }
    // Nothing was written.
    let query = proto::QueryInstancesRequest {
        query: Some(proto::InstanceQuery { max_instance_count: 10, ..Default::default() }),
    };
    let mut client = hub.client.clone();
    assert!(client.query_instances(query).await.unwrap().into_inner().orchestration_state.is_empty());
    hub.stop().await;
}

/// JSON text of `depth` nested arrays around a number.
fn nested_json(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn json_nested_deeper_than_the_limit_is_invalid_argument_and_writes_nothing() {
    let mut hub = Hub::start(None).await;
    let limit = keel_core::limits::MAX_JSON_DEPTH;
    let too_deep = nested_json(limit + 1);
    let start = |instance_id: &str, input: &str| proto::CreateInstanceRequest {
        instance_id: instance_id.into(),
        name: "Remote".into(),
        input: Some(input.into()),
        ..Default::default()
    };
    // Twice encoded (a JSON string holding JSON, as the Durable Functions Python client
    // sends inputs) is checked as the JSON it holds.
    let encoded_twice = serde_json::to_string(&too_deep).unwrap();
    for input in [&too_deep, &encoded_twice] {
        let refused = hub.client.start_instance(start("deep", input)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(&format!("{limit}")), "{refused:?}");
    }
    let get = proto::GetInstanceRequest { instance_id: "deep".into(), get_inputs_and_outputs: false };
    assert!(!hub.client.get_instance(get).await.unwrap().into_inner().exists, "a refused start wrote an instance");

    // At the limit: accepted. Then event data and a termination output beyond it are refused.
    hub.client.start_instance(start("at-limit", &nested_json(limit))).await.unwrap();
    let raise =
        proto::RaiseEventRequest { instance_id: "at-limit".into(), name: "E".into(), input: Some(too_deep.clone()) };
    assert_eq!(hub.client.raise_event(raise).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let terminate =
        proto::TerminateRequest { instance_id: "at-limit".into(), output: Some(too_deep.clone()), recursive: false };
    assert_eq!(hub.client.terminate_instance(terminate).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let signal = proto::SignalEntityRequest {
        instance_id: "@counter@deep".into(),
        name: "add".into(),
        input: Some(too_deep.clone()),
        ..Default::default()
    };
    assert_eq!(hub.client.signal_entity(signal).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    let get = proto::GetInstanceRequest { instance_id: "at-limit".into(), get_inputs_and_outputs: true };
    let state = hub.client.get_instance(get).await.unwrap().into_inner().orchestration_state.unwrap();
    assert_eq!(state.orchestration_status, proto::OrchestrationStatus::Pending as i32, "a refused termination applied");
    // The instance's first episode holds its start only: no event, no termination.
    let mut stream = hub.work_items().await;
    let item = next_work(&mut stream).await;
    let request = orchestrator_request(&item);
    assert_eq!(request.instance_id, "at-limit");
    assert_eq!(kinds(&request.new_events), ["OrchestratorStarted", "ExecutionStarted"]);
    let entities = proto::QueryEntitiesRequest {
        query: Some(proto::EntityQuery { include_transient: true, ..Default::default() }),
    };
    let entities = hub.client.query_entities(entities).await.unwrap().into_inner().entities;
    assert!(entities.is_empty(), "a refused signal reached an entity: {entities:?}");
    hub.stop().await;
}

#[tokio::test]
async fn instance_ids_with_slashes_or_control_characters_are_refused() {
    let mut hub = Hub::start(None).await;
    for instance_id in ["a/b", "/", "a\\b", "a\nb", "a\u{0}b", "a\u{7f}b", "a\u{85}b", ".", ".."] {
        let request = proto::CreateInstanceRequest {
            instance_id: instance_id.into(),
            name: "Remote".into(),
            input: Some("null".into()),
            ..Default::default()
        };
        let refused = hub.client.start_instance(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{instance_id:?}: {refused:?}");
    }
    let query = proto::QueryInstancesRequest {
        query: Some(proto::InstanceQuery { max_instance_count: 10, ..Default::default() }),
    };
    assert!(hub.client.query_instances(query.clone()).await.unwrap().into_inner().orchestration_state.is_empty());

    // A worker's sub-orchestration under such an id is refused too, and nothing of the
    // episode is applied.
    let mut stream = hub.work_items().await;
    let parent = hub.start_instance("Remote", "null").await;
    for instance_id in ["a/b", "a\nb"] {
        let item = next_work(&mut stream).await;
        let sub = OrchestratorActionType::CreateSubOrchestration(proto::CreateSubOrchestrationAction {
            instance_id: instance_id.into(),
            name: "Child".into(),
            ..Default::default()
        });
        let response = proto::OrchestratorResponse {
            instance_id: parent.clone(),
            actions: vec![action(1, sub)],
            completion_token: item.completion_token.clone(),
            ..Default::default()
        };
        let refused = hub.client.complete_orchestrator_task(response).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{instance_id:?}: {refused:?}");
    }
    let states = hub.client.query_instances(query).await.unwrap().into_inner().orchestration_state;
    assert_eq!(states.iter().map(|state| state.instance_id.as_str()).collect::<Vec<_>>(), [parent.as_str()]);
    hub.stop().await;
}

/// Tokens a worker might try for another worker's item, knowing its own token: its
/// neighbours if the token ends in a counter, and its shape with other digits.
fn forgeries(token: &str) -> Vec<String> {
    let mut forged = Vec::new();
    let split = token.rfind(|c: char| !c.is_ascii_digit()).map_or(0, |index| index + 1);
    let (prefix, digits) = token.split_at(split);
    if let Ok(counter) = digits.parse::<u64>() {
        for delta in 1..=8 {
            forged.push(format!("{prefix}{}", counter + delta));
            forged.push(format!("{prefix}{}", counter.saturating_sub(delta)));
        }
    }
    let flipped: String = token.chars().map(|c| if c == '0' { '1' } else { '0' }).collect();
    forged.extend([flipped, String::new(), "0".repeat(token.len()), format!("{token}0")]);
    forged.retain(|forged| forged != token);
    forged
}

#[tokio::test]
async fn a_forged_completion_token_is_refused_and_changes_nothing() {
    let mut hub = Hub::start(None).await;
    let mut honest = hub.work_items().await;
    let first = hub.start_instance("Remote", "1").await;
    let honest_item = next_work(&mut honest).await;
    assert_eq!(orchestrator_request(&honest_item).instance_id, first);
    // A second worker gets the next item: it knows its own token only.
    let mut attacker = hub.work_items().await;
    let second = hub.start_instance("Remote", "2").await;
    let own = next_work(&mut attacker).await;
    assert_eq!(orchestrator_request(&own).instance_id, second);

    let complete = |token: &str, output: &str| proto::OrchestratorResponse {
        instance_id: String::new(), // the attacker does not even need the id
        actions: vec![action(
            1,
            OrchestratorActionType::CompleteOrchestration(proto::CompleteOrchestrationAction {
                orchestration_status: proto::OrchestrationStatus::Completed as i32,
                result: Some(output.into()),
                ..Default::default()
            }),
        )],
        completion_token: token.to_string(),
        ..Default::default()
    };
    for forged in forgeries(&own.completion_token) {
        let refused = hub.client.complete_orchestrator_task(complete(&forged, "\"forged\"")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::NotFound, "forged token {forged:?}: {refused:?}");
        let abandon = proto::AbandonOrchestrationTaskRequest { completion_token: forged.clone() };
        let refused = hub.client.abandon_task_orchestrator_work_item(abandon).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::NotFound, "forged token {forged:?}: {refused:?}");
    }
    for token in [&honest_item.completion_token, &own.completion_token] {
        assert!(
            token.len() >= 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
            "a token is at least 128 bits of hex: {token}"
        );
    }
    // Neither instance moved: both complete with their workers' own answers.
    hub.client.complete_orchestrator_task(complete(&honest_item.completion_token, "\"honest\"")).await.unwrap();
    hub.client.complete_orchestrator_task(complete(&own.completion_token, "\"own\"")).await.unwrap();
    assert_eq!(hub.wait_for_completion(&first).await.output.as_deref(), Some("\"honest\""));
    assert_eq!(hub.wait_for_completion(&second).await.output.as_deref(), Some("\"own\""));
    hub.stop().await;
}
