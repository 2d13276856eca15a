"""Failures keep their details across the wire; non-deterministic orchestrators fail."""

import pytest
from durabletask import client, worker

import orchestrations as o
from test_patterns import completed, run


def test_uncaught_activity_failure_fails_the_orchestration_with_its_details(hub):
    state = run(hub, o.py_fail, "kaboom")
    assert state.runtime_status == client.OrchestrationStatus.FAILED
    details = state.failure_details
    assert details is not None
    assert "kaboom" in details.message
    assert details.error_type  # the SDK names the Python exception type
    assert details.stack_trace, "the stack trace is kept"
    assert state.serialized_output is None


def test_caught_activity_failure_keeps_the_error_type(hub):
    assert completed(run(hub, o.py_catch, "handled")) == {"type": "builtins.ValueError", "message": "handled"}


def test_non_determinism_fails_the_orchestration(hub):
    state = run(hub, o.py_nondeterministic)
    assert state.runtime_status == client.OrchestrationStatus.FAILED
    assert "NonDeterminism" in state.failure_details.error_type, state.failure_details


def test_an_orchestrator_no_worker_hosts_waits_for_one(hub):
    instance_id = hub.schedule_new_orchestration("py_no_such_orchestrator")
    with pytest.raises(TimeoutError):
        hub.wait_for_orchestration_start(instance_id, timeout=1)
    assert hub.get_orchestration_state(instance_id).runtime_status == client.OrchestrationStatus.PENDING


def test_an_unknown_orchestrator_fails_in_a_worker_without_filters(private_keel):
    server = private_keel()
    w = worker.TaskHubGrpcWorker(host_address=server.address)
    w.start()
    hub = client.TaskHubGrpcClient(host_address=server.address)
    try:
        state = run(hub, "py_no_such_orchestrator")
        assert state.runtime_status == client.OrchestrationStatus.FAILED
        assert "py_no_such_orchestrator" in state.failure_details.message
    finally:
        hub.close()
        w.stop()


def test_input_nested_beyond_the_limit_is_refused_and_writes_nothing(hub):
    """Keel caps JSON nesting at 64 levels: the SDK client's start is INVALID_ARGUMENT,
    names the limit, and leaves the task hub as it was."""
    import grpc
    nested = 0
    for _ in range(100):
        nested = [nested]
    prefix = "too-deep-"
    everything = client.OrchestrationQuery(instance_id_prefix=prefix)
    assert list(hub.get_all_orchestration_states(everything)) == []
    with pytest.raises(grpc.RpcError) as error:
        hub.schedule_new_orchestration(o.py_chain, input=nested, instance_id=f"{prefix}1")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64" in error.value.details(), error.value.details()
    assert list(hub.get_all_orchestration_states(everything)) == [], "a refused start wrote an instance"
    # Just within the limit, the same start is accepted.
    within = 0
    for _ in range(60):
        within = [within]
    hub.schedule_new_orchestration(o.py_custom_status, input=within, instance_id=f"{prefix}2")
    assert [s.instance_id for s in hub.get_all_orchestration_states(everything)] == [f"{prefix}2"]
