"""`keel serve --tls-cert --tls-key`: the Python SDK's worker and client connect with
``secure_channel=True`` to a certificate made for the test (self-signed, trusted through
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` in a process of its own), and the HTTP API answers
over HTTPS."""

import json
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
import textwrap
import urllib.request

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def self_signed(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    assert shutil.which("openssl"), "openssl is needed to make the test certificate"
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


SDK_OVER_TLS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    from durabletask import client
    import conftest, orchestrations as o
    address = sys.argv[1]
    worker = conftest.worker.TaskHubGrpcWorker(host_address=address, secure_channel=True)
    worker.add_orchestrator(o.py_chain)
    worker.add_activity(o.py_hello)
    worker.start()
    hub = client.TaskHubGrpcClient(host_address=address, secure_channel=True)
    instance_id = hub.schedule_new_orchestration(o.py_chain, input=["TLS"])
    state = hub.wait_for_orchestration_completion(instance_id, timeout=30)
    print(json.dumps({"instance_id": instance_id, "status": state.runtime_status.name,
                      "output": json.loads(state.serialized_output)}))
    hub.close()
    worker.stop()
""")


def test_the_sdk_connects_over_tls(private_keel, tmp_path):
    cert, key = self_signed(tmp_path)
    server = private_keel(tls=(cert, key))
    assert server.http.startswith("https://")
    port = server.address.rsplit(":", 1)[1]
    env = dict(os.environ, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(cert), PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-c", SDK_OVER_TLS, f"localhost:{port}", str(HERE)],
                         env=env, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"] == "COMPLETED" and result["output"] == ["Hello TLS!"]

    # The HTTP API over HTTPS, checked against the same certificate.
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://localhost:{server.http.rsplit(':', 1)[1]}/runtime/webhooks/durabletask/instances/" \
          f"{result['instance_id']}"
    with urllib.request.urlopen(url, context=context) as response:
        assert json.loads(response.read())["runtimeStatus"] == "Completed"
    # Plain HTTP is not served on the TLS port.
    with pytest.raises(Exception):
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=5).read()
