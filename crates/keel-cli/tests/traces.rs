//! OpenTelemetry traces end to end: a real `keel serve` exports its spans over OTLP
//! (HTTP/protobuf) to a receiver in this test, which decodes them with the
//! `opentelemetry-proto` types. A PlaceOrder run started over HTTP with a `traceparent`
//! header yields one trace under that parent: the start, the execution's span (from its
//! start to its end), its episodes and its activities, each under the right parent. An
//! approval workflow whose host is killed mid-run and started again still yields one
//! trace, its execution's span keeping the id its earlier children name. Timers and
//! entity operations get spans under whoever set or asked for them; over OTLP/gRPC (a
//! tonic receiver here) a sub-orchestration's execution hangs under its parent's.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use common::{http, wait_for_status, wait_until_finished, Server, WAIT};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;

/// A span as received: ids in hex, the attributes that matter here.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    instance_id: Option<String>,
    service_name: Option<String>,
    start_nanos: u64,
    end_nanos: u64,
}

/// An OTLP/HTTP receiver on 127.0.0.1 that keeps every span it is sent.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let kept = kept.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                    keep(request, &kept);
                    // An empty ExportTraceServiceResponse.
                    Vec::<u8>::new()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let endpoint = format!("http://{}", listener.local_addr().expect("an address"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("the receiver serves") });
        Receiver { endpoint, spans }
    }

    /// The host's environment: export to this receiver, in batches of at most 50 ms.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            ("OTEL_SERVICE_NAME", "keel-under-test".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
        ]
    }

    /// Waits until the spans of `instance_id` include one named `name`; returns all of them.
    async fn wait_for(&self, instance_id: &str, name: &str) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + WAIT;
        loop {
            let spans: Vec<ReceivedSpan> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|span| span.instance_id.as_deref() == Some(instance_id))
                .cloned()
                .collect();
            if spans.iter().any(|span| span.name == name) {
                return spans;
            }
            assert!(Instant::now() < deadline, "no span {name:?} for {instance_id} arrived; got {spans:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Receiver {
    /// Waits for the first span named `name`, whatever its instance.
    async fn wait_for_name(&self, name: &str) -> ReceivedSpan {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(span) = self.spans.lock().unwrap().iter().find(|span| span.name == name) {
                return span.clone();
            }
            assert!(Instant::now() < deadline, "no span {name:?} arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Keeps the spans of an export.
fn keep(request: ExportTraceServiceRequest, kept: &Mutex<Vec<ReceivedSpan>>) {
    let mut kept = kept.lock().unwrap();
    for resource in request.resource_spans {
        let service_name = resource
            .resource
            .as_ref()
            .and_then(|resource| resource.attributes.iter().find(|kv| kv.key == "service.name").and_then(string_value));
        for scope in resource.scope_spans {
            for span in scope.spans {
                kept.push(ReceivedSpan {
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    instance_id: span
                        .attributes
                        .iter()
                        .find(|kv| kv.key == "durabletask.task.instance_id")
                        .and_then(string_value),
                    service_name: service_name.clone(),
                    start_nanos: span.start_time_unix_nano,
                    end_nanos: span.end_time_unix_nano,
                });
            }
        }
    }
}

/// The OTLP/gRPC trace service of [`Receiver::start_grpc`].
struct GrpcTraces {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(request.into_inner(), &self.spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// An OTLP/gRPC receiver on 127.0.0.1.
    async fn start_grpc() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let endpoint = format!("http://{}", listener.local_addr().expect("an address"));
        let service = TraceServiceServer::new(GrpcTraces { spans: spans.clone() });
        let incoming = tokio_stream_of(listener);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .expect("the receiver serves")
        });
        Receiver { endpoint, spans }
    }
}

/// The connections `listener` accepts, as tonic's server takes them.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

fn string_value(kv: &opentelemetry_proto::tonic::common::v1::KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(value) => Some(value.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(key, value)| (*key, value.as_str())).collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn the_one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.name == name).collect();
    assert_eq!(found.len(), 1, "one span {name:?} in {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_order_run_started_with_a_traceparent_is_one_trace_under_it() {
    let receiver = Receiver::start().await;
    let env = receiver.env();
    let server = Server::start_with_env(None, &[], &env_refs(&env));
    let order = json!({"orderId": "o-1", "customer": "ada@example.com", "items": [{"sku": "book", "quantity": 1}]});
    let response = http()
        .post(server.url("/api/orchestrators/PlaceOrder/traced-order"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&order)
        .send()
        .await
        .expect("start request");
    assert_eq!(response.status(), 202);
    let status = wait_until_finished(&server, "traced-order").await;
    assert_eq!(status["runtimeStatus"], "Completed", "{status}");

    let spans = receiver.wait_for("traced-order", "orchestration:PlaceOrder").await;
    for span in &spans {
        assert_eq!(span.trace_id, TRACE_ID, "every span is in the caller's trace: {span:?}");
        assert_eq!(span.service_name.as_deref(), Some("keel-under-test"), "OTEL_SERVICE_NAME names the service");
    }
    let start = the_one(&spans, "create_orchestration:PlaceOrder");
    assert_eq!(start.parent_span_id, CALLER_SPAN, "the start hangs under the caller's span");
    let execution = the_one(&spans, "orchestration:PlaceOrder");
    assert_eq!(execution.parent_span_id, start.span_id, "the execution hangs under its start");
    assert!(execution.end_nanos > execution.start_nanos, "the execution's span covers its run");
    let activities: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.name.starts_with("activity:")).collect();
    let names: Vec<&str> = activities.iter().map(|span| span.name.as_str()).collect();
    for expected in ["activity:CheckAndReserveInventory", "activity:ProcessPayment", "activity:ScheduleShipping"] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    for span in
        activities.iter().chain(spans.iter().filter(|span| span.name.ends_with(":episode")).collect::<Vec<_>>().iter())
    {
        assert_eq!(span.parent_span_id, execution.span_id, "{} hangs under the execution", span.name);
        assert!(
            span.start_nanos >= execution.start_nanos && span.end_nanos <= execution.end_nanos,
            "{} lies within the execution's span",
            span.name
        );
    }
    assert!(spans.iter().any(|span| span.name == "orchestration:PlaceOrder:episode"), "episode spans: {spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_run_still_yields_one_trace() {
    let receiver = Receiver::start().await;
    let env = receiver.env();
    let mut server = Server::start_with_env(None, &[], &env_refs(&env));
    let response = http()
        .post(server.url("/api/orchestrators/ApprovalWorkflow/approval-1"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&json!({"request": "new laptop", "approver": "grace", "timeoutSeconds": 3600}))
        .send()
        .await
        .expect("start request");
    assert_eq!(response.status(), 202);
    wait_for_status(&server, "approval-1", &["Running"]).await;
    // Before the kill: the approval request ran and was exported.
    let before = receiver.wait_for("approval-1", "activity:RequestApproval").await;
    server.stop(); // SIGKILL

    let store = server.store.clone();
    let restarted = Server::start_with_env(Some(&store), &[], &env_refs(&env));
    let raised = http()
        .post(restarted.api("/instances/approval-1/raiseEvent/Approval"))
        .json(&json!(true))
        .send()
        .await
        .expect("raise request");
    assert_eq!(raised.status(), 202);
    let status = wait_until_finished(&restarted, "approval-1").await;
    assert_eq!(status["output"], "Approved", "{status}");

    let spans = receiver.wait_for("approval-1", "orchestration:ApprovalWorkflow").await;
    assert!(spans.len() > before.len(), "spans came from the restarted host too");
    for span in &spans {
        assert_eq!(span.trace_id, TRACE_ID, "one trace across the restart: {span:?}");
    }
    let execution = the_one(&spans, "orchestration:ApprovalWorkflow");
    let start = the_one(&spans, "create_orchestration:ApprovalWorkflow");
    assert_eq!(execution.parent_span_id, start.span_id);
    let requested = the_one(&before, "activity:RequestApproval");
    assert_eq!(
        requested.parent_span_id, execution.span_id,
        "the span the first host's activity named as its parent is the one the second host ended"
    );
    let episodes: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.name.ends_with(":episode")).collect();
    assert!(episodes.len() >= 2, "episodes before and after the restart: {episodes:#?}");
    for episode in episodes {
        assert_eq!(episode.parent_span_id, execution.span_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_gets_a_span_from_its_creation_to_its_firing() {
    let receiver = Receiver::start().await;
    let env = receiver.env();
    let server = Server::start_with_env(None, &[], &env_refs(&env));
    let response = http()
        .post(server.url("/api/orchestrators/ApprovalWorkflow/escalated"))
        .json(&json!({"request": "coffee", "timeoutSeconds": 0.3}))
        .send()
        .await
        .expect("start request");
    assert_eq!(response.status(), 202);
    // A second start of the running instance is refused: it leaves no start span.
    let refused = http()
        .post(server.url("/api/orchestrators/ApprovalWorkflow/escalated"))
        .json(&json!({"request": "coffee", "timeoutSeconds": 0.3}))
        .send()
        .await
        .expect("second start request");
    assert!(refused.status().is_client_error(), "a running instance's id is refused: {}", refused.status());
    let status = wait_until_finished(&server, "escalated").await;
    assert_eq!(status["output"], "Escalated", "{status}");
    let spans = receiver.wait_for("escalated", "orchestration:ApprovalWorkflow").await;
    let execution = the_one(&spans, "orchestration:ApprovalWorkflow");
    let timer = the_one(&spans, "orchestration:ApprovalWorkflow:timer");
    assert_eq!(timer.parent_span_id, execution.span_id);
    assert_eq!(timer.trace_id, execution.trace_id, "without a traceparent the host starts the trace");
    let lasted = Duration::from_nanos(timer.end_nanos - timer.start_nanos);
    assert!(lasted >= Duration::from_millis(250), "the timer's span lasts its 0.3 s: {lasted:?}");
    the_one(&spans, "activity:Escalate");
    let start = the_one(&spans, "create_orchestration:ApprovalWorkflow");
    assert_eq!(execution.parent_span_id, start.span_id, "the written start is the execution's parent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_operations_get_spans_in_the_trace_of_whoever_asked() {
    let receiver = Receiver::start().await;
    let env = receiver.env();
    let server = Server::start_with_env(None, &[], &env_refs(&env));
    // A signal over HTTP with a traceparent: its operation hangs under the caller's span.
    let response = http()
        .post(server.api("/entities/Account/alice?op=deposit"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&100)
        .send()
        .await
        .expect("signal request");
    assert_eq!(response.status(), 202);
    let deposit = receiver.wait_for_name("entity:account:deposit").await;
    assert_eq!((deposit.trace_id.as_str(), deposit.parent_span_id.as_str()), (TRACE_ID, CALLER_SPAN));

    // An orchestration's calls: the operations hang under its execution's span.
    let response = http()
        .post(server.url("/api/orchestrators/BankTransfer/transfer-1"))
        .json(&json!({"from": "alice", "to": "bob", "amount": 30}))
        .send()
        .await
        .expect("start request");
    assert_eq!(response.status(), 202);
    let status = wait_until_finished(&server, "transfer-1").await;
    assert_eq!(status["runtimeStatus"], "Completed", "{status}");
    let spans = receiver.wait_for("transfer-1", "orchestration:BankTransfer").await;
    let execution = the_one(&spans, "orchestration:BankTransfer");
    let withdraw = receiver.wait_for_name("entity:account:withdraw").await;
    assert_eq!((withdraw.trace_id, withdraw.parent_span_id), (execution.trace_id.clone(), execution.span_id.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_over_otlp_grpc_and_a_child_hangs_under_its_parent() {
    let receiver = Receiver::start_grpc().await;
    let mut env = receiver.env();
    env.retain(|(key, _)| *key != "OTEL_EXPORTER_OTLP_PROTOCOL");
    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()));
    let server = Server::start_with_env(None, &[], &env_refs(&env));
    let sites: Vec<String> = ["site-a", "site-b"]
        .iter()
        .map(|site| {
            let dir = server.dir().join(site);
            std::fs::create_dir_all(&dir).expect("a site directory");
            std::fs::write(dir.join("index.html"), "<p>hello</p>").expect("a file to back up");
            dir.display().to_string()
        })
        .collect();
    let response = http()
        .post(server.url("/api/orchestrators/BackupSites/backup-traced"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&sites)
        .send()
        .await
        .expect("start request");
    assert_eq!(response.status(), 202);
    let status = wait_until_finished(&server, "backup-traced").await;
    assert_eq!(status["runtimeStatus"], "Completed", "{status}");
    let parent = receiver.wait_for("backup-traced", "orchestration:BackupSites").await;
    let parent = the_one(&parent, "orchestration:BackupSites").clone();
    assert_eq!(parent.trace_id, TRACE_ID);
    let children = receiver.wait_for_name("orchestration:BackupSiteContent").await;
    assert_eq!(children.trace_id, TRACE_ID, "the child is in its parent's trace");
    assert_eq!(children.parent_span_id, parent.span_id, "the child's execution hangs under the parent's");
}
