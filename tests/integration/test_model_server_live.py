"""The model server on real sockets: a uvicorn server swapping versions under constant traffic, the request log on
moto's S3 server, and an upstream slot backed by MLflow's own scoring server (moved from tests/unit: unit tests start
no server). The registry is a real MLflow one (SQLite in tmp) with two versions of a small flights classifier.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_models import expected, records_json, registry_fixtures, wait_until
from starlette.testclient import TestClient

from flywheel.serving.app import create_app
from flywheel.tasks.request_log import read_request_log

pytestmark = pytest.mark.integration

MODEL = "flights-serving-live-test"
ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def january():
    """A seeded sample of 4,000 January flights (as tests/unit/conftest.py's fixture of the same name)."""
    from flywheel.tasks.data import load_flights

    flights = load_flights()
    jan = flights.loc[flights["month"] == 1]
    return jan.sample(n=4000, random_state=42).sort_index().reset_index(drop=True)


registry, rows = registry_fixtures(MODEL)


def test_swap_under_load_on_a_real_server_has_zero_failures(registry, rows):
    import uvicorn

    from flywheel.stack import processes

    port = processes.free_port()
    app = create_app(MODEL, registry["uri"], admin_token=ADMIN, initial_version="1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="model-server-under-test", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    recs = records_json(rows)
    want = {v: expected(registry, rows, v) for v in ("1", "2")}
    results: list[tuple[int, str, int, list | None]] = []
    stop = threading.Event()

    def hammer(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            i = offset
            while not stop.is_set():
                k = i % len(recs)
                try:
                    r = c.post("/invocations", json={"dataframe_records": [recs[k]]})
                    preds = r.json().get("predictions") if r.status_code == 200 else None
                    results.append((r.status_code, r.headers.get("X-Flywheel-Model-Version", ""), k, preds))
                except httpx.HTTPError as exc:
                    results.append((0, repr(exc), k, None))
                i += 3

    try:
        with httpx.Client(base_url=base, timeout=60, headers=AUTH) as admin:
            wait_until(lambda: _ping(base) == 200, timeout=60)
            clients = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(3)]
            for t in clients:
                t.start()
            wait_until(lambda: len(results) >= 20)
            assert admin.post("/admin/load", json={"version": "2"}).status_code == 200
            smoke = admin.post("/admin/smoke", json={"records": recs[:10], "max_error_rate": 0, "max_p50_ms": 5000})
            assert smoke.json()["ok"], smoke.text
            n_at_swap = len(results)
            assert admin.post("/admin/swap").status_code == 200
            wait_until(lambda: len(results) >= n_at_swap + 30)
            stop.set()
            for t in clients:
                t.join(10)
            metrics = httpx.get(base + "/metrics").text
    finally:
        stop.set()
        server.should_exit = True
        thread.join(15)
    assert not thread.is_alive()
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:5]
    versions = [r[1] for r in results]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    first_v2 = versions.index("2")
    assert all(v == "2" for v in versions[first_v2 + 10 :])  # a few in flight may still finish on v1
    for _, version, k, preds in results:  # each answer is the prediction of the version that says it scored it
        assert preds == [want[version][k]]
    swaps = [
        s.value for f in text_string_to_metric_families(metrics) for s in f.samples if s.name == "flywheel_swaps_total"
    ]
    assert swaps == [1.0]


def _ping(base: str) -> int:
    try:
        return httpx.get(base + "/ping", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_request_log_on_s3_round_trips(s3_server):
    """The request log written to an s3:// prefix (moto's S3 server on loopback) reads back like the local one."""
    import boto3

    from flywheel.serving.request_log import RequestLogWriter

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="serving-log")
    writer = RequestLogWriter("s3://serving-log/prod/", "m/1")
    rows = [{"hour": h, "carrier": "UA", "time_hour": f"2013-07-0{h}T10:00:00Z"} for h in range(1, 4)]
    writer.append(rows, [0, 1, 0], version="3", request_ids=["a", "b", "c"], ts=time.time())
    assert writer.flush() == 3 and writer.write_errors == 0
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="serving-log")["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("prod/m_1/date=") and keys[0].endswith(".parquet")
    frame = read_request_log("s3://serving-log/prod", "m/1")
    assert frame["request_id"].tolist() == ["a", "b", "c"] and frame["prediction"].tolist() == [0, 1, 0]
    assert (frame["model_version"] == "3").all() and "time_hour" in frame.columns
    assert read_request_log("s3://serving-log/prod", "other").empty


# --------------------------------------------------------------------------------------------------- upstream slots
@pytest.fixture
def mlflow_scoring_server(registry):
    """MLflow's own scoring server (what the image of `mlflow models build-docker` runs) for v2, on a real port."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from flywheel.stack import processes

    port = processes.free_port()
    app = scoring_server.init(registry["models"]["2"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mlflow-scoring-server", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _ping(base) == 200, timeout=30)
    yield base, server
    server.should_exit = True
    thread.join(15)


def test_upstream_slot_predicts_in_another_process_behind_the_same_url(registry, rows, mlflow_scoring_server):
    """A version loaded with "upstream" is predicted by the scoring server at that URL; this server keeps parsing,
    checking, logging and switching. When the upstream dies, requests get a 502 JSON error counted as model errors,
    and the in-process version is one rollback away."""
    upstream, upstream_server = mlflow_scoring_server
    app = create_app(MODEL, registry["uri"], admin_token=ADMIN, initial_version="1")
    recs = records_json(rows)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ping").status_code == 200)
        bad = client.post("/admin/load", json={"version": "2", "upstream": "file:///etc/passwd"}, headers=AUTH)
        assert bad.status_code == 400 and "upstream" in bad.json()["message"]
        down = client.post("/admin/load", json={"version": "2", "upstream": "http://127.0.0.1:9"}, headers=AUTH)
        assert down.status_code == 502 and "unreachable" in down.json()["message"]

        loaded = client.post("/admin/load", json={"version": "2", "upstream": upstream}, headers=AUTH)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["loaded"]["upstream"] == upstream and loaded.json()["loaded"]["warmup_error"] is None
        smoke = client.post("/admin/smoke", json={"records": recs[:10], "max_error_rate": 0, "max_p50_ms": 5000},
                            headers=AUTH)  # fmt: skip
        assert smoke.json()["ok"], smoke.text
        assert client.post("/admin/swap", headers=AUTH).status_code == 200

        for body in ({"dataframe_records": recs}, {"dataframe_split": json.loads(rows.to_json(orient="split"))}):
            resp = client.post("/invocations", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"predictions": expected(registry, rows, "2")}
            assert resp.headers["X-Flywheel-Model-Version"] == "2"
        one = client.post("/invocations", json={"dataframe_records": recs[:1]})
        assert one.json() == {"predictions": expected(registry, rows.head(1), "2")}
        missing = client.post("/invocations", json={"dataframe_records": [{"hour": 5}]})
        assert missing.status_code == 400 and missing.json()["error_code"]

        upstream_server.should_exit = True
        wait_until(lambda: _ping(upstream) == 0, timeout=15)
        dead = client.post("/invocations", json={"dataframe_records": recs[:2]})
        assert dead.status_code == 502, dead.text
        assert dead.json()["error_code"] == "UPSTREAM_ERROR" and "v2" in dead.json()["message"]
        active = client.get("/admin/state", headers=AUTH).json()["active"]
        assert active["version"] == "2" and active["errors"] >= 1

        assert client.post("/admin/rollback", headers=AUTH).status_code == 200
        back = client.post("/invocations", json={"dataframe_records": recs})
        assert back.status_code == 200 and back.headers["X-Flywheel-Model-Version"] == "1"
        assert back.json() == {"predictions": expected(registry, rows, "1")}
