"""The SDK's versioning options against Keel: instance versions reach the workers, a
strict worker with work-item filters gets only its version's instances, and a worker
whose policy fails mismatches fails them."""

from durabletask import client, worker

from test_patterns import WAIT, completed


def versioned_worker(address: str, tag: str, version: str, failure: worker.VersionFailureStrategy,
                     filters: bool) -> worker.TaskHubGrpcWorker:
    """A worker of one build: its `py_which` answers which build ran it."""
    w = worker.TaskHubGrpcWorker(host_address=address)

    def py_which(ctx, _):
        return f"{tag} ran version {ctx.version}"

    w.add_orchestrator(py_which)
    w.use_versioning(worker.VersioningOptions(
        version=version,
        default_version=version,
        match_strategy=worker.VersionMatchStrategy.STRICT,
        failure_strategy=failure,
    ))
    if filters:
        w.use_work_item_filters()
    return w


def test_strict_workers_get_only_their_version(private_keel):
    server = private_keel()
    old = versioned_worker(server.address, "old", "1.0", worker.VersionFailureStrategy.REJECT, filters=True)
    new = versioned_worker(server.address, "new", "2.0", worker.VersionFailureStrategy.REJECT, filters=True)
    old.start()
    new.start()
    hub = client.TaskHubGrpcClient(host_address=server.address)
    try:
        ids = [(version, hub.schedule_new_orchestration("py_which", version=version))
               for version in ["1.0", "2.0", "1.0", "2.0"]]
        for version, instance_id in ids:
            state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
            expected = "old" if version == "1.0" else "new"
            assert completed(state) == f"{expected} ran version {version}"
    finally:
        old.stop()
        new.stop()
        hub.close()


def test_a_worker_that_fails_mismatches_fails_the_instance(private_keel):
    server = private_keel()
    strict = versioned_worker(server.address, "strict", "1.0", worker.VersionFailureStrategy.FAIL, filters=False)
    strict.start()
    hub = client.TaskHubGrpcClient(host_address=server.address)
    try:
        instance_id = hub.schedule_new_orchestration("py_which", version="9.0")
        state = hub.wait_for_orchestration_completion(instance_id, timeout=WAIT)
        assert state.runtime_status == client.OrchestrationStatus.FAILED
        assert "version" in state.failure_details.message.lower(), state.failure_details.message
        matching = hub.schedule_new_orchestration("py_which", version="1.0")
        assert completed(hub.wait_for_orchestration_completion(matching, timeout=WAIT)) == "strict ran version 1.0"
    finally:
        strict.stop()
        hub.close()
