"""Fixtures: the real ``keel serve`` binary on SQLite in a temporary directory, the
Python SDK's worker (hosting ``orchestrations.py``) and client connected to it.

The binary is ``$KEEL_BIN``, else ``$CARGO_TARGET_DIR/debug/keel``, else the
workspace's ``target/debug/keel``.
"""

import os
import pathlib
import signal
import subprocess
import threading
import time

import grpc
import pytest
from durabletask import client, worker

import entity_functions
import orchestrations

REPO = pathlib.Path(__file__).resolve().parents[4]
STARTUP_TIMEOUT_S = 30


def keel_binary() -> pathlib.Path:
    if os.environ.get("KEEL_BIN"):
        return pathlib.Path(os.environ["KEEL_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "keel"


class KeelServer:
    """One ``keel serve`` process; ``restart`` keeps its task hub and its gRPC port."""

    def __init__(self, directory: pathlib.Path, api_key: str | None = None, tls: tuple | None = None,
                 env: dict | None = None):
        self.directory = directory
        self.extra_env = env or {}  # e.g. the OTEL_* settings of the tracing test
        self.tls = tls  # (certificate file, key file): HTTP and gRPC over TLS
        self.store = f"sqlite://{directory / 'hub.db'}"
        self.api_key = api_key
        self.grpc_port = 0
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.http = ""
        self._log = None

    def start(self) -> "KeelServer":
        binary = keel_binary()
        assert binary.exists(), f"{binary} is missing: build it with `cargo build -p keel-cli`"
        env = {key: value for key, value in os.environ.items() if key not in ("KEEL_API_KEY", "KEEL_STORE")}
        env.setdefault("RUST_LOG", "info")
        env.update(self.extra_env)
        args = [str(binary), "serve", "--samples", "--port", "0", "--grpc-port", str(self.grpc_port), "--store", self.store]
        if self.api_key:
            args += ["--api-key", self.api_key]
        if self.tls:
            args += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
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
                self.address = line.split()[-1]
                self.grpc_port = int(self.address.rsplit(":", 1)[1])
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
                raise AssertionError(f"keel serve did not stop on SIGTERM:\n{self.log()}")
        if self._log:
            self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return (self.directory / "host.log").read_text()
        except OSError:
            return ""


class ExceptionProperties:
    """Describes ``PropertiesError``s with properties (they travel in failure details)."""

    def get_exception_properties(self, exception):
        if isinstance(exception, orchestrations.PropertiesError):
            return {"code": 7, "retry": False, "where": ["activity"]}
        return None


def new_worker(address: str, metadata=None, **options) -> worker.TaskHubGrpcWorker:
    """A worker hosting ``orchestrations.py``, ``entity_functions.py`` and the SDK's
    scheduled tasks; its work-item filters ask Keel for those functions and entities
    only, so that other workers on the same hub (the README example's, the Rust one in
    ``keel serve``) keep theirs."""
    w = worker.TaskHubGrpcWorker(host_address=address, metadata=metadata, **options,
                                 exception_properties_provider=ExceptionProperties())
    w.use_work_item_filters()
    for orchestrator in orchestrations.ORCHESTRATORS + entity_functions.ORCHESTRATORS:
        w.add_orchestrator(orchestrator)
    for activity in orchestrations.ACTIVITIES:
        w.add_activity(activity)
    for entity in entity_functions.ENTITIES:
        w.add_entity(entity)
    w.configure_scheduled_tasks()
    return w


@pytest.fixture(scope="session")
def keel(tmp_path_factory):
    server = KeelServer(tmp_path_factory.mktemp("keel")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def py_worker(keel):
    w = new_worker(keel.address)
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def hub(keel, py_worker) -> client.TaskHubGrpcClient:
    """A client on the shared server, with the Python worker attached."""
    c = client.TaskHubGrpcClient(host_address=keel.address)
    yield c
    c.close()


@pytest.fixture
def stub(keel):
    """The raw generated stub, for what the SDK client does not expose."""
    from durabletask.internal import orchestrator_service_pb2_grpc as services
    with grpc.insecure_channel(keel.address) as channel:
        yield services.TaskHubSidecarServiceStub(channel)


@pytest.fixture
def private_keel(tmp_path):
    """A server of one's own (restarted, or configured differently)."""
    servers = []

    def start(**kwargs) -> KeelServer:
        server = KeelServer(tmp_path, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
