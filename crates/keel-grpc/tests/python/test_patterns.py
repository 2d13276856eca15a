"""The Durable Functions patterns, written with the official Python SDK and run by its
worker on Keel."""

import json
import time
import uuid

from durabletask import client

import orchestrations as o

WAIT = 30


def run(hub: client.TaskHubGrpcClient, orchestrator, payload=None, **kwargs) -> client.OrchestrationState:
    instance_id = hub.schedule_new_orchestration(orchestrator, input=payload, **kwargs)
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
    assert state is not None
    return state


def completed(state: client.OrchestrationState):
    assert state.runtime_status == client.OrchestrationStatus.COMPLETED, state
    return json.loads(state.serialized_output) if state.serialized_output is not None else None


def wait_for_custom_status(hub, instance_id, expected, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = hub.get_orchestration_state(instance_id)
        if state and state.serialized_custom_status and json.loads(state.serialized_custom_status) == expected:
            return state
        time.sleep(0.05)
    raise AssertionError(f"custom status never became {expected!r}: {state}")


def test_activity_chain(hub):
    state = run(hub, o.py_chain, ["Tokyo", "Seattle", "London"])
    assert completed(state) == ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]
    assert json.loads(state.serialized_input) == ["Tokyo", "Seattle", "London"]


def test_fan_out_fan_in(hub):
    assert completed(run(hub, o.py_fan_out, 20)) == sum(i * i for i in range(1, 21))


def test_sub_orchestrations(hub):
    result = completed(run(hub, o.py_parent, [2, 3]))
    assert result["squares"] == [4, 9]
    assert "negative input -1" in result["failure"], "a failed child fails the parent's task with its details"
    for child in result["children"]:
        state = hub.get_orchestration_state(child)
        assert state.runtime_status == client.OrchestrationStatus.COMPLETED


def test_durable_timer(hub):
    started = time.monotonic()
    elapsed_in_orchestration = completed(run(hub, o.py_timer, 1000))
    assert time.monotonic() - started >= 1.0
    assert elapsed_in_orchestration >= 1.0, "current_utc_datetime moves on with the timer"


def test_external_event_raised_before_the_wait_is_buffered(hub):
    instance_id = hub.schedule_new_orchestration(o.py_wait_event, input=500)
    hub.raise_orchestration_event(instance_id, "approval", data={"by": "early"})
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
    assert completed(state) == {"by": "early"}


def test_external_event_raised_while_waiting(hub):
    instance_id = hub.schedule_new_orchestration(o.py_wait_event, input=0)
    wait_for_custom_status(hub, instance_id, "waiting")
    hub.raise_orchestration_event(instance_id, "approval", data="late")
    assert completed(hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)) == "late"


def test_external_event_with_timeout(hub):
    assert completed(run(hub, o.py_event_or_timeout, 300)) == "timed out"
    instance_id = hub.schedule_new_orchestration(o.py_event_or_timeout, input=20_000)
    hub.wait_for_orchestration_start(instance_id, timeout=WAIT)
    hub.raise_orchestration_event(instance_id, "Approval", data=True)  # names match case-insensitively
    assert completed(hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)) == {"approved": True}


def test_activity_retries(hub):
    key = uuid.uuid4().hex
    assert completed(run(hub, o.py_retry, {"key": key, "succeed_on": 3, "attempts": 3})) == "succeeded on attempt 3"
    state = run(hub, o.py_retry, {"key": uuid.uuid4().hex, "succeed_on": 9, "attempts": 2})
    assert state.runtime_status == client.OrchestrationStatus.FAILED
    assert "attempt 2 failed" in state.failure_details.message


def test_sub_orchestration_retries_reuse_the_child_id(hub):
    key = uuid.uuid4().hex
    assert completed(run(hub, o.py_retry_child, {"key": key, "succeed_on": 2})) == "succeeded on attempt 2"


def test_continue_as_new(hub):
    instance_id = uuid.uuid4().hex
    state = run(hub, o.py_counter, 0, instance_id=instance_id)
    assert completed(state) == 3
    assert json.loads(state.serialized_input) == 3, "the last execution's input"
    history = hub.get_orchestration_history(instance_id)
    assert type(history[0]).__name__ == "OrchestratorStartedEvent"
    assert not any("ContinueAsNew" in type(event).__name__ for event in history)


def test_continue_as_new_keeps_unprocessed_events(hub):
    instance_id = hub.schedule_new_orchestration(o.py_collect, input=[])
    for item in (1, 2, 3):
        hub.raise_orchestration_event(instance_id, "item", data=item)
    assert completed(hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)) == [1, 2, 3]


def test_custom_status(hub):
    instance_id = hub.schedule_new_orchestration(o.py_custom_status)
    wait_for_custom_status(hub, instance_id, {"stage": 1})
    hub.raise_orchestration_event(instance_id, "next")
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
    assert completed(state) == "done"
    assert json.loads(state.serialized_custom_status) == {"stage": 2}


def test_scheduled_start(hub):
    from datetime import datetime, timedelta, timezone
    start_at = datetime.now(timezone.utc) + timedelta(seconds=1)
    instance_id = hub.schedule_new_orchestration(o.py_chain, input=["Later"], start_at=start_at)
    assert hub.get_orchestration_state(instance_id).runtime_status == client.OrchestrationStatus.PENDING
    state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
    assert completed(state) == ["Hello Later!"]
    assert datetime.now(timezone.utc) >= start_at
