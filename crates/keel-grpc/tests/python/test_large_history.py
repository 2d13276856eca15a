"""A history far over the 4 MiB gRPC message limit: 3,000 activities of 4 KiB each.

The Python SDK 1.12 neither advertises nor reads history streaming (its worker never
sets ``WORKER_CAPABILITY_HISTORY_STREAMING`` and ignores ``requiresHistoryStreaming``):
it gets every history whole, so its worker raises its receive limit. Keel sends up to
64 MiB per message, and streams larger histories to workers that ask for it (the Rust
wire test covers that path)."""

import time

from durabletask import client
from durabletask.grpc_options import GrpcChannelOptions

import orchestrations as o
from conftest import new_worker

ACTIVITIES = 3000


def test_3000_activities_of_4_kib_each_complete(keel):
    worker = new_worker(keel.address, channel_options=GrpcChannelOptions(
        max_receive_message_length=64 * 1024 * 1024))
    # Only this worker hosts the big orchestration and its activity.
    worker.add_orchestrator(o.py_big_fan_out)
    worker.add_activity(o.py_payload)
    worker.start()
    hub = client.TaskHubGrpcClient(host_address=keel.address)
    try:
        started = time.monotonic()
        instance_id = hub.schedule_new_orchestration(o.py_big_fan_out, input=ACTIVITIES)
        state = hub.wait_for_orchestration_completion(instance_id, timeout=240)
        assert state.runtime_status == client.OrchestrationStatus.COMPLETED, state.failure_details
        assert state.serialized_output == str(ACTIVITIES * 4096)
        history = hub.get_orchestration_history(instance_id)
        assert sum(type(e).__name__ == "TaskCompletedEvent" for e in history) == ACTIVITIES
        print(f"{ACTIVITIES} activities in {time.monotonic() - started:.1f} s")
    finally:
        hub.close()
        worker.stop()
