"""One task hub, two kinds of workers; a server restart under a connected worker; the
API key."""

import json
import time

import grpc
import pytest
from durabletask import client

import orchestrations as o
from conftest import new_worker
from test_patterns import WAIT, completed, run, wait_for_custom_status


def test_python_and_rust_workers_share_the_task_hub(hub, keel):
    rust = hub.schedule_new_orchestration("HelloCities")  # hosted by `keel serve` itself
    python = hub.schedule_new_orchestration(o.py_chain, input=["Tokyo"])
    mixed = hub.schedule_new_orchestration(o.py_calls_rust, input="Paris")
    assert completed(hub.wait_for_orchestration_completion(rust, timeout=WAIT)) == \
        ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]
    assert completed(hub.wait_for_orchestration_completion(python, timeout=WAIT)) == ["Hello Tokyo!"]
    assert completed(hub.wait_for_orchestration_completion(mixed, timeout=WAIT)) == "Hello Paris!", \
        "a Python orchestrator can call an activity of the Rust worker"
    # The HTTP API sees the Python orchestrations too.
    import urllib.request
    with urllib.request.urlopen(f"{keel.http}/runtime/webhooks/durabletask/instances/{python}") as response:
        status = json.load(response)
    assert status["runtimeStatus"] == "Completed" and status["name"] == "py_chain"


def test_worker_reconnects_after_a_server_restart(private_keel):
    server = private_keel()
    worker = new_worker(server.address)
    worker.start()
    hub = client.TaskHubGrpcClient(host_address=server.address)
    try:
        waiting = hub.schedule_new_orchestration(o.py_wait_event, input=0)
        wait_for_custom_status(hub, waiting, "waiting")
        sleeping = hub.schedule_new_orchestration(o.py_timer, input=1500)
        hub.wait_for_orchestration_start(sleeping, timeout=WAIT)

        server.restart()  # same task hub, same gRPC port
        # gRPC channels that saw the server go back off before they reconnect (calls
        # meanwhile fail with UNAVAILABLE); wait for that, as a real client would retry.
        with grpc.insecure_channel(server.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=WAIT)

        started_after = hub.schedule_new_orchestration(o.py_chain, input=["again"])
        hub.raise_orchestration_event(waiting, "approval", data="after the restart")
        assert completed(hub.wait_for_orchestration_completion(waiting, timeout=WAIT)) == "after the restart"
        assert completed(hub.wait_for_orchestration_completion(sleeping, timeout=WAIT)) >= 1.5
        assert completed(hub.wait_for_orchestration_completion(started_after, timeout=WAIT)) == ["Hello again!"]
    finally:
        hub.close()
        worker.stop()


def test_orchestrations_started_before_any_worker_connects_wait_for_one(private_keel):
    server = private_keel()
    hub = client.TaskHubGrpcClient(host_address=server.address)
    instance_id = hub.schedule_new_orchestration(o.py_chain, input=["patient"])
    time.sleep(1.5)
    assert hub.get_orchestration_state(instance_id).runtime_status == client.OrchestrationStatus.PENDING
    worker = new_worker(server.address)
    worker.start()
    try:
        assert completed(hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)) == ["Hello patient!"]
    finally:
        hub.close()
        worker.stop()


def test_api_key(private_keel):
    server = private_keel(api_key="s3cret")
    anonymous = client.TaskHubGrpcClient(host_address=server.address)
    with pytest.raises(grpc.RpcError) as error:
        anonymous.get_orchestration_state("x")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    anonymous.close()
    key = [("authorization", "Bearer s3cret")]
    worker = new_worker(server.address, metadata=key)
    worker.start()
    hub = client.TaskHubGrpcClient(host_address=server.address, metadata=key)
    try:
        assert completed(run(hub, o.py_chain, ["with a key"])) == ["Hello with a key!"]
    finally:
        hub.close()
        worker.stop()
