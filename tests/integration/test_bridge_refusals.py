"""Issue 15, item 3 (the bridge's part) and item 8b on a real bridge process (`python -m flywheel.bridge`) in front
of a real MLflow server and a real Prefect server: signed deliveries naming unknown models, versions that do not
exist or absurd names are refused (422 JSON) and never reach Prefect; a burst of 300 valid deliveries from 32
senders is emitted in full (no 503) over the one shared events connection and stored by Prefect; half-open
connections are closed by the bridge after its header deadline.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flywheel.bridge.secrets import load_or_create_secret
from flywheel.bridge.signing import sign
from flywheel.bridge.webhooks import WEBHOOK_PATH
from flywheel.core.http_server import HEADER_TIMEOUT_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ALIAS_CREATED = "mlflow.model_version_alias.created"


@pytest.fixture(scope="module")
def model(mlflow_server):
    """A registered model with one version in the session's MLflow server."""
    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    name = f"bridge-refusals-{uuid.uuid4().hex[:6]}"
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment("bridge-refusals-it")
    x = np.arange(40, dtype=float).reshape(20, 2)
    with mlflow.start_run():
        mlflow.sklearn.log_model(LogisticRegression().fit(x, (x[:, 0] > 20).astype(int)), name="model",
                                 registered_model_name=name, serialization_format="cloudpickle",
                                 pip_requirements=["scikit-learn"])  # fmt: skip
    return name


@pytest.fixture(scope="module")
def bridge(mlflow_server, prefect_server, tmp_path_factory):
    """The bridge process, checking deliveries against MLflow and emitting to Prefect; yields (url, secret, log)."""
    from flywheel.stack import processes

    state = tmp_path_factory.mktemp("bridge-state")
    port = processes.free_port()
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "PREFECT_API_URL": prefect_server.url + "/api",
           "FLYWHEEL_STATE_DIR": str(state), "FLYWHEEL_WEBHOOK_SECRET": None}  # fmt: skip
    cmd = [sys.executable, "-m", "flywheel.bridge", "--host", "127.0.0.1", "--port", str(port)]
    mp = processes.spawn("bridge", cmd, url=f"http://127.0.0.1:{port}", log_path=state / "bridge.log",
                         health_path="/health", env=env)  # fmt: skip
    processes.healthy_or_stopped(mp, 60)
    try:
        yield mp.url, load_or_create_secret(state), mp.log_path
    finally:
        mp.stop()


def deliver(client: httpx.Client, secret: str, data: dict, action: str = "created") -> tuple[str, httpx.Response]:
    """One delivery signed as MLflow signs it; (its delivery id, the bridge's answer)."""
    body = json.dumps({"entity": "model_version_alias", "action": action,
                       "timestamp": "2026-12-01T00:00:00+00:00", "data": data}).encode()  # fmt: skip
    delivery, ts = str(uuid.uuid4()), str(int(time.time()))
    headers = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts, "Content-Type": "application/json",
               "X-MLflow-Signature": sign(secret, delivery, ts, body)}  # fmt: skip
    return delivery, client.post(WEBHOOK_PATH, content=body, headers=headers)


def event_id(delivery: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mlflow-webhook-delivery:{delivery}"))


def stored_events(api_url: str, ids: list[str]) -> int:
    r = httpx.post(f"{api_url}/events/filter", json={"filter": {"id": {"id": ids}}, "limit": 1}, timeout=30)
    r.raise_for_status()
    return r.json()["total"]


def wait_stored(api_url: str, ids: list[str], timeout: float = 60) -> int:
    """Prefect's event persister writes in batches: wait until all `ids` are stored (the positive sentinel)."""
    deadline = time.monotonic() + timeout
    while True:
        n = stored_events(api_url, ids)
        if n == len(ids) or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


def test_junk_deliveries_are_refused_and_never_reach_prefect(bridge, model, prefect_server):
    url, secret, log_path = bridge
    api_url = prefect_server.url + "/api"
    junk = {
        "unknown model": ({"name": f"no-such-model-{uuid.uuid4().hex[:6]}", "alias": "champion", "version": "1"},
                          "not in the MLflow registry"),
        "version that does not exist": ({"name": model, "alias": "champion", "version": "99"},
                                        f"version 99 of model '{model}' is not in the MLflow registry"),
        "name too long": ({"name": "m" * 5000, "alias": "champion", "version": "1"}, "5000 characters"),
        "control characters": ({"name": model + "\u0007", "alias": "champion", "version": "1"}, "control"),
        "slash in the name": ({"name": "../" + model, "alias": "champion", "version": "1"}, "'/'"),
    }  # fmt: skip
    refused = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for case, (data, hint) in junk.items():
            delivery, r = deliver(client, secret, data)
            assert r.status_code == 422, (case, r.text)
            assert r.json()["status"] == "refused" and hint in r.json()["error"], (case, r.json())
            refused.append(event_id(delivery))
        delivery, r = deliver(client, secret, {"name": f"gone-{uuid.uuid4().hex[:6]}", "alias": "champion"},
                              action="deleted")  # fmt: skip
        assert r.status_code == 422 and "not in the MLflow registry" in r.json()["error"]
        refused.append(event_id(delivery))
        # A valid delivery after them is emitted: once Prefect has stored it, the refused ones would be there too.
        delivery, r = deliver(client, secret, {"name": model, "alias": "champion", "version": "1"})
        assert r.status_code == 200 and r.json()["status"] == "emitted", r.text
    assert wait_stored(api_url, [event_id(delivery)]) == 1
    assert stored_events(api_url, refused) == 0
    assert log_path.read_text().count("refused, not emitted") == len(refused)


def test_a_burst_of_valid_deliveries_is_emitted_in_full(bridge, model, prefect_server):
    url, secret, _ = bridge
    api_url = prefect_server.url + "/api"

    def one(i: int) -> tuple[str, int, str]:
        with httpx.Client(base_url=url, timeout=60) as client:
            delivery, r = deliver(client, secret, {"name": model, "alias": "champion", "version": "1"})
            return delivery, r.status_code, r.text

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(300)))
    statuses = [status for _, status, _ in results]
    assert statuses.count(200) == 300, {s: statuses.count(s) for s in set(statuses)}
    ids = [event_id(d) for d, _, _ in results]
    assert wait_stored(api_url, ids, timeout=120) == 300


def test_half_open_connections_are_closed_by_the_bridge(bridge):
    url, _, _ = bridge
    host, port = url.removeprefix("http://").split(":")
    socks = []
    try:
        for i in range(20):
            s = socket.create_connection((host, int(port)))
            s.settimeout(HEADER_TIMEOUT_SECONDS + 60)
            if i % 2:
                s.sendall(b"POST /webhooks/mlflow HTTP/1.1\r\nHost: b\r\nX-MLflow-")
            socks.append(s)
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # while they are held open
        for s in socks:
            data = b""
            while chunk := s.recv(65536):  # b'' once the bridge closes it (the socket timeout bounds the wait)
                data += chunk
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["status"] == "error"
    finally:
        for s in socks:
            s.close()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
