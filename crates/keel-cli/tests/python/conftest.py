"""Fixtures: the real ``keel serve`` binary on SQLite in a temporary directory, and the
Durable Functions Python client (PyPI ``azure-functions-durable``) built from the client
binding a Functions host hands its functions, with only the host and port changed to
Keel's.

The binary is ``$KEEL_BIN``, else ``$CARGO_TARGET_DIR/debug/keel``, else the
workspace's ``target/debug/keel``.
"""

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import threading
import time
import urllib.parse

import pytest
from azure.durable_functions import DurableOrchestrationClient
from azure.durable_functions.models.utils import http_utils

REPO = pathlib.Path(__file__).resolve().parents[4]
STARTUP_TIMEOUT_S = 30

# The client binding a Functions host (task hub "keel", function key "KEY") passes to a
# Python function with a durable client: webhook URLs on the host's port 7071 and the
# local RPC endpoint (`localRpcEndpointEnabled`) on 127.0.0.1:17071. `binding_for`
# changes the host and port of both, and nothing else.
FUNCTIONS_HOST_BINDING = {
    "taskHubName": "keel",
    "creationUrls": {
        "createNewInstancePostUri":
            "http://localhost:7071/runtime/webhooks/durabletask/orchestrators/{functionName}[/{instanceId}]"
            "?code=KEY",
        "createAndWaitOnNewInstancePostUri":
            "http://localhost:7071/runtime/webhooks/durabletask/orchestrators/{functionName}[/{instanceId}]"
            "?timeout={timeoutInSeconds}&pollingInterval={intervalInSeconds}&code=KEY",
    },
    "managementUrls": {
        "id": "INSTANCEID",
        "statusQueryGetUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID"
                             "?taskHub=keel&connection=Storage&code=KEY",
        "sendEventPostUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID/raiseEvent/"
                            "{eventName}?taskHub=keel&connection=Storage&code=KEY",
        "terminatePostUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID/terminate"
                            "?reason={text}&taskHub=keel&connection=Storage&code=KEY",
        "rewindPostUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID/rewind"
                         "?reason={text}&taskHub=keel&connection=Storage&code=KEY",
        "purgeHistoryDeleteUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID"
                                 "?taskHub=keel&connection=Storage&code=KEY",
        "restartPostUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID/restart"
                          "?taskHub=keel&connection=Storage&code=KEY",
        "suspendPostUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID/suspend"
                          "?reason={text}&taskHub=keel&connection=Storage&code=KEY",
        "resumePostUri": "http://localhost:7071/runtime/webhooks/durabletask/instances/INSTANCEID/resume"
                         "?reason={text}&taskHub=keel&connection=Storage&code=KEY",
    },
    "baseUrl": "http://localhost:7071/runtime/webhooks/durabletask",
    "requiredQueryStringParameters": "code=KEY",
    "rpcBaseUrl": "http://127.0.0.1:17071/durabletask/",
    "httpBaseUrl": "",
    "maxGrpcMessageSizeInBytes": 0,
    "grpcHttpClientTimeout": "00:01:40",
}


def keel_binary() -> pathlib.Path:
    if os.environ.get("KEEL_BIN"):
        return pathlib.Path(os.environ["KEEL_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "keel"


class KeelServer:
    """One ``keel serve`` process (``--samples`` unless ``samples=False``)."""

    def __init__(self, directory: pathlib.Path, samples: bool = True):
        self.directory = directory
        self.samples = samples
        self.process: subprocess.Popen | None = None
        self.http = ""
        self.grpc = ""
        self._log = None

    def start(self) -> "KeelServer":
        binary = keel_binary()
        assert binary.exists(), f"{binary} is missing: build it with `cargo build -p keel-cli`"
        env = {key: value for key, value in os.environ.items() if key not in ("KEEL_API_KEY", "KEEL_STORE")}
        env.setdefault("RUST_LOG", "info")
        args = [str(binary), "serve", "--port", "0", "--grpc-port", "0",
                "--store", f"sqlite://{self.directory / 'hub.db'}"]
        if self.samples:
            args.append("--samples")
        self._log = open(self.directory / "host.log", "a")
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                        text=True, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"keel serve exited early:\n{self.log()}")
            if line.startswith("keel: listening on "):
                self.http = line.split()[3]
            if "gRPC (Durable Task SDKs):" in line:
                self.grpc = line.split()[-1]
                break
        else:
            raise RuntimeError(f"keel serve printed no gRPC address:\n{self.log()}")
        # Keep draining stdout so that the host never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log:
            self._log.close()

    def log(self) -> str:
        try:
            return (self.directory / "host.log").read_text()
        except OSError:
            return ""


def binding_for(http: str) -> str:
    """The Functions host's client binding with its host and port changed to ``http``'s."""
    netloc = urllib.parse.urlsplit(http).netloc
    text = json.dumps(FUNCTIONS_HOST_BINDING)
    return text.replace("localhost:7071", netloc).replace("127.0.0.1:17071", netloc)


@pytest.fixture(scope="session")
def keel(tmp_path_factory):
    server = KeelServer(tmp_path_factory.mktemp("keel")).start()
    yield server
    server.stop()


@pytest.fixture
def private_keel(tmp_path):
    """A server of one's own, configured differently (``samples=False``)."""
    servers = []

    def start(**kwargs) -> KeelServer:
        server = KeelServer(tmp_path, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def loop():
    """One event loop for every test: the client keeps one aiohttp session, bound to it."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.run_until_complete(http_utils._close_session())
    event_loop.close()


@pytest.fixture(scope="session")
def run(loop):
    """Runs a coroutine of the client to its end."""
    return loop.run_until_complete


@pytest.fixture(scope="session")
def df_client(keel) -> DurableOrchestrationClient:
    return DurableOrchestrationClient(binding_for(keel.http))
