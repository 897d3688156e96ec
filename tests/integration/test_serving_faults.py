"""Issue 15, items 7, 8a and 8b on a real model server process (`python -m flywheel.serving`, uvicorn) serving a
version registered in a real MLflow server: 50 half-open connections (connected and silent, a partial header, a
partial body, a kept-alive connection with half a second request) do not stop a normal client, and the server
itself closes every one of them (a 408 JSON answer, then EOF) after its stated deadlines; a body of 100,000 `[`
and a ragged row get 4xx JSON errors from the real process.
"""

from __future__ import annotations

import json
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flywheel.core.http_server import BODY_TIMEOUT_SECONDS, HEADER_TIMEOUT_SECONDS
from flywheel.serving.parsing import MAX_JSON_DEPTH

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FEATURES = ["x0", "x1", "x2"]


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):
    """The model server process on a free port, serving v1 of a fresh model of the session's MLflow server."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    from flywheel.stack import processes

    name = "serving-faults-it"
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment("serving-faults-it")
    x = pd.DataFrame(np.random.default_rng(1).normal(size=(100, 3)), columns=FEATURES)
    y = (x["x0"] > 0).astype(int)
    with mlflow.start_run():
        mlflow.sklearn.log_model(LogisticRegression().fit(x, y), name="model", registered_model_name=name,
                                 signature=infer_signature(x, y), serialization_format="cloudpickle",
                                 pip_requirements=["scikit-learn"])  # fmt: skip
    port = processes.free_port()
    root = tmp_path_factory.mktemp("serving-faults")
    cmd = [sys.executable, "-m", "flywheel.serving", "--model", name, "--port", str(port),
           "--tracking-uri", mlflow_server.url, "--initial-version", "1"]  # fmt: skip
    mp = processes.spawn("model-server", cmd, url=f"http://127.0.0.1:{port}", log_path=root / "server.log",
                         health_path="/ping", env={"FLYWHEEL_ADMIN_TOKEN": "faults-admin"})  # fmt: skip
    processes.healthy_or_stopped(mp, 120)
    try:
        yield mp
    finally:
        mp.stop()


def _row(v: float = 0.5) -> dict:
    return dict.fromkeys(FEATURES, v)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (recv returns b'': the positive sentinel)."""
    data = b""
    while True:
        chunk = sock.recv(65536)  # the socket's own timeout bounds the wait; it raises if the server never closes
        if chunk == b"":
            return data
        data += chunk


def test_half_open_connections_are_closed_by_the_server_and_do_not_stop_clients(served):
    port = int(served.url.rsplit(":", 1)[1])
    body = json.dumps({"dataframe_records": [_row()]}).encode()
    head = b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    kinds = {
        "silent": b"",
        "partial header": b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Ty",
        "partial body": head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10],
    }
    socks: list[tuple[str, socket.socket]] = []
    try:
        for i in range(48):
            kind = list(kinds)[i % 3]
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(HEADER_TIMEOUT_SECONDS + BODY_TIMEOUT_SECONDS + 60)
            if kinds[kind]:
                s.sendall(kinds[kind])
            socks.append((kind, s))
        for _ in range(2):  # a kept-alive connection: one whole request answered, then half of the next one
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(HEADER_TIMEOUT_SECONDS + BODY_TIMEOUT_SECONDS + 60)
            s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            first = b""
            while b'{"predictions"' not in first or not first.rstrip().endswith(b"]}"):
                first += s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: t\r\n")
            socks.append(("kept-alive, half a request", s))

        # While all 50 are held open, a normal client gets its answers.
        with httpx.Client(base_url=served.url, timeout=30) as client:
            for i in range(20):
                r = client.post("/invocations", json={"dataframe_records": [_row(i / 10)]})
                assert r.status_code == 200, r.text
                assert len(r.json()["predictions"]) == 1

        # Each idle socket is answered 408 (JSON) and then closed by the server, not by us.
        def outcome(item):
            kind, s = item
            return kind, _read_until_closed(s)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(outcome, socks))
    finally:
        for _, s in socks:
            s.close()
    assert len(results) == 50
    for kind, data in results:
        assert data.startswith(b"HTTP/1.1 408"), (kind, data[:200])
        answer = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert answer["error_code"] == "REQUEST_TIMEOUT"
        phase = "body" if kind == "partial body" else "headers"
        assert f"request {phase} not received within" in answer["message"], (kind, answer)
    log = served.log_path.read_text()
    assert "request headers not received within" in log and "request body not received within" in log
    # And the server still answers afterwards.
    assert httpx.post(served.url + "/invocations", json={"dataframe_records": [_row()]}, timeout=30).status_code == 200


def test_deep_nesting_and_ragged_rows_get_4xx_json_from_the_real_server(served):
    with httpx.Client(base_url=served.url, timeout=60) as client:
        r = client.post("/invocations", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error_code"] == "MALFORMED_REQUEST"
        assert f"limit is {MAX_JSON_DEPTH}" in r.json()["message"]
        split = {"columns": FEATURES, "data": [[0.1, 0.2, 0.3], [0.1]]}
        r = client.post("/invocations", json={"dataframe_split": split})
        assert r.status_code == 400
        assert r.json()["message"] == "dataframe_split: row 1 has 1 values, expected 3 (one per column)"
        r = client.post("/invocations", json={"instances": [[0.1, 0.2, 0.3], [0.1, 0.2]]})
        assert r.status_code == 400 and "row 1 has 2 values, expected 3" in r.json()["message"]
        assert client.get("/ping").status_code == 200
        assert client.post("/invocations", json={"dataframe_split": {"columns": FEATURES, "data": [[0.1, 0.2, 0.3]]}
                                                 }).status_code == 200  # fmt: skip
