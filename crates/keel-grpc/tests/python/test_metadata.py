"""What Keel keeps for the SDKs beside inputs and outputs: execution ids in the Durable
Task Scheduler's format, default sub-orchestration ids, orchestration tags, failure
properties, and the version a continue-as-new moves to; and timers that fire on time."""

import re
import uuid

from durabletask import client
from durabletask.internal import orchestrator_service_pb2 as pb

import orchestrations as o
from test_lifecycle import http_status
from test_patterns import completed, run

Status = client.OrchestrationStatus

# What the timers test allows between a timer's creation and the episode it wakes.
ON_TIME_S = 0.25


def test_execution_ids_are_32_lowercase_hex_digits(hub, stub):
    state = run(hub, o.py_counter, 0)  # three executions (continue-as-new)
    assert completed(state) == 3
    response = stub.GetInstance(pb.GetInstanceRequest(instanceId=state.instance_id))
    assert re.fullmatch("[0-9a-f]{32}", response.orchestrationState.executionId.value)
    started = [e for e in hub.get_orchestration_history(state.instance_id) if type(e).__name__ == "ExecutionStartedEvent"]
    assert started, "the history starts with its ExecutionStarted"


def test_tags_are_kept_and_returned(hub, stub, keel):
    tags = {"team": "payments", "ticket": "T-17"}
    instance_id = f"tagged-{uuid.uuid4().hex}"
    run(hub, o.py_chain, ["tags"], instance_id=instance_id, tags=tags)
    state = stub.GetInstance(pb.GetInstanceRequest(instanceId=instance_id)).orchestrationState
    assert dict(state.tags) == tags
    page = stub.QueryInstances(pb.QueryInstancesRequest(query=pb.InstanceQuery(
        instanceIdPrefix=__import__("google.protobuf.wrappers_pb2", fromlist=["StringValue"]).StringValue(
            value=instance_id))))
    assert [dict(s.tags) for s in page.orchestrationState] == [tags]
    assert http_status(keel, instance_id)["tags"] == tags, "the HTTP status shows them"
    started = next(e for e in hub.get_orchestration_history(instance_id) if type(e).__name__ == "ExecutionStartedEvent")
    assert started.tags == tags, "the start event carries them"
    restarted = hub.restart_orchestration(instance_id, restart_with_new_instance_id=True)
    hub.wait_for_orchestration_completion(restarted, timeout=30)
    assert dict(stub.GetInstance(pb.GetInstanceRequest(instanceId=restarted)).orchestrationState.tags) == tags


def test_task_tags_are_kept_in_the_history(hub):
    state = run(hub, o.py_tagged_task, "tags")
    assert completed(state) == "Hello tags!"
    scheduled = next(e for e in hub.get_orchestration_history(state.instance_id)
                     if type(e).__name__ == "TaskScheduledEvent")
    assert scheduled.tags == {"kind": "greeting"}


def test_failure_properties_survive_the_round_trip(hub, stub):
    state = run(hub, o.py_fail_with_details, 3)
    assert state.runtime_status == Status.FAILED
    failure = stub.GetInstance(pb.GetInstanceRequest(instanceId=state.instance_id)).orchestrationState.failureDetails
    # The orchestration's failure wraps the activity's, with the provider's properties.
    details = failure
    while details.HasField("innerFailure") and not details.properties:
        details = details.innerFailure
    properties = {key: value for key, value in details.properties.items()}
    assert properties["code"].number_value == 7
    assert properties["retry"].bool_value is False
    assert [v.string_value for v in properties["where"].list_value.values] == ["activity"]


def test_continue_as_new_applies_the_new_version(hub):
    state = run(hub, o.py_versioned, 0, version="1.0")
    assert completed(state) == "2.0"


def gap_after(history, created_index):
    """Seconds from the episode that created the timer at ``created_index`` to the
    episode its firing started."""
    started = [i for i, e in enumerate(history) if type(e).__name__ == "OrchestratorStartedEvent"]
    creating = max(i for i in started if i < created_index)
    fired = next(i for i, e in enumerate(history) if type(e).__name__ == "TimerFiredEvent" and i > created_index)
    woken = max(i for i in started if i < fired)
    return (history[woken].timestamp - history[creating].timestamp).total_seconds()


def test_a_200ms_timer_fires_within_250ms(hub):
    for _ in range(3):
        state = run(hub, o.py_timer, 200)
        assert 0.2 <= completed(state)
        history = hub.get_orchestration_history(state.instance_id)
        created = next(i for i, e in enumerate(history) if type(e).__name__ == "TimerCreatedEvent")
        assert gap_after(history, created) < ON_TIME_S


def test_a_200ms_retry_interval_retries_within_250ms(hub):
    state = run(hub, o.py_retry_200ms, {"key": uuid.uuid4().hex, "succeed_on": 2})
    assert completed(state) == "succeeded on attempt 2"
    history = hub.get_orchestration_history(state.instance_id)
    created = next(i for i, e in enumerate(history) if type(e).__name__ == "TimerCreatedEvent")
    assert gap_after(history, created) < ON_TIME_S
