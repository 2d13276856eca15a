"""Durable entities written with the official Python SDK, hosted by its worker and
driven by its client and orchestrations on Keel: signals, calls, entities that signal
entities and start orchestrations, critical sections (and their release when the holder
is terminated), failures, delayed signals, queries, storage cleaning, entity id checks
and the SDK's scheduled tasks (built on entities)."""

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

from durabletask import client, entities
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.scheduled import ScheduleCreationOptions, ScheduledTaskClient
from google.protobuf import wrappers_pb2

import entity_functions as e
from test_patterns import WAIT, completed, run, wait_for_custom_status


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(condition, what: str, timeout: float = WAIT, every: float = 0.05):
    """Polls ``condition`` until it returns something truthy; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")


def state_of(hub: client.TaskHubGrpcClient, entity: entities.EntityInstanceId):
    metadata = hub.get_entity(entity)
    return None if metadata is None else metadata.get_typed_state()


def wait_for_state(hub, entity, expected, timeout: float = WAIT):
    wait_until(lambda: state_of(hub, entity) == expected, f"{entity} reaching state {expected!r}", timeout)


def test_function_entity_signalled_by_the_client(hub):
    counter = e.counter(unique("client"))
    assert hub.get_entity(counter) is None, "an entity nobody signalled does not exist"
    hub.signal_entity(counter, "add", 3)
    hub.signal_entity(counter, "add", 5)
    wait_for_state(hub, counter, 8)
    metadata = hub.get_entity(counter)
    assert metadata.id == counter and str(metadata.id) == f"@py_counter@{counter.key}"
    assert metadata.backlog_queue_size == 0
    assert metadata.last_modified > datetime.now(timezone.utc) - timedelta(minutes=1)
    assert hub.get_entity(counter, include_state=False).get_typed_state() is None, "no state unless asked for"
    # Deleting the state deletes the entity.
    hub.signal_entity(counter, "delete")
    wait_until(lambda: hub.get_entity(counter) is None, "the deleted entity disappearing")


def test_class_entity_signalled_by_the_client(hub):
    account = e.account(unique("class"))
    assert account.entity == "pyaccount", "the SDK lower-cases entity names"
    hub.signal_entity(account, "deposit", 10)
    hub.signal_entity(account, "deposit", 20)
    wait_for_state(hub, account, 30)


def test_orchestrations_signal_and_call_entities(hub):
    key = unique("orch")
    assert completed(run(hub, e.py_counter_calls, key)) == [15, 15], "the signal is processed before the calls"
    assert state_of(hub, e.counter(key)) == 15
    class_key = unique("orch-class")
    assert completed(run(hub, e.py_account_calls, class_key)) == 10
    assert state_of(hub, e.account(class_key)) == 10


def test_an_entity_signals_another_entity_before_it_answers_its_caller(hub):
    a, b = unique("relay-a"), unique("relay-b")
    assert completed(run(hub, e.py_relay, {"a": a, "b": b})) == 100
    # And from a client signal.
    c = unique("relay-c")
    hub.signal_entity(e.counter(a), "forward", {"to": c, "amount": 7})
    wait_for_state(hub, e.counter(c), 7)


def test_an_entity_starts_an_orchestration(hub):
    # Ids as the SDK's scheduled tasks make them, with ':', '+' and '.'.
    instance_id = f"{unique('started')}-2026-12-01T07:32:08.663224+00:00"
    hub.signal_entity(e.counter(unique("starter")), "start", {"instance_id": instance_id, "value": "hi"})
    state = wait_until(lambda: hub.get_orchestration_state(instance_id), "the started orchestration appearing")
    state = hub.wait_for_orchestration_completion(state.instance_id, timeout=WAIT)
    assert completed(state) == {"instance_id": instance_id, "value": "hi"}


def test_critical_sections_transfer_consistently_and_release_their_locks(hub, stub):
    source, target = unique("acct-a"), unique("acct-b")
    hub.signal_entity(e.account(source), "deposit", 100)
    hub.signal_entity(e.account(target), "deposit", 50)
    wait_for_state(hub, e.account(source), 100)
    wait_for_state(hub, e.account(target), 50)
    # Twice in a row: the second run gets the locks only if the first released them.
    assert completed(run(hub, e.py_transfer, {"source": source, "target": target, "amount": 30})) == [70, 80]
    assert completed(run(hub, e.py_transfer, {"source": source, "target": target, "amount": 30})) == [40, 110]
    # Two critical sections on the same accounts, in opposite directions, at once:
    # neither deadlocks, and no money is made or lost.
    there = hub.schedule_new_orchestration(e.py_transfer, input={"source": source, "target": target, "amount": 10})
    back = hub.schedule_new_orchestration(e.py_transfer, input={"source": target, "target": source, "amount": 25})
    for instance_id in (there, back):
        completed(hub.wait_for_orchestration_completion(instance_id, timeout=WAIT))
    balances = [state_of(hub, e.account(source)), state_of(hub, e.account(target))]
    assert balances == [40 - 10 + 25, 110 + 10 - 25] and sum(balances) == 150
    for key in (source, target):
        raw = stub.GetEntity(pb.GetEntityRequest(instanceId=str(e.account(key)), includeState=False))
        assert raw.exists and not raw.entity.HasField("lockedBy"), f"{key} is still locked: {raw}"


def test_terminating_a_lock_holder_releases_its_lock(hub, stub):
    key = unique("held")
    holder = hub.schedule_new_orchestration(e.py_lock_and_wait, input=key)
    wait_for_custom_status(hub, holder, "locked")
    raw = stub.GetEntity(pb.GetEntityRequest(instanceId=str(e.counter(key)), includeState=False))
    assert not raw.exists, "a locked entity without state does not exist"
    waiting = hub.schedule_new_orchestration(e.py_counter_calls, input=key)
    query = pb.EntityQuery(instanceIdStartsWith=wrappers_pb2.StringValue(value=str(e.counter(key))),
                           includeTransient=True)

    def backlog():
        [entity] = stub.QueryEntities(pb.QueryEntitiesRequest(query=query)).entities
        return entity if entity.backlogQueueSize >= 2 else None

    # The other orchestration's signal and call wait behind the lock.
    entity = wait_until(backlog, "the signal and the call queueing behind the lock")
    assert entity.lockedBy.value == holder, entity
    assert hub.get_orchestration_state(waiting).runtime_status == client.OrchestrationStatus.RUNNING
    hub.terminate_orchestration(holder)
    assert completed(hub.wait_for_orchestration_completion(waiting, timeout=WAIT)) == [15, 15]


def test_a_failed_operation_rolls_back_and_fails_its_caller(hub):
    key = unique("fail")
    hub.signal_entity(e.counter(key), "add", 4)
    wait_for_state(hub, e.counter(key), 4)
    handled = completed(run(hub, e.py_entity_failure, {"key": key, "handle": True}))
    assert f"counter {key} refuses" in handled["message"]
    assert handled["state"] == 4, "the failed operation's state change was rolled back"
    assert hub.get_entity(e.counter("never")) is None, "the failed operation's signal was dropped"
    state = run(hub, e.py_entity_failure, {"key": key, "handle": False})
    assert state.runtime_status == client.OrchestrationStatus.FAILED, state
    assert state.failure_details.error_type.endswith("TaskFailedError"), state.failure_details
    assert f"counter {key} refuses" in state.failure_details.message
    assert state_of(hub, e.counter(key)) == 4


def test_delayed_signals_wait_for_their_time(hub):
    from_client, from_orchestration = e.counter(unique("later")), e.counter(unique("later-orch"))
    started = time.monotonic()
    hub.signal_entity(from_client, "add", 1, signal_time=datetime.now(timezone.utc) + timedelta(seconds=2))
    assert completed(run(hub, e.py_delayed_signal, {"key": from_orchestration.key, "amount": 2, "delay_ms": 2000})) \
        == "signalled"
    time.sleep(max(0.0, started + 0.5 - time.monotonic()))
    assert hub.get_entity(from_client) is None and hub.get_entity(from_orchestration) is None, \
        "not delivered at 0.5 s"
    wait_for_state(hub, from_client, 1)
    assert time.monotonic() - started >= 1.5, "delivered at its time, not before"
    wait_for_state(hub, from_orchestration, 2)
    # An immediate signal is not held up by the delayed ones.
    now = e.counter(unique("now"))
    hub.signal_entity(now, "add", 3)
    wait_for_state(hub, now, 3, timeout=5)


def test_entity_queries_page_and_clean_entity_storage(hub, stub):
    prefix = unique("page")
    keys = [f"{prefix}-{i}" for i in range(5)]
    for i, key in enumerate(keys):
        hub.signal_entity(e.counter(key), "add", i + 1)
    for i, key in enumerate(keys):
        wait_for_state(hub, e.counter(key), i + 1)
    found = hub.get_all_entities(client.EntityQuery(instance_id_starts_with=f"@py_counter@{prefix}", page_size=2))
    assert [str(entity.id) for entity in found] == [f"@py_counter@{key}" for key in keys], "every page, in id order"
    assert [entity.get_typed_state() for entity in found] == [1, 2, 3, 4, 5]
    # Page by page, by hand: two per page and a continuation token.
    query = pb.EntityQuery(includeState=False)
    query.instanceIdStartsWith.value = f"@py_counter@{prefix}"
    query.pageSize.value = 2
    first = stub.QueryEntities(pb.QueryEntitiesRequest(query=query))
    assert len(first.entities) == 2 and first.continuationToken.value
    assert not first.entities[0].HasField("serializedState")
    # Other prefixes and time ranges.
    assert hub.get_all_entities(client.EntityQuery(instance_id_starts_with=f"@pyaccount@{prefix}")) == []
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    assert hub.get_all_entities(client.EntityQuery(instance_id_starts_with=f"@py_counter@{prefix}",
                                                   last_modified_from=later)) == []

    # An entity whose state was deleted is listed only as transient, until the
    # storage is cleaned.
    hub.signal_entity(e.counter(keys[0]), "delete")
    wait_until(lambda: hub.get_entity(e.counter(keys[0])) is None, "the deletion")
    everything = client.EntityQuery(instance_id_starts_with=f"@py_counter@{prefix}", include_transient=True)
    assert f"@py_counter@{keys[0]}" not in [str(entity.id) for entity in hub.get_all_entities(
        client.EntityQuery(instance_id_starts_with=f"@py_counter@{prefix}"))]
    assert f"@py_counter@{keys[0]}" in [str(entity.id) for entity in hub.get_all_entities(everything)]
    cleaned = hub.clean_entity_storage()
    assert cleaned.empty_entities_removed >= 1
    assert [str(entity.id) for entity in hub.get_all_entities(everything)] == \
        [f"@py_counter@{key}" for key in keys[1:]]


def test_entity_ids_are_checked(hub, stub):
    import grpc
    try:
        stub.SignalEntity(pb.SignalEntityRequest(instanceId="not-an-entity", name="add"))
        raise AssertionError("an invalid entity id was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not-an-entity" in error.details()
    # An entity no worker hosts yet is accepted: a worker may host it later.
    stub.SignalEntity(pb.SignalEntityRequest(instanceId=f"@{unique('nobody')}@k", name="op"))
    # The SDK allows keys that Keel refuses ('/', '\\', '#', '?'): the orchestration that
    # names one fails, saying why.
    state = run(hub, e.py_delayed_signal, {"key": "bad/key", "amount": 1, "delay_ms": 0})
    assert state.runtime_status == client.OrchestrationStatus.FAILED, state
    assert state.failure_details.error_type == "InvalidEntityId"
    assert "@py_counter@bad/key" in state.failure_details.message


def test_a_schedule_runs_its_orchestration_repeatedly(hub):
    schedule_id = unique("sched")
    schedules = ScheduledTaskClient(hub)
    schedule = schedules.create_schedule(ScheduleCreationOptions(
        schedule_id=schedule_id, orchestration_name="py_entity_started", interval=timedelta(seconds=1),
        orchestration_input="tick"))
    try:
        description = schedule.describe()
        assert description.schedule_id == schedule_id

        def runs():
            query = client.OrchestrationQuery(instance_id_prefix=f"{schedule_id}-", fetch_inputs_and_outputs=True)
            states = hub.get_all_orchestration_states(query)
            done = [s for s in states if s.runtime_status == client.OrchestrationStatus.COMPLETED]
            return done if len(done) >= 2 else None

        done = wait_until(runs, "two runs of the schedule", every=0.2)
        assert all(json.loads(s.serialized_output)["value"] == "tick" for s in done)
        assert len({s.instance_id for s in done}) == len(done), "each run is a new instance"
        assert schedule.describe().last_run_at is not None
    finally:
        schedule.delete()
    wait_until(lambda: schedules.get_schedule(schedule_id) is None, "the schedule's deletion")
