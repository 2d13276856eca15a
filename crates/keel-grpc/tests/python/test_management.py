"""Managing instances with the Python SDK's client: terminate, suspend/resume, purge,
query with paging, list, restart, rewind, history; and the gRPC status codes of requests
that cannot be served."""

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from durabletask import client
from durabletask.internal import orchestrator_service_pb2 as pb
from google.protobuf import wrappers_pb2

import orchestrations as o
from test_patterns import WAIT, completed, run

Status = client.OrchestrationStatus


def wait_for_status(hub, instance_id, status, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = hub.get_orchestration_state(instance_id)
        if state and state.runtime_status == status:
            return state
        time.sleep(0.05)
    raise AssertionError(f"{instance_id} never became {status}: {state}")


def test_terminate(hub):
    instance_id = hub.schedule_new_orchestration(o.py_forever)
    assert hub.wait_for_orchestration_start(instance_id, timeout=WAIT).runtime_status == Status.RUNNING
    hub.terminate_orchestration(instance_id, output="stopped by the test")
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
    assert state.runtime_status == Status.TERMINATED
    assert state.serialized_output == json.dumps("stopped by the test")
    hub.terminate_orchestration(instance_id, output="again")  # a finished instance: no-op


def test_terminate_recursive(hub):
    child_id = f"child-{uuid.uuid4().hex}"
    parent_id = hub.schedule_new_orchestration(o.py_parent_of_forever, input=child_id)
    wait_for_status(hub, child_id, Status.RUNNING)
    hub.terminate_orchestration(parent_id, output="all of them", recursive=True)
    assert hub.wait_for_orchestration_completion(parent_id, timeout=WAIT).runtime_status == Status.TERMINATED
    assert hub.wait_for_orchestration_completion(child_id, timeout=WAIT).runtime_status == Status.TERMINATED


def test_suspend_and_resume(hub):
    instance_id = hub.schedule_new_orchestration(o.py_wait_event, input=0)
    hub.wait_for_orchestration_start(instance_id, timeout=WAIT)
    hub.resume_orchestration(instance_id)  # not suspended: a no-op that must not fail it
    hub.suspend_orchestration(instance_id, reason="hold on")
    wait_for_status(hub, instance_id, Status.SUSPENDED)
    hub.raise_orchestration_event(instance_id, "approval", data=42)
    with pytest.raises(TimeoutError):
        hub.wait_for_orchestration_completion(instance_id, timeout=1)
    assert hub.get_orchestration_state(instance_id).runtime_status == Status.SUSPENDED
    hub.resume_orchestration(instance_id, reason="go on")
    assert completed(hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)) == 42


def test_purge(hub):
    done = run(hub, o.py_chain, ["Purged"])
    running = hub.schedule_new_orchestration(o.py_forever)
    hub.wait_for_orchestration_start(running, timeout=WAIT)
    assert hub.purge_orchestration(running).deleted_instance_count == 0, "unfinished instances are kept"
    assert hub.purge_orchestration(done.instance_id).deleted_instance_count == 1
    assert hub.get_orchestration_state(done.instance_id) is None
    assert hub.purge_orchestration(done.instance_id).deleted_instance_count == 0
    hub.terminate_orchestration(running)
    hub.wait_for_orchestration_completion(running, timeout=WAIT)


def test_purge_recursive_and_by_filter(hub):
    parent = run(hub, o.py_parent, [5])
    children = json.loads(parent.serialized_output)["children"]
    assert hub.purge_orchestration(parent.instance_id, recursive=True).deleted_instance_count >= 2
    assert all(hub.get_orchestration_state(child) is None for child in children)

    since = datetime.now(timezone.utc) - timedelta(milliseconds=5)
    ids = [run(hub, o.py_chain, [str(i)]).instance_id for i in range(3)]
    result = hub.purge_orchestrations_by(created_time_from=since, runtime_status=[Status.COMPLETED])
    assert result.deleted_instance_count >= 3
    assert all(hub.get_orchestration_state(i) is None for i in ids)


def test_query_with_paging(hub, stub):
    prefix = f"page-{uuid.uuid4().hex[:8]}-"
    ids = [run(hub, o.py_chain, [str(i)], instance_id=f"{prefix}{i}").instance_id for i in range(5)]
    query = client.OrchestrationQuery(instance_id_prefix=prefix, max_instance_count=2, fetch_inputs_and_outputs=True)
    states = hub.get_all_orchestration_states(query)
    assert sorted(state.instance_id for state in states) == sorted(ids)
    assert all(state.runtime_status == Status.COMPLETED and state.serialized_output for state in states)

    # Page by page on the wire.
    pages, token = [], None
    while True:
        response = stub.QueryInstances(pb.QueryInstancesRequest(query=pb.InstanceQuery(
            instanceIdPrefix=wrappers_pb2.StringValue(value=prefix), maxInstanceCount=2,
            continuationToken=token)))
        pages.append([state.instanceId for state in response.orchestrationState])
        if not response.HasField("continuationToken"):
            break
        token = response.continuationToken
    assert [len(page) for page in pages] == [2, 2, 1]
    assert not any(state.HasField("input") for state in response.orchestrationState), "no payloads unless asked"

    running = hub.schedule_new_orchestration(o.py_forever, instance_id=f"{prefix}running")
    hub.wait_for_orchestration_start(running, timeout=WAIT)
    only_running = hub.get_all_orchestration_states(
        client.OrchestrationQuery(instance_id_prefix=prefix, runtime_status=[Status.RUNNING]))
    assert [state.instance_id for state in only_running] == [running]
    hub.terminate_orchestration(running)
    hub.wait_for_orchestration_completion(running, timeout=WAIT)


def test_list_instance_ids_pages_by_completion_time(hub):
    since = datetime.now(timezone.utc) - timedelta(milliseconds=5)
    first = run(hub, o.py_chain, ["one"]).instance_id
    time.sleep(0.01)
    second = run(hub, o.py_chain, ["two"]).instance_id
    page = hub.list_instance_ids(runtime_status=[Status.COMPLETED], completed_time_from=since, page_size=1)
    assert page.items == [first] and first in page.continuation_token
    page = hub.list_instance_ids(runtime_status=[Status.COMPLETED], completed_time_from=since, page_size=1,
                                 continuation_token=page.continuation_token)
    assert page.items == [second] and page.continuation_token is None, "the last page has no token"


def test_restart(hub):
    original = run(hub, o.py_chain, ["Again"])
    same = hub.restart_orchestration(original.instance_id)
    assert same == original.instance_id
    assert completed(hub.wait_for_orchestration_completion(same, timeout=WAIT)) == ["Hello Again!"]
    other = hub.restart_orchestration(original.instance_id, restart_with_new_instance_id=True)
    assert other != original.instance_id
    assert completed(hub.wait_for_orchestration_completion(other, timeout=WAIT)) == ["Hello Again!"]


def test_rewind_reruns_only_the_failed_work(hub):
    state = run(hub, o.py_rewindable, {"key": uuid.uuid4().hex, "succeed_on": 2})
    assert state.runtime_status == Status.FAILED
    hub.rewind_orchestration(state.instance_id, reason="the flaky service is back")
    state = hub.wait_for_orchestration_completion(state.instance_id, timeout=WAIT)
    assert completed(state) == ["Hello before!", "succeeded on attempt 2"]
    scheduled = [e for e in hub.get_orchestration_history(state.instance_id) if type(e).__name__ == "TaskScheduledEvent"]
    assert [event.name for event in scheduled].count("py_hello") == 1, "the activity that succeeded did not run again"


def test_history_stream(hub):
    state = run(hub, o.py_chain, ["A", "B"])
    history = hub.get_orchestration_history(state.instance_id)
    names = [type(event).__name__ for event in history]
    assert names[:2] == ["OrchestratorStartedEvent", "ExecutionStartedEvent"]
    assert names[-1] == "ExecutionCompletedEvent"
    scheduled = [event for event in history if type(event).__name__ == "TaskScheduledEvent"]
    assert [event.event_id for event in scheduled] == [1, 2], "event ids are the action sequence numbers"


def test_wait_for_start_times_out(hub):
    instance_id = hub.schedule_new_orchestration(
        o.py_chain, input=["x"], start_at=datetime.now(timezone.utc) + timedelta(seconds=30))
    with pytest.raises(TimeoutError):
        hub.wait_for_orchestration_start(instance_id, timeout=0.5)
    hub.terminate_orchestration(instance_id)
    assert hub.wait_for_orchestration_completion(instance_id, timeout=WAIT).runtime_status == Status.TERMINATED


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def test_status_codes(hub, stub):
    unknown = f"unknown-{uuid.uuid4().hex}"
    assert hub.get_orchestration_state(unknown) is None
    assert hub.wait_for_orchestration_completion(unknown, timeout=5) is None
    assert code_of(lambda: hub.raise_orchestration_event(unknown, "e")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: hub.terminate_orchestration(unknown)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: hub.restart_orchestration(unknown)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: hub.rewind_orchestration(unknown)) == grpc.StatusCode.NOT_FOUND

    running = hub.schedule_new_orchestration(o.py_forever)
    hub.wait_for_orchestration_start(running, timeout=WAIT)
    assert code_of(lambda: hub.rewind_orchestration(running)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: hub.restart_orchestration(running)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: hub.schedule_new_orchestration(o.py_forever, instance_id=running)) == \
        grpc.StatusCode.ALREADY_EXISTS
    hub.terminate_orchestration(running)
    hub.wait_for_orchestration_completion(running, timeout=WAIT)
    assert code_of(lambda: hub.raise_orchestration_event(running, "e")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: hub.schedule_new_orchestration(o.py_forever, instance_id=running)) == \
        grpc.StatusCode.ALREADY_EXISTS, "no reuse policy: an existing id is refused"
    replace = pb.OrchestrationIdReusePolicy(replaceableStatus=[pb.ORCHESTRATION_STATUS_TERMINATED])
    assert hub.schedule_new_orchestration(o.py_chain, input=["re"], instance_id=running, reuse_id_policy=replace) \
        == running
    assert completed(hub.wait_for_orchestration_completion(running, timeout=WAIT)) == ["Hello re!"]

    assert code_of(lambda: stub.StartInstance(pb.CreateInstanceRequest(instanceId="bad/id", name="py_chain"))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.StartInstance(pb.CreateInstanceRequest(name="py_chain", input=wrappers_pb2.StringValue(
        value="not json")))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.GetInstance(pb.GetInstanceRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.PurgeInstances(pb.PurgeInstancesRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.CompleteOrchestratorTask(pb.OrchestratorResponse(completionToken="nope"))) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.CompleteActivityTask(pb.ActivityResponse(completionToken="nope"))) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.AbandonTaskActivityWorkItem(pb.AbandonActivityTaskRequest(completionToken="x"))) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.CompleteEntityTask(pb.EntityBatchResult(completionToken="nope"))) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.AbandonTaskEntityWorkItem(pb.AbandonEntityTaskRequest(completionToken="x"))) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.SignalEntity(pb.SignalEntityRequest(instanceId="e@k", name="op"))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.GetEntity(pb.GetEntityRequest(instanceId="@e"))) == grpc.StatusCode.INVALID_ARGUMENT
    stub.Hello(__import__("google.protobuf.empty_pb2", fromlist=["Empty"]).Empty())
    stub.CreateTaskHub(pb.CreateTaskHubRequest())
