"""The gRPC path driven by the official Python SDK (``durabletask``): a no-op worker runs
chains of sequential activities against a real ``keel serve`` on a fresh SQLite hub, and
this prints Keel's own CPU per activity step (the server process's, from /proc) beside
the wall time. A benchmark, not a test: run it by hand on a quiet machine.

    cargo build --release -p keel-cli
    .venv-ci/bin/python crates/keel-bench/sdk/python_chain.py [--keel target/release/keel]

One JSON line per run: ``chain`` (1 instance, 100 activities) and ``throughput`` (100
instances of 10 activities, started together).
"""

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time

from durabletask import client, task, worker

CHAIN_LENGTH = 100
FAN_INSTANCES = 100
FAN_LENGTH = 10


def noop(ctx: task.ActivityContext, value: int) -> int:
    return value


def chain(ctx: task.OrchestrationContext, length: int):
    value = 0
    for _ in range(length):
        value = yield ctx.call_activity(noop, input=value + 1)
    return value


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def start_keel(binary: str, directory: str) -> tuple[subprocess.Popen, str]:
    args = [binary, "serve", "--port", "0", "--grpc-port", "0", "--store", f"sqlite://{directory}/hub.db"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if "gRPC (Durable Task SDKs):" in line:
            address = line.split()[-1]
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, address
    raise RuntimeError("keel serve printed no gRPC address")


def run(binary: str, name: str, instances: int, length: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        keel, address = start_keel(binary, directory)
        try:
            w = worker.TaskHubGrpcWorker(host_address=address)
            w.add_orchestrator(chain)
            w.add_activity(noop)
            w.start()
            hub = client.TaskHubGrpcClient(host_address=address)
            # Warm up: every path once, so that the measured run finds it ready.
            warm = hub.schedule_new_orchestration(chain, input=2)
            hub.wait_for_orchestration_completion(warm, timeout=60)
            cpu_before = cpu_seconds(keel.pid)
            started = time.monotonic()
            ids = [hub.schedule_new_orchestration(chain, input=length) for _ in range(instances)]
            for instance_id in ids:
                state = hub.wait_for_orchestration_completion(instance_id, timeout=600)
                assert state.serialized_output == str(length), state
            wall = time.monotonic() - started
            cpu = cpu_seconds(keel.pid) - cpu_before
            w.stop()
        finally:
            keel.terminate()
            keel.wait(timeout=20)
    steps = instances * length
    return {"scenario": f"python-{name}", "instances": instances, "activities": steps,
            "wall_ms": round(wall * 1000, 2), "ms_per_activity": round(wall * 1000 / steps, 3),
            "activities_per_s": round(steps / wall, 1),
            "keel_cpu_ms_per_step": round(cpu * 1000 / steps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keel", default="target/release/keel")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.runs):
        print(json.dumps(run(args.keel, "chain", 1, CHAIN_LENGTH)), flush=True)
        print(json.dumps(run(args.keel, "throughput", FAN_INSTANCES, FAN_LENGTH)), flush=True)


if __name__ == "__main__":
    main()
