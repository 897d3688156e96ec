"""The model server against a real MLflow registry (SQLite in tmp) and real models: no mocks.

Two versions of a small flights classifier are registered once per module; apps are driven through Starlette's
TestClient. The tests on real sockets (uvicorn under traffic, S3, an upstream scoring server) are in
tests/integration/test_model_server_live.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_models import expected, records_json, registry_fixtures, wait_until
from starlette.testclient import TestClient

from flywheel.serving.__main__ import _parser
from flywheel.serving.app import create_app
from flywheel.tasks.request_log import read_request_log

MODEL = "flights-serving-test"
ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


# --------------------------------------------------------------------------------------------------- fixtures
registry, rows = registry_fixtures(MODEL)


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    """A TestClient on an app that started with version 1 (admin token set, request log on)."""
    log_dir = tmp_path_factory.mktemp("request-log")
    app = create_app(
        MODEL, registry["uri"], admin_token=ADMIN, scoring_token=None, request_log_dir=log_dir, initial_version="1",
        request_log_flush_seconds=0.2,
    )  # fmt: skip
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ping").status_code == 200)
        yield client, app, log_dir


# --------------------------------------------------------------------------------------------------- scoring
def test_every_input_format_predicts_like_pyfunc(served, registry, rows):
    client, _, _ = served
    want = expected(registry, rows)
    split = json.loads(rows.to_json(orient="split", date_format="iso", index=False))
    recs = records_json(rows)
    cases = {
        "dataframe_split": dict(json={"dataframe_split": split}),
        "dataframe_records": dict(json={"dataframe_records": recs}),
        "instances": dict(json={"instances": recs}),
        "inputs+params": dict(json={"inputs": recs, "params": {"request_id": "req-inputs-1"}}),
        "csv": dict(content=rows.to_csv(index=False), headers={"Content-Type": "text/csv"}),
        "json; charset": dict(
            content=json.dumps({"dataframe_records": recs}), headers={"Content-Type": "application/json; charset=utf-8"}
        ),
    }
    for name, kwargs in cases.items():
        resp = client.post("/invocations", **kwargs)
        assert resp.status_code == 200, (name, resp.text)
        assert resp.json() == {"predictions": want}, name
        assert resp.headers["X-Flywheel-Model-Name"] == MODEL
        assert resp.headers["X-Flywheel-Model-Version"] == "1"
        assert resp.headers["X-Request-Id"]
    resp = client.post("/invocations", json={"inputs": recs, "params": {"request_id": "req-inputs-1"}})
    assert resp.headers["X-Request-Id"] == "req-inputs-1"
    resp = client.post("/invocations", json={"dataframe_records": recs[:1]}, headers={"X-Request-Id": "from-header"})
    assert resp.headers["X-Request-Id"] == "from-header"
    assert resp.json()["predictions"] == want[:1]


def test_single_row_requests_merged_into_one_predict_equal_alone(served, registry, rows):
    """Concurrent one-row requests are predicted as one frame; each answer equals its row alone, and a bad
    request in the batch fails alone."""
    _, app, _ = served
    server = app.server
    slot = server.active
    recs = records_json(rows)
    recs[3]["temp"] = None  # nulls in a column the model ignores split the batch by value class, not the answer
    jobs = [server._json_job(slot, {"dataframe_records": [r]}, rid=f"r{i}") for i, r in enumerate(recs)]
    bad = server._json_job(slot, {"dataframe_records": [{**recs[0], "hour": 1.5, "distance": "far"}]}, rid="bad")
    assert all(j.key is not None for j in jobs)
    outcomes = server._score_group(jobs[:10] + [bad] + jobs[10:])  # a group of mixed keys falls back alone
    got = [json.loads(o.body) for o in outcomes]
    assert outcomes[10].status == 400 and "distance" in got[10]["message"]
    same_key = [j for j in jobs if j.key == jobs[0].key]
    merged = server._score_group(same_key)
    assert [json.loads(o.body)["predictions"][0] for o in merged] == [
        expected(registry, rows.iloc[[int(j.rid[1:])]])[0] for j in same_key
    ]
    assert [g["predictions"][0] for i, g in enumerate(got) if i != 10] == expected(registry, rows)


BAD_REQUESTS = {
    "malformed json": (dict(content=b'{"dataframe_records": [', headers={"Content-Type": "application/json"}), 400),
    "no content type": (dict(content=b'{"dataframe_records": []}'), 415),
    "wrong content type": (dict(content=b"hour=5", headers={"Content-Type": "text/plain"}), 415),
    "latin-1 charset": (dict(content=b"{}", headers={"Content-Type": "application/json; charset=latin-1"}), 415),
    "empty body": (dict(content=b"", headers={"Content-Type": "application/json"}), 400),
    "unknown format key": (dict(json={"rows": [{"hour": 5}]}), 400),
    "two format keys": (dict(json={"dataframe_records": [], "instances": []}), 400),
    "json list": (dict(json=[{"hour": 5}]), 400),
    "records not a list": (dict(json={"dataframe_records": {"hour": 5}}), 400),
    "missing column": (dict(json={"dataframe_records": [{"hour": 5, "distance": 100.0, "carrier": "UA"}]}), 400),
    "wrong-typed column": (
        dict(json={"dataframe_records": [{"hour": "noon", "distance": 100.0, "carrier": "UA", "origin": "JFK"}]}),
        400,
    ),
    "model rejects nulls": (
        dict(json={"dataframe_records": [{"hour": 5, "distance": None, "carrier": "UA", "origin": "JFK"}]}),
        400,
    ),
    "literal NaN (JSON as mlflow serve reads it)": (
        dict(
            content=b'{"dataframe_records": [{"hour": 5, "distance": NaN, "carrier": "UA", "origin": "JFK"}]}',
            headers={"Content-Type": "application/json"},
        ),
        400,
    ),
    "bad csv": (dict(content=b'hour,distance\n"5,\n', headers={"Content-Type": "text/csv"}), 400),
    "split without data": (dict(json={"dataframe_split": {"columns": ["hour"]}}), 400),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_4xx_json_naming_the_problem(served, case):
    client, _, _ = served
    kwargs, status = BAD_REQUESTS[case]
    resp = client.post("/invocations", **kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error_code", "message"} and body["message"]
    assert resp.headers["X-Request-Id"] and resp.headers["X-Flywheel-Model-Version"] == "1"
    hints = {
        "unknown format key": "rows",
        "missing column": "origin",
        "wrong-typed column": "hour",
        "no content type": "Content-Type",
        "empty body": "empty",
        "model rejects nulls": "NaN",
        "literal NaN (JSON as mlflow serve reads it)": "NaN",
    }
    if case.startswith("literal NaN"):  # parsed (the fallback parser), then refused by the model's schema
        assert body["error_code"] != "MALFORMED_REQUEST"
    if case in hints:
        assert hints[case] in body["message"]


def test_body_limit_413_by_content_length_and_by_streamed_size(registry):
    app = create_app(MODEL, registry["uri"], admin_token=None, scoring_token=None, request_log_dir=None,
                     max_body_bytes=2048, initial_version="1")  # fmt: skip
    big = json.dumps({"dataframe_records": [{"hour": 5, "distance": 1.0, "carrier": "UA", "origin": "JFK"}] * 100})
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ping").status_code == 200)
        resp = client.post("/invocations", content=big, headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error_code"] == "REQUEST_TOO_LARGE"

        def chunks():  # no Content-Length: chunked transfer
            for i in range(0, len(big), 500):
                yield big[i : i + 500].encode()

        resp = client.post("/invocations", content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in resp.request.headers
        assert resp.status_code == 413 and resp.json()["error_code"] == "REQUEST_TOO_LARGE"
        small = {"dataframe_records": [{"hour": 5, "distance": 1.0, "carrier": "UA", "origin": "JFK"}]}
        assert client.post("/invocations", json=small).status_code == 200
        # admin disabled without a token
        assert client.post("/admin/load", json={"version": "2"}, headers=AUTH).status_code == 403
        assert client.get("/admin/state", headers=AUTH).status_code == 403


def test_503_until_a_model_is_loaded_and_a_missing_initial_alias_waits_for_a_deployment(registry):
    from mlflow import MlflowClient

    reg = MlflowClient(tracking_uri=registry["uri"])
    app = create_app(MODEL, registry["uri"], admin_token=ADMIN, initial_alias="serving-test-champion",
                     initial_retry_seconds=0.2)  # fmt: skip
    with TestClient(app) as client:
        assert client.get("/ping").status_code == 503
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["active_version"] is None
        resp = client.post("/invocations", json={"dataframe_records": [{"hour": 5}]})
        assert resp.status_code == 503 and resp.json()["error_code"] == "MODEL_NOT_LOADED"
        assert resp.headers["X-Flywheel-Model-Version"] == "none" and resp.headers["X-Request-Id"]
        assert client.post("/admin/swap", headers=AUTH).status_code == 409  # nothing in standby
        # The alias did not exist at start: the initial load got the registry's 404 and gave up (its thread has
        # ended, the error is recorded), so the server cannot pick the alias up by itself later (a first version
        # goes through deploy-model's smoke test); a deployment loads it through the admin API.
        server = app.state.server
        wait_until(lambda: server._initial_thread is not None)
        server._initial_thread.join(30)
        assert not server._initial_thread.is_alive(), "the initial load did not give up on an alias that is missing"
        assert "serving-test-champion" in server.last_load_error["requested"]
        reg.set_registered_model_alias(MODEL, "serving-test-champion", "2")
        try:
            assert client.get("/ping").status_code == 503
            assert client.post("/admin/load", json={"alias": "serving-test-champion"}, headers=AUTH).status_code == 200
            assert client.post("/admin/swap", headers=AUTH).status_code == 200
        finally:
            reg.delete_registered_model_alias(MODEL, "serving-test-champion")
        assert client.get("/ping").json()["version"] == "2"
        assert (
            client.get("/admin/state", headers=AUTH).json()["active"]["uri"] == f"models:/{MODEL}@serving-test-champion"
        )


def test_tokens(registry):
    app = create_app(MODEL, registry["uri"], admin_token=ADMIN, scoring_token="score-me", initial_version="1")
    payload = {"dataframe_records": [{"hour": 5, "distance": 1.0, "carrier": "UA", "origin": "JFK"}]}
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ping").status_code == 200)
        assert client.post("/invocations", json=payload).status_code == 401
        assert client.post("/invocations", json=payload, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert (
            client.post("/invocations", json=payload, headers={"Authorization": "Bearer score-me"}).status_code == 200
        )
        for method, path in (("GET", "/admin/state"), ("POST", "/admin/load"), ("POST", "/admin/swap"),
                             ("POST", "/admin/rollback"), ("POST", "/admin/smoke")):  # fmt: skip
            assert client.request(method, path).status_code == 401, path
            wrong = client.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert wrong.status_code == 403 and wrong.json()["error_code"] == "PERMISSION_DENIED", path
            # the scoring token is not an admin token
            assert client.request(method, path, headers={"Authorization": "Bearer score-me"}).status_code == 403
        assert client.get("/admin/state", headers=AUTH).status_code == 200


# --------------------------------------------------------------------------------------------------- admin
def test_load_smoke_swap_rollback(served, registry, rows):
    client, app, _ = served
    recs = records_json(rows)
    payload = {"dataframe_records": recs}
    assert client.post("/admin/load", json={"version": "99"}, headers=AUTH).status_code == 404
    for bad in ({"version": "../../etc"}, {"version": "1", "alias": "x"}, {}, {"alias": "a b"},
                {"uri": "file:///tmp/evil"}):  # fmt: skip
        resp = client.post("/admin/load", json=bad, headers=AUTH)
        assert resp.status_code == 400, bad
    assert client.post("/admin/rollback", headers=AUTH).status_code == 409  # standby empty

    loaded = client.post("/admin/load", json={"version": "2"}, headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    state = client.get("/admin/state", headers=AUTH).json()
    assert state["active"]["version"] == "1" and state["standby"]["version"] == "2"
    assert state["standby"]["loaded_at"] and state["standby"]["has_served"] is False
    # the standby slot does not serve yet
    resp = client.post("/invocations", json=payload)
    assert resp.headers["X-Flywheel-Model-Version"] == "1" and resp.json()["predictions"] == expected(registry, rows)

    smoke = client.post("/admin/smoke", json={"records": recs, "max_error_rate": 0.0, "max_p50_ms": 2000}, headers=AUTH)
    body = smoke.json()
    assert smoke.status_code == 200 and body["ok"] is True, body
    assert body["version"] == "2" and body["rows"] == len(recs) and body["errors"] == 0 and body["p50_ms"] > 0
    bad_smoke = client.post(
        "/admin/smoke", json={"records": [{"hour": "x"}] + recs[:3], "max_error_rate": 0.0, "max_p50_ms": 2000},
        headers=AUTH,
    ).json()  # fmt: skip
    assert bad_smoke["ok"] is False and bad_smoke["errors"] == 1 and "error rate" in bad_smoke["reason"]
    assert client.post("/admin/rollback", headers=AUTH).status_code == 409  # v2 never served: nothing to roll back to
    assert client.post("/admin/swap", json={"version": "3"}, headers=AUTH).status_code == 409  # not what is standby

    swapped = client.post("/admin/swap", json={"version": "2"}, headers=AUTH)
    assert swapped.status_code == 200 and swapped.json()["active"]["version"] == "2"
    resp = client.post("/invocations", json=payload)
    assert resp.headers["X-Flywheel-Model-Version"] == "2"
    assert resp.json()["predictions"] == expected(registry, rows, "2") != expected(registry, rows, "1")
    state = client.get("/admin/state", headers=AUTH).json()
    assert state["active"]["version"] == "2" and state["standby"]["version"] == "1"
    assert state["counters"]["swaps"] == 1 and state["active"]["requests"] == 1

    back = client.post("/admin/rollback", headers=AUTH)
    assert back.status_code == 200 and back.json()["active"]["version"] == "1"
    resp = client.post("/invocations", json=payload)
    assert resp.headers["X-Flywheel-Model-Version"] == "1" and resp.json()["predictions"] == expected(registry, rows)
    state = client.get("/admin/state", headers=AUTH).json()
    assert state["counters"]["rollbacks"] == 1 and state["standby"]["version"] == "2"
    again = client.post("/admin/load", json={"version": "2"}, headers=AUTH).json()
    assert again["already_loaded"] is True


def test_a_version_prepared_ahead_never_serves_and_its_load_takes_it_at_once(registry, rows):
    """`prepare` loads into a slot that traffic, swap and rollback never reach; the deployment's own load of that
    version then moves it into standby without reading the model again, and the swap checks the version. (These
    versions have no compiled form: with compiling on, a prepared pyfunc slot is loaded again, see below.)"""
    app = create_app(MODEL, registry["uri"], admin_token=ADMIN, initial_version="1", compiled=False)
    payload = {"dataframe_records": records_json(rows.head(3))}
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ping").status_code == 200, what="v1 serving")
        server = app.state.server
        for bad in ({"version": "2", "prepare": True, "upstream": "http://127.0.0.1:9"},
                    {"alias": "champion", "prepare": True}):  # fmt: skip
            resp = client.post("/admin/load", json=bad, headers=AUTH)
            assert resp.status_code == 400 and "prepare" in resp.json()["message"], resp.text
        active = client.post("/admin/load", json={"version": "1", "prepare": True}, headers=AUTH)
        assert active.status_code == 200 and active.json()["preparing"] is False  # it serves: nothing to prepare
        started = client.post("/admin/load", json={"version": "2", "prepare": True}, headers=AUTH)
        assert started.status_code == 202 and started.json()["preparing"] is True, started.text
        wait_until(lambda: client.get("/admin/state", headers=AUTH).json()["prepared"] == "2", what="v2 prepared")
        loads = server.counters["loads"]
        state = client.get("/admin/state", headers=AUTH).json()
        assert state["standby"] is None and state["active"]["version"] == "1"
        assert client.post("/invocations", json=payload).headers["X-Flywheel-Model-Version"] == "1"
        assert client.post("/admin/swap", headers=AUTH).status_code == 409  # prepared is not standby
        assert client.post("/admin/rollback", headers=AUTH).status_code == 409
        loaded = client.post("/admin/load", json={"version": "2"}, headers=AUTH)
        assert loaded.status_code == 200 and loaded.json()["prepared"] is True, loaded.text
        assert server.counters["loads"] == loads  # taken from the prepared slot, not loaded again
        state = client.get("/admin/state", headers=AUTH).json()
        assert state["standby"]["version"] == "2" and state["prepared"] is None
        assert client.post("/admin/swap", json={"version": "1"}, headers=AUTH).status_code == 409  # not the standby
        assert client.post("/admin/swap", json={"version": "2"}, headers=AUTH).status_code == 200
        resp = client.post("/invocations", json=payload)
        assert resp.headers["X-Flywheel-Model-Version"] == "2"
        assert resp.json()["predictions"] == expected(registry, rows.head(3), "2")


def test_a_prepared_version_without_its_compiled_form_is_loaded_again_while_compiling_is_on(registry):
    """Prepared before the deployment's packaging compiled it, the slot would serve pyfunc: the load reads the
    version again (and so gets the compiled form once there is one)."""
    app = create_app(MODEL, registry["uri"], admin_token=ADMIN, initial_version="1")
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ping").status_code == 200, what="v1 serving")
        server = app.state.server
        assert client.post("/admin/load", json={"version": "2", "prepare": True}, headers=AUTH).status_code == 202
        wait_until(lambda: server.prepared is not None, what="v2 prepared")
        loads = server.counters["loads"]
        loaded = client.post("/admin/load", json={"version": "2"}, headers=AUTH).json()
        assert "prepared" not in loaded and server.counters["loads"] == loads + 1 and server.prepared is None
        assert loaded["loaded"]["version"] == "2"


def test_metrics_parse_and_move(served):
    client, _, _ = served

    def sample(name: str, **labels) -> float:
        text = client.get("/metrics").text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    ok = dict(endpoint="/invocations", status="200")
    before, bad_before = (
        sample("flywheel_http_requests_total", **ok),
        sample("flywheel_http_requests_total", endpoint="/invocations", status="415"),
    )
    preds_before = sample("flywheel_predictions_total")
    row = {"hour": 5, "distance": 100.0, "carrier": "UA", "origin": "JFK"}
    for _ in range(3):
        assert client.post("/invocations", json={"dataframe_records": [row, row]}).status_code == 200
    client.post("/invocations", content=b"x", headers={"Content-Type": "text/plain"})
    assert sample("flywheel_http_requests_total", **ok) == before + 3
    assert sample("flywheel_http_requests_total", endpoint="/invocations", status="415") == bad_before + 1
    assert sample("flywheel_predictions_total") == preds_before + 6
    assert sample("flywheel_http_request_duration_seconds_count", endpoint="/invocations") >= before + 4
    assert sample("flywheel_active_model_version") >= 1
    assert sample("flywheel_model_slot", slot="active") == 1
    names = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert {"flywheel_swaps", "flywheel_rollbacks", "flywheel_predictions", "flywheel_scored_rows"} <= names


def test_request_log_written_in_the_background_and_read_back(served, rows):
    client, app, log_dir = served
    recs = records_json(rows.head(5))
    rid = "log-check-1"
    resp = client.post("/invocations", json={"dataframe_records": recs}, headers={"X-Request-Id": rid})
    preds = resp.json()["predictions"]
    for i, rec in enumerate(recs[:3]):  # single rows, merged or not
        client.post("/invocations", json={"dataframe_records": [rec]}, headers={"X-Request-Id": f"log-row-{i}"})
    wanted = {rid, "log-row-0", "log-row-1", "log-row-2"}

    def all_on_disk() -> bool:  # the writer thread may hold a batch it has taken but not yet renamed into place
        logged = read_request_log(log_dir, MODEL)
        return logged is not None and not logged.empty and wanted <= set(logged["request_id"])

    wait_until(all_on_disk)
    files = list(Path(log_dir).rglob("*.parquet"))
    assert files and all(f.parent.name.startswith("date=") for f in files)
    frame = read_request_log(log_dir, MODEL)
    mine = frame.loc[frame["request_id"] == rid].reset_index(drop=True)
    assert len(mine) == 5
    assert mine["prediction"].tolist() == preds
    assert (mine["model_version"] == resp.headers["X-Flywheel-Model-Version"]).all()
    assert mine["carrier"].tolist() == [r["carrier"] for r in recs]
    assert "time_hour" in mine.columns and "late" in mine.columns  # extra columns are kept for the drift check
    assert set(frame["request_id"]) >= {"log-row-0", "log-row-1", "log-row-2"}
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    now = pd.Timestamp.now(tz="UTC")
    assert len(read_request_log(log_dir, MODEL, start=now + pd.Timedelta(minutes=1))) == 0
    assert len(read_request_log(log_dir, MODEL, start=now - pd.Timedelta(hours=1), end=now + pd.Timedelta(hours=1))) \
        == len(frame)  # fmt: skip
    assert read_request_log(log_dir, "no-such-model").empty


def test_request_log_flushed_on_shutdown(registry, tmp_path):
    app = create_app(MODEL, registry["uri"], request_log_dir=tmp_path, initial_version="1",
                     request_log_flush_seconds=3600)  # fmt: skip
    row = {"hour": 5, "distance": 100.0, "carrier": "UA", "origin": "JFK"}
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ping").status_code == 200)
        for i in range(4):
            client.post("/invocations", json={"dataframe_records": [row]}, headers={"X-Request-Id": f"s{i}"})
        assert read_request_log(tmp_path, MODEL).empty
    frame = read_request_log(tmp_path, MODEL)
    assert sorted(frame["request_id"]) == ["s0", "s1", "s2", "s3"]


def test_cli_arguments():
    args = _parser().parse_args(
        ["--model", "m", "--port", "5999", "--initial-alias", "champion", "--role", "staging",
         "--request-log-dir", "/tmp/x", "--tracking-uri", "http://127.0.0.1:5050"]
    )  # fmt: skip
    assert (args.model, args.port, args.initial_alias, args.role) == ("m", 5999, "champion", "staging")
    assert args.host is None and args.request_log_dir == "/tmp/x"
    with pytest.raises(SystemExit):
        _parser().parse_args(["--initial-alias", "a", "--initial-version", "1"])
