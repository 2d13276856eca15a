"""Which worker gets a function: ``keel serve`` hosts no functions of its own unless
``--samples`` is given, and the Rust worker runs what it registers (names matched
without regard to case) while everything else goes to the SDK workers over gRPC."""

import json

from azure.durable_functions import DurableOrchestrationClient
from durabletask import client, task, worker

from conftest import binding_for

WAIT_S = 30


def sayHello(ctx: task.ActivityContext, name: str) -> str:  # noqa: N802 (a JavaScript-style name)
    return f"Python says hello to {name}"


def HelloCities(ctx: task.OrchestrationContext, _):  # noqa: N802 (the sample orchestrator's name)
    greetings = []
    for city in ["Tokyo", "Lima"]:
        greetings.append((yield ctx.call_activity("sayHello", input=city)))
    return greetings


def greets(ctx: task.OrchestrationContext, city: str):
    return (yield ctx.call_activity("sayHello", input=city))


def output_of(hub: client.TaskHubGrpcClient, instance_id: str):
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT_S)
    assert state.runtime_status == client.OrchestrationStatus.COMPLETED, state.failure_details
    return json.loads(state.serialized_output)


def run_python_worker(server, body):
    w = worker.TaskHubGrpcWorker(host_address=server.grpc)
    w.add_orchestrator(HelloCities)
    w.add_orchestrator(greets)
    w.add_activity(sayHello)
    w.start()
    hub = client.TaskHubGrpcClient(host_address=server.grpc)
    try:
        body(hub)
    finally:
        hub.close()
        w.stop()


def test_without_samples_every_function_goes_to_the_sdk_workers(private_keel, run):
    server = private_keel(samples=False)

    def body(hub):
        # The sample app has a `HelloCities` and a `SayHello`; without --samples neither
        # answers for the Python worker's.
        assert output_of(hub, hub.schedule_new_orchestration("HelloCities")) == \
            ["Python says hello to Tokyo", "Python says hello to Lima"]
        assert output_of(hub, hub.schedule_new_orchestration(greets, input="Oslo")) == "Python says hello to Oslo"
        # Started over HTTP, by the Durable Functions client, it runs there too.
        df_client = DurableOrchestrationClient(binding_for(server.http))
        started = run(df_client.start_new("HelloCities"))
        assert output_of(hub, started) == ["Python says hello to Tokyo", "Python says hello to Lima"]

    run_python_worker(server, body)


def test_with_samples_the_rust_worker_runs_what_it_registers(private_keel):
    server = private_keel(samples=True)

    def body(hub):
        # `sayHello` is the sample `SayHello` for the Rust worker (names ignore case), so
        # it runs there; `greets`, which Rust does not register, runs on the Python worker.
        assert output_of(hub, hub.schedule_new_orchestration(greets, input="Oslo")) == "Hello Oslo!"
        assert output_of(hub, hub.schedule_new_orchestration("HelloCities")) == \
            ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]

    run_python_worker(server, body)
