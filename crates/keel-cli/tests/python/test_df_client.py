"""The Durable Functions Python client (PyPI ``azure-functions-durable``), unchanged,
against ``keel serve --samples``: its ``DurableOrchestrationClient`` is built from a
Functions host's client binding with only the host and port changed, so every call goes
to the ``rpcBaseUrl`` path (``/durabletask/…``) the way it goes to a Functions host.

The client sends inputs and event data JSON-encoded twice; Keel's typed decoding reads
a JSON string that holds JSON as that JSON (``keel_core::history::decode_payload``), so
the Rust samples take the client's inputs and events as they are.
"""

import datetime
import json
import time
import urllib.request
import uuid

import azure.functions as func
import pytest
from azure.durable_functions import OrchestrationRuntimeStatus as Status

WAIT_S = 30
HELLO_CITIES = ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]
FINISHED = (Status.Completed, Status.Failed, Status.Terminated, Status.Canceled)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def start_over_http(keel, name: str, instance_id: str, data) -> str:
    request = urllib.request.Request(
        f"{keel.http}/runtime/webhooks/durabletask/orchestrators/{name}/{instance_id}",
        data=json.dumps(data).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 202
        return json.load(response)["id"]


def http_get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_for(run, client, instance_id: str, statuses, **options):
    """Polls ``get_status`` until the instance has one of ``statuses``."""
    deadline = time.monotonic() + WAIT_S
    while True:
        status = run(client.get_status(instance_id, **options))
        if status and status.runtime_status in statuses:
            return status
        assert time.monotonic() < deadline, f"{instance_id} is {status.runtime_status if status else 'missing'}"
        time.sleep(0.05)


def history_of(run, client, instance_id: str) -> list:
    status = run(client.get_status(instance_id, show_history=True, show_history_output=True))
    return status.historyEvents


def test_start_new_and_get_status(run, df_client):
    instance_id = run(df_client.start_new("HelloCities"))
    named = run(df_client.start_new("HelloCities", instance_id=unique("df-start")))
    assert named.startswith("df-start-")
    for started in (instance_id, named):
        status = wait_for(run, df_client, started, FINISHED)
        assert status.runtime_status == Status.Completed
        assert status.output == HELLO_CITIES
        assert status.name == "HelloCities" and status.instance_id == started
        assert status.created_time <= status.last_updated_time
    history = history_of(run, df_client, named)
    assert [event["EventType"] for event in history][0] == "ExecutionStarted"
    assert [event["Result"] for event in history if event["EventType"] == "TaskCompleted"] == HELLO_CITIES

    assert not run(df_client.get_status("nobody-has-this-id")), "an unknown id is a falsy status"
    with pytest.raises(Exception, match="NoSuchOrchestrator"):
        run(df_client.start_new("NoSuchOrchestrator"))


def test_lists_with_filters_and_with_inputs(run, keel, df_client):
    prefix = unique("df-list")
    before = utc_now() - datetime.timedelta(seconds=5)
    for n in range(3):
        run(df_client.start_new("HelloCities", instance_id=f"{prefix}-{n}"))
    waiting = start_over_http(keel, "ApprovalWorkflow", f"{prefix}-waiting", {"request": "chair"})
    for n in range(3):
        wait_for(run, df_client, f"{prefix}-{n}", FINISHED)
    wait_for(run, df_client, waiting, [Status.Running])
    after = utc_now() + datetime.timedelta(seconds=5)

    everything = run(df_client.get_status_by(instance_id_prefix=prefix))
    assert sorted(status.instance_id for status in everything) == [f"{prefix}-0", f"{prefix}-1", f"{prefix}-2",
                                                                   waiting]
    completed = run(df_client.get_status_by(created_time_from=before, created_time_to=after,
                                            runtime_status=[Status.Completed], instance_id_prefix=prefix))
    assert sorted(status.instance_id for status in completed) == [f"{prefix}-{n}" for n in range(3)]
    assert all(status.output == HELLO_CITIES for status in completed)
    running = run(df_client.get_status_by(runtime_status=[Status.Running, Status.Pending], instance_id_prefix=prefix))
    assert [status.instance_id for status in running] == [waiting]
    assert running[0].input_ == {"request": "chair"}, "lists show each instance's input"
    later = run(df_client.get_status_by(created_time_from=after, instance_id_prefix=prefix))
    assert later == []
    every = {status.instance_id: status for status in run(df_client.get_status_all())}
    assert waiting in every and every[waiting].input_ == {"request": "chair"}
    run(df_client.terminate(waiting, "done listing"))


def test_raise_event(run, keel, df_client):
    instance_id = start_over_http(keel, "ApprovalWorkflow", unique("df-event"), {"request": "laptop"})
    status = wait_for(run, df_client, instance_id, [Status.Running])
    deadline = time.monotonic() + WAIT_S
    while status.custom_status != "waiting for approval":
        assert time.monotonic() < deadline
        time.sleep(0.05)
        status = run(df_client.get_status(instance_id))
    run(df_client.raise_event(instance_id, "Approval", True))
    # The client encodes `true` twice; the typed wait reads it as `true`.
    assert wait_for(run, df_client, instance_id, FINISHED).output == "Approved"
    raised = [event for event in history_of(run, df_client, instance_id) if event["EventType"] == "EventRaised"]
    assert [event["Name"] for event in raised] == ["Approval"]


def test_structured_inputs_from_the_client_reach_typed_orchestrators(run, df_client):
    order = {"orderId": "df-1", "customer": "ada@example.com", "items": [{"sku": "A1", "quantity": 2}]}
    instance_id = run(df_client.start_new("PlaceOrder", client_input=order))
    status = wait_for(run, df_client, instance_id, FINISHED)
    assert status.runtime_status == Status.Completed, status.output
    assert status.output == "TRACK-DF-1"

    with pytest.raises(Exception, match="is gone"):
        run(df_client.raise_event(instance_id, "Approval", True))
    with pytest.raises(Exception, match="No instance with ID nobody-has-this-id found"):
        run(df_client.raise_event("nobody-has-this-id", "Approval", True))


def test_suspend_resume_and_terminate(run, keel, df_client):
    instance_id = start_over_http(keel, "ApprovalWorkflow", unique("df-life"), {"request": "desk"})
    wait_for(run, df_client, instance_id, [Status.Running])
    run(df_client.suspend(instance_id, "lunch"))
    wait_for(run, df_client, instance_id, [Status.Suspended])
    run(df_client.resume(instance_id, "back"))
    wait_for(run, df_client, instance_id, [Status.Running])
    run(df_client.terminate(instance_id, "no longer needed"))
    terminated = wait_for(run, df_client, instance_id, FINISHED)
    assert terminated.runtime_status == Status.Terminated
    assert terminated.output == "no longer needed"
    reasons = {event["EventType"]: event.get("Reason") for event in history_of(run, df_client, instance_id)}
    assert reasons["ExecutionSuspended"] == "lunch" and reasons["ExecutionResumed"] == "back"
    # A finished instance: the client takes 410 as done.
    run(df_client.terminate(instance_id, "again"))
    for call in (df_client.terminate, df_client.suspend, df_client.resume):
        with pytest.raises(Exception, match="No instance with ID 'nobody-has-this-id' found"):
            run(call("nobody-has-this-id", "why"))


def test_rewind_a_failed_instance(run, keel, df_client):
    order = {"orderId": "o-7", "customer": "declined@example.com", "items": [{"sku": "A1", "quantity": 1}]}
    instance_id = start_over_http(keel, "PlaceOrder", unique("df-rewind"), order)
    failed = wait_for(run, df_client, instance_id, FINISHED)
    assert failed.runtime_status == Status.Failed
    assert failed.output["errorType"] == "PaymentDeclined"
    run(df_client.rewind(instance_id, "card replaced"))
    # The rewound instance runs the payment again; the test double declines it again.
    history = []
    deadline = time.monotonic() + WAIT_S
    while not any(event["EventType"] == "ExecutionRewound" for event in history) or \
            run(df_client.get_status(instance_id)).runtime_status not in FINISHED:
        assert time.monotonic() < deadline, history
        time.sleep(0.05)
        history = history_of(run, df_client, instance_id)
    assert [event["Reason"] for event in history if event["EventType"] == "ExecutionRewound"] == ["card replaced"]
    assert run(df_client.get_status(instance_id)).runtime_status == Status.Failed

    completed = run(df_client.start_new("HelloCities", instance_id=unique("df-rewind-done")))
    wait_for(run, df_client, completed, FINISHED)
    with pytest.raises(Exception, match="only supported on failed"):
        run(df_client.rewind(completed, "nothing to rewind"))


def test_purge_one_and_by_filter(run, keel, df_client):
    instance_id = run(df_client.start_new("HelloCities", instance_id=unique("df-purge")))
    wait_for(run, df_client, instance_id, FINISHED)
    assert run(df_client.purge_instance_history(instance_id)).instances_deleted == 1
    assert not run(df_client.get_status(instance_id))
    assert run(df_client.purge_instance_history(instance_id)).instances_deleted == 0

    running = start_over_http(keel, "ApprovalWorkflow", unique("df-purge-running"), {"request": "lamp"})
    wait_for(run, df_client, running, [Status.Running])
    assert run(df_client.purge_instance_history(running)).instances_deleted == 0, "a running instance stays"

    since = utc_now() - datetime.timedelta(seconds=1)
    batch = [run(df_client.start_new("HelloCities", instance_id=unique("df-purge-batch"))) for _ in range(3)]
    for started in batch:
        wait_for(run, df_client, started, FINISHED)
    long_ago = datetime.datetime(2000, 1, 1)
    nothing = run(df_client.purge_instance_history_by(created_time_from=long_ago,
                                                     created_time_to=long_ago + datetime.timedelta(days=1)))
    assert nothing.instances_deleted == 0
    purged = run(df_client.purge_instance_history_by(created_time_from=since, runtime_status=[Status.Completed]))
    assert purged.instances_deleted >= 3
    assert all(not run(df_client.get_status(started)) for started in batch)
    assert run(df_client.get_status(running)).runtime_status == Status.Running
    run(df_client.terminate(running, "done purging"))


def test_wait_for_completion_or_create_check_status_response(run, keel, df_client):
    request = func.HttpRequest(method="POST", url=f"{keel.http}/api/start", body=b"")
    done = run(df_client.start_new("HelloCities", instance_id=unique("df-wait")))
    response = run(df_client.wait_for_completion_or_create_check_status_response(request, done, 20000, 100))
    assert response.status_code == 200
    assert json.loads(response.get_body()) == HELLO_CITIES

    waiting = start_over_http(keel, "ApprovalWorkflow", unique("df-wait-running"), {"request": "sofa"})
    response = run(df_client.wait_for_completion_or_create_check_status_response(request, waiting, 500, 100))
    assert response.status_code == 202
    payload = json.loads(response.get_body())
    assert payload["id"] == waiting
    assert response.headers["Location"] == payload["statusQueryGetUri"]
    # The management URLs reach Keel: the binding's, on the request's host and port.
    assert payload["statusQueryGetUri"].startswith(f"{keel.http}/runtime/webhooks/durabletask/instances/{waiting}?")
    code, status = http_get(payload["statusQueryGetUri"])
    assert code == 202 and status["runtimeStatus"] == "Running"

    run(df_client.terminate(waiting, "stop waiting"))
    wait_for(run, df_client, waiting, FINISHED)
    response = run(df_client.wait_for_completion_or_create_check_status_response(request, waiting, 2000, 100))
    assert response.status_code == 200
    assert json.loads(response.get_body())["runtimeStatus"] == "Terminated"
    check = df_client.create_check_status_response(request, waiting)
    assert check.status_code == 202
    code, status = http_get(json.loads(check.get_body())["statusQueryGetUri"])
    assert code == 200 and status["output"] == "stop waiting"


def test_input_nested_beyond_the_limit_is_refused_and_writes_nothing(run, df_client):
    """JSON nested deeper than 64 levels: the client's start fails with Keel's 400 and
    the task hub gains no instance."""
    prefix = unique("df-deep")
    nested = 0
    for _ in range(100):
        nested = [nested]
    with pytest.raises(Exception, match="64"):
        run(df_client.start_new("HelloCities", instance_id=f"{prefix}-1", client_input=nested))
    assert run(df_client.get_status_by(instance_id_prefix=prefix)) == [], "a refused start wrote an instance"
