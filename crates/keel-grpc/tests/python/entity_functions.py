"""The durable entities the Python worker hosts in the tests, and the orchestrators that
use them.

Names start with ``py`` so that they never collide with the Rust sample app's entities
(``Counter``, ``Account``), which ``keel serve`` hosts in-process.
"""

from datetime import timedelta

from durabletask import entities, task


# ---- entities -------------------------------------------------------------------------

def py_counter(ctx: entities.EntityContext, input):
    """A function-based counter."""
    value = ctx.get_state(int, 0)
    if ctx.operation == "add":
        value += input
        ctx.set_state(value)
    elif ctx.operation == "get":
        pass
    elif ctx.operation == "fail":
        # The SDK rolls a failed operation back: this state and signal are dropped.
        ctx.set_state(999)
        ctx.signal_entity(entities.EntityInstanceId("py_counter", "never"), "add", 1)
        raise ValueError(f"counter {ctx.entity_id.key} refuses")
    elif ctx.operation == "forward":
        # Signals another counter.
        ctx.signal_entity(entities.EntityInstanceId("py_counter", input["to"]), "add", input["amount"])
    elif ctx.operation == "start":
        # Starts an orchestration with the given id.
        return ctx.schedule_new_orchestration("py_entity_started", input=input["value"],
                                              instance_id=input["instance_id"])
    elif ctx.operation == "delete":
        ctx.set_state(None)
        return None
    else:
        raise ValueError(f"unknown operation {ctx.operation}")
    return value


class PyAccount(entities.DurableEntity):
    """A class-based bank account (entity name ``pyaccount``)."""

    def deposit(self, amount: int) -> int:
        balance = self.get_state(int, 0) + amount
        self.set_state(balance)
        return balance

    def withdraw(self, amount: int) -> int:
        balance = self.get_state(int, 0)
        if amount > balance:
            raise ValueError(f"insufficient funds: {balance} < {amount}")
        self.set_state(balance - amount)
        return balance - amount

    def balance(self) -> int:
        return self.get_state(int, 0)


# ---- orchestrators ----------------------------------------------------------------------

def counter(key: str) -> entities.EntityInstanceId:
    return entities.EntityInstanceId("py_counter", key)


def account(key: str) -> entities.EntityInstanceId:
    return entities.EntityInstanceId("PyAccount", key)


def py_counter_calls(ctx: task.OrchestrationContext, key: str):
    """A signal, then calls to the same counter: the calls see the signal's effect."""
    ctx.signal_entity(counter(key), "add", 5)
    after_add = yield ctx.call_entity(counter(key), "add", 10)
    current = yield ctx.call_entity(counter(key), "get")
    return [after_add, current]


def py_relay(ctx: task.OrchestrationContext, keys: dict):
    """Calls counter ``a``, which signals counter ``b``; then reads ``b``."""
    yield ctx.call_entity(counter(keys["a"]), "forward", {"to": keys["b"], "amount": 100})
    return (yield ctx.call_entity(counter(keys["b"]), "get"))


def py_account_calls(ctx: task.OrchestrationContext, key: str):
    yield ctx.call_entity(account(key), "deposit", 7)
    ctx.signal_entity(account(key), "deposit", 3)
    return (yield ctx.call_entity(account(key), "balance"))


def py_transfer(ctx: task.OrchestrationContext, spec: dict):
    """Moves ``amount`` from account ``source`` to ``target`` inside a critical section."""
    source, target = account(spec["source"]), account(spec["target"])
    with (yield ctx.lock_entities([source, target])):
        balance = yield ctx.call_entity(source, "balance")
        if balance < spec["amount"]:
            return "insufficient"
        yield ctx.call_entity(source, "withdraw", spec["amount"])
        yield ctx.call_entity(target, "deposit", spec["amount"])
        return [(yield ctx.call_entity(source, "balance")), (yield ctx.call_entity(target, "balance"))]


def py_lock_and_wait(ctx: task.OrchestrationContext, key: str):
    """Holds the lock on a counter until it is terminated."""
    with (yield ctx.lock_entities([counter(key)])):
        ctx.set_custom_status("locked")
        yield ctx.wait_for_external_event("never")
    return "unreachable"


def py_entity_failure(ctx: task.OrchestrationContext, spec: dict):
    """Calls an operation that fails; handles the failure if ``spec["handle"]``."""
    if not spec["handle"]:
        yield ctx.call_entity(counter(spec["key"]), "fail")
        return "unreachable"
    try:
        yield ctx.call_entity(counter(spec["key"]), "fail")
        return "unreachable"
    except task.TaskFailedError as error:
        state = yield ctx.call_entity(counter(spec["key"]), "get")
        return {"message": error.details.message, "state": state}


def py_delayed_signal(ctx: task.OrchestrationContext, spec: dict):
    """Signals a counter to add ``amount`` ``delay_ms`` from now."""
    at = ctx.current_utc_datetime + timedelta(milliseconds=spec["delay_ms"])
    ctx.signal_entity(counter(spec["key"]), "add", spec["amount"], signal_time=at)
    return "signalled"


def py_entity_started(ctx: task.OrchestrationContext, value):
    """The orchestration an entity starts (and a schedule runs)."""
    return {"instance_id": ctx.instance_id, "value": value}


ENTITIES = [py_counter, PyAccount]
ORCHESTRATORS = [py_counter_calls, py_relay, py_account_calls, py_transfer, py_lock_and_wait, py_entity_failure,
                 py_delayed_signal, py_entity_started]
