"""Instance lifecycles as the Python SDK's client drives them: id reuse policies that
replace running instances, restarting a running instance under a new id, termination
outputs of any JSON type (over gRPC and in the HTTP status), instances that no worker
hosts, and emptying the task hub."""

import json
import time
import urllib.request
import uuid

import grpc
import pytest
from durabletask import client
from durabletask.internal import orchestrator_service_pb2 as pb

import orchestrations as o
from test_management import code_of, wait_for_status
from test_patterns import WAIT, completed, run

Status = client.OrchestrationStatus

RUNNING_STATUSES = [pb.ORCHESTRATION_STATUS_PENDING, pb.ORCHESTRATION_STATUS_RUNNING,
                    pb.ORCHESTRATION_STATUS_SUSPENDED]
FINISHED_STATUSES = [pb.ORCHESTRATION_STATUS_COMPLETED, pb.ORCHESTRATION_STATUS_FAILED,
                     pb.ORCHESTRATION_STATUS_TERMINATED]


def http_status(keel, instance_id):
    with urllib.request.urlopen(f"{keel.http}/runtime/webhooks/durabletask/instances/{instance_id}") as r:
        return json.loads(r.read())


def test_a_reuse_policy_with_running_statuses_replaces_a_running_instance(hub, stub):
    instance_id = f"reuse-{uuid.uuid4().hex}"
    hub.schedule_new_orchestration(o.py_forever, instance_id=instance_id)
    hub.wait_for_orchestration_start(instance_id, timeout=WAIT)
    old_execution = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id)).orchestrationState.executionId
    replace_all = pb.OrchestrationIdReusePolicy(replaceableStatus=RUNNING_STATUSES + FINISHED_STATUSES)
    assert hub.schedule_new_orchestration(o.py_chain, input=["again"], instance_id=instance_id,
                                          reuse_id_policy=replace_all) == instance_id
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
    assert completed(state) == ["Hello again!"], "the new instance runs under the same id"
    response = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id))
    assert response.orchestrationState.name == "py_chain"
    assert response.orchestrationState.executionId.value != old_execution.value
    history = hub.get_orchestration_history(instance_id)
    assert [type(e).__name__ for e in history].count("ExecutionStartedEvent") == 1, "the old history is gone"

    # Only finished statuses: a running instance is refused, as before.
    running = hub.schedule_new_orchestration(o.py_forever)
    hub.wait_for_orchestration_start(running, timeout=WAIT)
    finished_only = pb.OrchestrationIdReusePolicy(replaceableStatus=FINISHED_STATUSES)
    assert code_of(lambda: hub.schedule_new_orchestration(o.py_chain, input=["x"], instance_id=running,
                                                          reuse_id_policy=finished_only)) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert hub.get_orchestration_state(running).runtime_status == Status.RUNNING, "a refused start changes nothing"
    hub.terminate_orchestration(running)
    hub.wait_for_orchestration_completion(running, timeout=WAIT)


def test_a_replaced_sub_orchestration_fails_its_parents_task(hub):
    child_id = f"replaced-child-{uuid.uuid4().hex}"
    parent_id = hub.schedule_new_orchestration(o.py_parent_of_forever, input=child_id)
    wait_for_status(hub, child_id, Status.RUNNING)
    replace = pb.OrchestrationIdReusePolicy(replaceableStatus=RUNNING_STATUSES + [pb.ORCHESTRATION_STATUS_TERMINATED])
    hub.schedule_new_orchestration(o.py_chain, input=["new"], instance_id=child_id, reuse_id_policy=replace)
    parent = hub.wait_for_orchestration_completion(parent_id, timeout=WAIT)
    assert parent.runtime_status == Status.FAILED, "the parent hears that its child was terminated"
    assert completed(hub.wait_for_orchestration_completion(child_id, timeout=WAIT)) == ["Hello new!"]


def test_a_reuse_policy_that_cannot_be_honoured_is_refused(hub):
    instance_id = hub.schedule_new_orchestration(o.py_forever)
    hub.wait_for_orchestration_start(instance_id, timeout=WAIT)
    running_but_not_terminated = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_RUNNING])
    with pytest.raises(grpc.RpcError) as error:
        hub.schedule_new_orchestration(o.py_chain, input=["x"], instance_id=instance_id,
                                       reuse_id_policy=running_but_not_terminated)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Running" in error.value.details() and "Terminated" in error.value.details()
    assert hub.get_orchestration_state(instance_id).runtime_status == Status.RUNNING
    hub.terminate_orchestration(instance_id)
    hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)


def test_restart_of_a_running_instance_under_a_new_id(hub):
    running = hub.schedule_new_orchestration(o.py_wait_event, input=0)
    hub.wait_for_orchestration_start(running, timeout=WAIT)
    other = hub.restart_orchestration(running, restart_with_new_instance_id=True)
    assert other != running
    wait_for_status(hub, other, Status.RUNNING)
    assert json.loads(hub.get_orchestration_state(other).serialized_input) == 0, "the old input"
    assert hub.get_orchestration_state(running).runtime_status == Status.RUNNING, "the old one is left alone"
    assert code_of(lambda: hub.restart_orchestration(running)) == grpc.StatusCode.FAILED_PRECONDITION
    for instance_id in (running, other):
        hub.raise_orchestration_event(instance_id, "approval", data="done")
        assert completed(hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)) == "done"


@pytest.mark.parametrize("output", [{"reason": "enough", "by": ["ops"]}, 42, None, "plain text"])
def test_termination_outputs_round_trip_unchanged(hub, keel, output):
    instance_id = hub.schedule_new_orchestration(o.py_forever)
    hub.wait_for_orchestration_start(instance_id, timeout=WAIT)
    hub.terminate_orchestration(instance_id, output=output)
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
    assert state.runtime_status == Status.TERMINATED
    assert json.loads(state.serialized_output) == output if output is not None else state.serialized_output is None
    assert http_status(keel, instance_id)["output"] == output, "the HTTP status has the same value"


def test_terminate_suspend_and_purge_of_an_instance_no_worker_hosts(hub, stub):
    nobody = f"nobody_hosts_{uuid.uuid4().hex[:8]}"
    terminated = hub.schedule_new_orchestration(nobody, input=1)
    suspended = hub.schedule_new_orchestration(nobody, input=2)
    time.sleep(0.2)  # the host has handed both to the gRPC dispatcher, where they wait
    assert hub.get_orchestration_state(terminated).runtime_status == Status.PENDING

    started = time.monotonic()
    hub.terminate_orchestration(terminated, output="nobody runs it")
    assert hub.wait_for_orchestration_completion(terminated, timeout=2).runtime_status == Status.TERMINATED
    assert hub.purge_orchestration(terminated).deleted_instance_count == 1
    assert hub.get_orchestration_state(terminated) is None

    hub.suspend_orchestration(suspended)
    wait_for_status(hub, suspended, Status.SUSPENDED, timeout=2)
    assert time.monotonic() - started < 2, "no waiting for a worker"
    hub.terminate_orchestration(suspended)
    assert hub.wait_for_orchestration_completion(suspended, timeout=2).runtime_status == Status.TERMINATED


def test_delete_task_hub_removes_every_instance_running_ones_included(private_keel):
    from conftest import new_worker
    from durabletask.internal import orchestrator_service_pb2_grpc as services
    server = private_keel(api_key="hub-key")
    metadata = [("authorization", "Bearer hub-key")]
    worker = new_worker(server.address, metadata=metadata)
    worker.start()
    hub = client.TaskHubGrpcClient(host_address=server.address, metadata=metadata)
    try:
        done = run(hub, o.py_chain, ["gone soon"]).instance_id
        running = hub.schedule_new_orchestration(o.py_forever)
        hub.wait_for_orchestration_start(running, timeout=WAIT)
        pending = hub.schedule_new_orchestration(f"nobody_hosts_{uuid.uuid4().hex[:8]}")
        with grpc.insecure_channel(server.address) as channel:
            stub = services.TaskHubSidecarServiceStub(channel)
            assert code_of(lambda: stub.DeleteTaskHub(pb.DeleteTaskHubRequest())) == \
                grpc.StatusCode.UNAUTHENTICATED, "the API key guards it"
            assert hub.get_orchestration_state(done) is not None
            stub.DeleteTaskHub(pb.DeleteTaskHubRequest(), metadata=metadata)
            for instance_id in (done, running, pending):
                assert hub.get_orchestration_state(instance_id) is None
            assert list(hub.get_all_orchestration_states(client.OrchestrationQuery())) == []
            stub.CreateTaskHub(pb.CreateTaskHubRequest(recreateIfExists=True), metadata=metadata)
            assert completed(run(hub, o.py_chain, ["after"])) == ["Hello after!"], "the emptied hub works on"
    finally:
        hub.close()
        worker.stop()
