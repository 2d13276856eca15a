"""Traces across processes: the Python SDK's spans and Keel's share one trace.

Keel exports its spans over OTLP/HTTP to a receiver in this test (decoded with the
``opentelemetry-proto`` package); the SDK's spans go to an in-memory exporter. A Python
client starts orchestrations inside a span of its own; the SDK's orchestration and
activity spans and Keel's start and activity spans must all be in that span's trace,
linked parent to child across the two processes.
"""

import http.server
import threading
import time

import pytest
from durabletask import client
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import orchestrations
from conftest import new_worker

WAIT_S = 30


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 that keeps what it is sent."""

    def __init__(self):
        self.spans = []  # (name, trace id hex, span id hex, parent span id hex, attributes)
        lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with lock:
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            for span in scope.spans:
                                attributes = {kv.key: kv.value.string_value for kv in span.attributes}
                                receiver.spans.append((span.name, span.trace_id.hex(), span.span_id.hex(),
                                                       span.parent_span_id.hex(), attributes))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, name: str, instance_id: str):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = [s for s in self.spans if s[0] == name and s[4].get("durabletask.task.instance_id") == instance_id]
            if found:
                return found
            time.sleep(0.02)
        raise AssertionError(f"Keel exported no {name} span for {instance_id}: {self.spans}")


_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def sdk_spans():
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    return _EXPORTER


@pytest.fixture
def traced_keel(private_keel):
    receiver = OtlpReceiver()
    server = private_keel(env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                               "OTEL_BSP_SCHEDULE_DELAY": "50"})
    w = new_worker(server.address)
    w.start()
    c = client.TaskHubGrpcClient(host_address=server.address)
    yield server, receiver, c
    c.close()
    w.stop()
    receiver.server.shutdown()


def sdk_spans_of(exporter, trace_id: str):
    return [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]


def test_python_activity_spans_share_the_trace_of_keels_spans(sdk_spans, traced_keel):
    server, receiver, c = traced_keel
    tracer = trace.get_tracer("keel-test")
    with tracer.start_as_current_span("test request") as root:
        instance_id = c.schedule_new_orchestration(orchestrations.py_chain, input=["Tokyo", "Lima"])
    trace_id = format(root.get_span_context().trace_id, "032x")
    state = c.wait_for_orchestration_completion(instance_id, timeout=WAIT_S)
    assert state.runtime_status == client.OrchestrationStatus.COMPLETED, state

    (start,) = receiver.wait_for("create_orchestration:py_chain", instance_id)
    assert start[1] == trace_id, "Keel's start span is in the client's trace"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        mine = sdk_spans_of(sdk_spans, trace_id)
        if any(s.name == "orchestration:py_chain" for s in mine):
            break
        time.sleep(0.02)
    # The SDK emits a client span (in the orchestration) and a server span (the run) per call.
    activities = [s for s in mine if s.name == "activity:py_hello" and s.kind == trace.SpanKind.SERVER]
    assert len(activities) == 2, [(s.name, s.kind) for s in mine]
    (orchestration,) = [s for s in mine if s.name == "orchestration:py_chain"]
    assert format(orchestration.parent.span_id, "016x") == start[2], \
        "the SDK's orchestration span hangs under Keel's start span"
    for activity in activities:
        assert format(activity.context.trace_id, "032x") == trace_id


def test_a_rust_activity_called_from_python_joins_the_trace(sdk_spans, traced_keel):
    server, receiver, c = traced_keel
    tracer = trace.get_tracer("keel-test")
    with tracer.start_as_current_span("test request") as root:
        instance_id = c.schedule_new_orchestration(orchestrations.py_calls_rust, input="Oslo")
    trace_id = format(root.get_span_context().trace_id, "032x")
    state = c.wait_for_orchestration_completion(instance_id, timeout=WAIT_S)
    assert state.runtime_status == client.OrchestrationStatus.COMPLETED, state

    (activity,) = receiver.wait_for("activity:SayHello", instance_id)
    assert activity[1] == trace_id, "Keel ran the activity in the Python client's trace"
    sdk_span_ids = {format(s.context.span_id, "016x") for s in sdk_spans_of(sdk_spans, trace_id)}
    deadline = time.monotonic() + WAIT_S
    while activity[3] not in sdk_span_ids and time.monotonic() < deadline:
        time.sleep(0.02)
        sdk_span_ids = {format(s.context.span_id, "016x") for s in sdk_spans_of(sdk_spans, trace_id)}
    assert activity[3] in sdk_span_ids, "the Rust activity's parent is a span the Python SDK emitted"
