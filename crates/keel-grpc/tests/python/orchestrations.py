"""The orchestrators and activities the Python worker hosts in the tests.

Names start with ``py_`` so that they never collide with the Rust sample app that
``keel serve`` hosts in-process (``HelloCities``, ``SayHello``, ...).
"""

import threading
from collections import Counter
from datetime import timedelta

from durabletask import task

# Attempts per activity input, for the activities that fail on purpose.
_attempts: Counter = Counter()
_attempts_lock = threading.Lock()


def _attempt(key: str) -> int:
    with _attempts_lock:
        _attempts[key] += 1
        return _attempts[key]


# ---- activities ----------------------------------------------------------------------

def py_hello(ctx: task.ActivityContext, name: str) -> str:
    return f"Hello {name}!"


def py_square(ctx: task.ActivityContext, n: int) -> int:
    return n * n


def py_boom(ctx: task.ActivityContext, message: str) -> None:
    raise ValueError(message)


def py_flaky(ctx: task.ActivityContext, spec: dict) -> str:
    """Fails until it is called the ``succeed_on``-th time for ``spec["key"]``."""
    attempt = _attempt(spec["key"])
    if attempt < spec["succeed_on"]:
        raise RuntimeError(f"attempt {attempt} failed")
    return f"succeeded on attempt {attempt}"


# ---- orchestrators --------------------------------------------------------------------

def py_chain(ctx: task.OrchestrationContext, cities: list):
    greetings = []
    for city in cities:
        greetings.append((yield ctx.call_activity(py_hello, input=city)))
    return greetings


def py_fan_out(ctx: task.OrchestrationContext, n: int):
    squares = yield task.when_all([ctx.call_activity(py_square, input=i) for i in range(1, n + 1)])
    return sum(squares)


def py_child(ctx: task.OrchestrationContext, n: int):
    if n < 0:
        raise ValueError(f"negative input {n}")
    square = yield ctx.call_activity(py_square, input=n)
    return {"instance_id": ctx.instance_id, "square": square}


def py_parent(ctx: task.OrchestrationContext, numbers: list):
    results = yield task.when_all([ctx.call_sub_orchestrator(py_child, input=n) for n in numbers])
    try:
        yield ctx.call_sub_orchestrator(py_child, input=-1)
        failure = None
    except task.TaskFailedError as error:
        failure = error.details.message
    return {"squares": [r["square"] for r in results], "children": [r["instance_id"] for r in results],
            "failure": failure}


def py_timer(ctx: task.OrchestrationContext, delay_ms: int):
    start = ctx.current_utc_datetime
    yield ctx.create_timer(timedelta(milliseconds=delay_ms))
    return (ctx.current_utc_datetime - start).total_seconds()


def py_wait_event(ctx: task.OrchestrationContext, delay_ms: int):
    """Waits ``delay_ms`` on a timer, then for the event ``approval``."""
    if delay_ms:
        yield ctx.create_timer(timedelta(milliseconds=delay_ms))
    ctx.set_custom_status("waiting")
    value = yield ctx.wait_for_external_event("approval")
    return value


def py_event_or_timeout(ctx: task.OrchestrationContext, timeout_ms: int):
    event = ctx.wait_for_external_event("approval")
    timeout = ctx.create_timer(timedelta(milliseconds=timeout_ms))
    winner = yield task.when_any([event, timeout])
    if winner == event:
        return {"approved": event.get_result()}
    return "timed out"


def py_retry(ctx: task.OrchestrationContext, spec: dict):
    policy = task.RetryPolicy(first_retry_interval=timedelta(milliseconds=100), max_number_of_attempts=spec["attempts"])
    return (yield ctx.call_activity(py_flaky, input=spec, retry_policy=policy))


def py_retry_child(ctx: task.OrchestrationContext, spec: dict):
    policy = task.RetryPolicy(first_retry_interval=timedelta(milliseconds=100), max_number_of_attempts=3)
    return (yield ctx.call_sub_orchestrator(py_flaky_orchestrator, input=spec, retry_policy=policy))


def py_flaky_orchestrator(ctx: task.OrchestrationContext, spec: dict):
    # The attempt is counted in an activity: orchestrator code must be deterministic.
    return (yield ctx.call_activity(py_flaky, input=spec))


def py_counter(ctx: task.OrchestrationContext, n: int):
    """Continues as new until ``n`` reaches 3."""
    if n < 3:
        yield ctx.call_activity(py_square, input=n)
        ctx.continue_as_new(n + 1)
        return None
    return n


def py_collect(ctx: task.OrchestrationContext, items: list):
    """Collects three ``item`` events, one per execution, keeping unprocessed ones."""
    item = yield ctx.wait_for_external_event("item")
    items = items + [item]
    if len(items) < 3:
        ctx.continue_as_new(items, save_events=True)
        return None
    return items


def py_custom_status(ctx: task.OrchestrationContext, _):
    ctx.set_custom_status({"stage": 1})
    yield ctx.wait_for_external_event("next")
    ctx.set_custom_status({"stage": 2})
    return "done"


def py_forever(ctx: task.OrchestrationContext, _):
    yield ctx.wait_for_external_event("never")
    return "unreachable"


def py_parent_of_forever(ctx: task.OrchestrationContext, child_id: str):
    yield ctx.call_sub_orchestrator(py_forever, instance_id=child_id)
    return "unreachable"


def py_fail(ctx: task.OrchestrationContext, message: str):
    yield ctx.call_activity(py_boom, input=message)
    return "unreachable"


def py_catch(ctx: task.OrchestrationContext, message: str):
    try:
        yield ctx.call_activity(py_boom, input=message)
    except task.TaskFailedError as error:
        return {"type": error.details.error_type, "message": error.details.message}
    return "unreachable"


def py_nondeterministic(ctx: task.OrchestrationContext, _):
    """Takes a different first action on replay than it did the first time."""
    if not ctx.is_replaying:
        yield ctx.create_timer(timedelta(milliseconds=50))
    else:
        yield ctx.call_activity(py_hello, input="replay")
    return "unreachable"


def py_rewindable(ctx: task.OrchestrationContext, spec: dict):
    first = yield ctx.call_activity(py_hello, input="before")
    second = yield ctx.call_activity(py_flaky, input=spec)
    return [first, second]


def py_calls_rust(ctx: task.OrchestrationContext, city: str):
    """A Python orchestrator calling an activity that only the Rust worker hosts."""
    return (yield ctx.call_activity("SayHello", input=city))


class PropertiesError(Exception):
    """An error the worker's exception properties provider describes (see conftest)."""


def py_fail_with_properties(ctx: task.ActivityContext, code: int) -> None:
    raise PropertiesError(f"code {code}")


def py_payload(ctx: task.ActivityContext, n: int) -> str:
    """A 4 KiB result."""
    return f"{n:08d}" * 512


def py_retry_200ms(ctx: task.OrchestrationContext, spec: dict):
    policy = task.RetryPolicy(first_retry_interval=timedelta(milliseconds=200), max_number_of_attempts=2)
    return (yield ctx.call_activity(py_flaky, input=spec, retry_policy=policy))


def py_versioned(ctx: task.OrchestrationContext, n: int):
    """Continues as new once, with version 2.0; returns the version it then runs as."""
    if n == 0:
        ctx.continue_as_new(1, new_version="2.0")
        return None
    return ctx.version


def py_big_fan_out(ctx: task.OrchestrationContext, n: int):
    """``n`` activities of 4 KiB results each, at once: a history of n * 4 KiB."""
    results = yield task.when_all([ctx.call_activity(py_payload, input=i) for i in range(n)])
    return sum(len(result) for result in results)


def py_tagged_task(ctx: task.OrchestrationContext, name: str):
    return (yield ctx.call_activity(py_hello, input=name, tags={"kind": "greeting"}))


def py_fail_with_details(ctx: task.OrchestrationContext, code: int):
    yield ctx.call_activity(py_fail_with_properties, input=code)
    return "unreachable"


ORCHESTRATORS = [
    py_chain, py_fan_out, py_child, py_parent, py_timer, py_wait_event, py_event_or_timeout, py_retry,
    py_retry_child, py_flaky_orchestrator, py_counter, py_collect, py_custom_status, py_forever,
    py_parent_of_forever, py_fail, py_catch, py_nondeterministic, py_rewindable, py_calls_rust,
    py_retry_200ms, py_versioned, py_fail_with_details, py_tagged_task,
]
ACTIVITIES = [py_hello, py_square, py_boom, py_flaky, py_fail_with_properties]
