"""Issue 15, items 7, 8a and 3 (the bridge's part), without a server: nesting limited before parsing, ragged rows
refused naming the row in every input shape of the scoring protocol, absurd names and an unreachable registry at
the bridge. A real MLflow registry (SQLite in tmp) and a real model behind Starlette's TestClient."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pandas as pd
import pytest
from starlette.testclient import TestClient

from flywheel.bridge.app import create_bridge_app
from flywheel.bridge.refusals import RegistryCheck, name_problem
from flywheel.bridge.signing import sign
from flywheel.serving.app import create_app
from flywheel.serving.errors import ApiError
from flywheel.serving.parsing import MAX_JSON_DEPTH, check_json_depth, json_depth

MODEL = "request-limits-test"
COLUMNS = ["a", "b", "c", "d"]
ADMIN = "limits-admin"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A served LogisticRegression on four float columns, with an imputer: NaN from a padded row would score."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    root = tmp_path_factory.mktemp("limits")
    uri = f"sqlite:///{root}/mlflow.db"
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(200, 4)), columns=COLUMNS)
    y = (X["a"] > 0).astype(int)
    with _use_tracking_uri(uri):
        exp = mlflow.create_experiment("limits", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            mlflow.sklearn.log_model(
                make_pipeline(SimpleImputer(), LogisticRegression()).fit(X, y), name="model",
                registered_model_name=MODEL, signature=infer_signature(X, y), pip_requirements=["scikit-learn"],
                serialization_format="cloudpickle",
            )  # fmt: skip
    app = create_app(MODEL, uri, admin_token=ADMIN, initial_version="1")
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/ping").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield c


# --------------------------------------------------------------------------------------------------- nesting
def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth(b"[" * 500 + b"]" * 500) == 500
    assert json_depth(b'{"a": "' + b"[" * 500 + b'"}') <= 1  # inside a string
    assert json_depth(b'{"a": "\\"' + b"[" * 500 + b'"}') <= 1  # after an escaped quote, still inside
    # closing brackets in a string do not hide the real nesting after it
    assert json_depth(b'{"k": "' + b"]" * 500 + b'", "v": ' + b"[" * 150 + b"]" * 150 + b"}") == 151
    body = json.dumps({"dataframe_split": {"columns": COLUMNS, "data": [[1, 2, 3, 4]] * 5000}}).encode()
    assert json_depth(body) == 4  # { { [ [


def test_nesting_beyond_the_limit_is_refused_with_the_limit_named():
    with pytest.raises(ApiError) as err:
        check_json_depth(b"[" * 100_000)
    assert err.value.status == 400 and str(MAX_JSON_DEPTH) in err.value.message
    check_json_depth(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)  # at the limit: accepted


@pytest.mark.parametrize("path", ["/invocations", "/admin/swap"])
def test_deeply_nested_bodies_get_a_4xx_json_error_never_500(client, path):
    for body in (b"[" * 100_000, b'{"dataframe_records": ' + b"[" * 3000 + b"]" * 3000 + b"}"):
        resp = client.post(path, content=body, headers={"Content-Type": "application/json",
                                                        "Authorization": f"Bearer {ADMIN}"})  # fmt: skip
        assert resp.status_code == 400, resp.text
        assert resp.json()["error_code"] == "MALFORMED_REQUEST"
        assert f"limit is {MAX_JSON_DEPTH}" in resp.json()["message"]
    assert client.post("/invocations", json={"dataframe_records": [dict.fromkeys(COLUMNS, 0.5)]}).status_code == 200


# --------------------------------------------------------------------------------------------------- ragged rows
ROW = [0.1, 0.2, 0.3, 0.4]
REC = dict(zip(COLUMNS, ROW, strict=True))
RAGGED = {
    "split: a short row": ({"dataframe_split": {"columns": COLUMNS, "data": [ROW, ROW[:3], ROW]}},
                           ["row 1", "3 values", "expected 4"]),
    "split: every row short": ({"dataframe_split": {"columns": COLUMNS, "data": [ROW[:2]]}},
                               ["row 0", "2 values", "expected 4"]),
    "split: a long row": ({"dataframe_split": {"columns": COLUMNS, "data": [ROW, [*ROW, 9]]}},
                          ["row 1", "5 values", "expected 4"]),
    "split: index and data differ": ({"dataframe_split": {"index": [0], "columns": COLUMNS, "data": [ROW, ROW]}},
                                     ["'index' has 1", "2 rows"]),
    "records: a row lacks columns": ({"dataframe_records": [REC, {"a": 0.1}]}, ["row 1", "'b', 'c', 'd'"]),
    "instances: list rows": ({"instances": [ROW, ROW[:1]]}, ["row 1", "1 values", "expected 4"]),
    "inputs: list rows": ({"inputs": [ROW, ROW, [*ROW, 1, 2]]}, ["row 2", "6 values", "expected 4"]),
    "inputs: records": ({"inputs": [REC, {"a": 1.0, "b": 2.0}]}, ["row 1", "'c', 'd'"]),
    "instances: columns of unequal length": (
        {"instances": {"a": [1.0, 2.0], "b": [1.0], "c": [1.0, 2.0], "d": [1.0, 2.0]}},
        ["column 'b'", "1 values", "expected 2"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RAGGED))
def test_ragged_rows_are_refused_naming_the_row(client, case):
    body, hints = RAGGED[case]
    resp = client.post("/invocations", json=body)
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"]
    for hint in hints:
        assert hint in message, message


def test_ragged_csv_row_is_refused_and_well_formed_shapes_still_score(client):
    csv = "a,b,c,d\n0.1,0.2,0.3,0.4\n0.1,0.2\n"
    resp = client.post("/invocations", content=csv, headers={"Content-Type": "text/csv"})
    assert resp.status_code == 400 and "CSV row 1 (line 3) has 2 fields, expected 4" in resp.json()["message"]
    good = [
        {"dataframe_split": {"columns": COLUMNS, "data": [ROW, ROW]}},
        {"dataframe_records": [REC, REC]},
        {"dataframe_records": [REC, {**REC, "extra": 1}]},  # extra fields are ignored, as MLflow does
        {"inputs": [REC, REC]},
        {"inputs": {c: [v, v] for c, v in REC.items()}},
    ]
    for body in good:
        resp = client.post("/invocations", json=body)
        assert resp.status_code == 200, (body, resp.text)
        assert len(resp.json()["predictions"]) == 2
    resp = client.post("/invocations", content="a,b,c,d\n0.1,0.2,0.3,0.4\n\n", headers={"Content-Type": "text/csv"})
    assert resp.status_code == 200, resp.text


# --------------------------------------------------------------------------------------------------- the bridge
SECRET = "limits-secret"


def _signed(data: dict) -> tuple[bytes, dict]:
    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-12-01T00:00:00Z",
                       "data": data}).encode()  # fmt: skip
    delivery, ts = f"d-{time.monotonic_ns()}", str(int(time.time()))
    return body, {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign(SECRET, delivery, ts, body),
        "Content-Type": "application/json",
    }


@pytest.mark.parametrize(
    "data, hint",
    [
        ({"name": "m" * 300, "alias": "champion", "version": "1"}, "300 characters"),
        ({"name": "bad\x00name", "alias": "champion", "version": "1"}, "control characters"),
        ({"name": "a/b", "alias": "champion", "version": "1"}, "'/'"),
        ({"name": "m", "alias": "champ ion", "version": "1"}, "not a valid MLflow alias"),
        ({"name": "m", "alias": "latest", "version": "1"}, "not a valid MLflow alias"),
        ({"name": "m", "alias": "champion", "version": "-3"}, "not a model version number"),
        ({"name": "m", "alias": "champion", "version": "1" * 40}, "not a model version number"),
    ],
)
def test_absurd_names_are_refused_at_the_bridge_and_not_emitted(tmp_path, data, hint):
    emitted = []
    app = create_bridge_app(SECRET, tmp_path, emit=lambda **kw: emitted.append(kw))
    body, headers = _signed(data)
    resp = TestClient(app).post("/webhooks/mlflow", content=body, headers=headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["status"] == "refused" and hint in resp.json()["error"]
    assert emitted == [] and app.state.deliveries.count() == 0
    assert name_problem(str(data["name"]), data["alias"], data["version"]) is not None


def test_bridge_answers_503_when_the_registry_cannot_vouch_and_emits_nothing(tmp_path):
    """MLflow down: 503 (MLflow retries, the reconciler backs it), nothing emitted, nothing remembered or cached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    emitted = []
    registry = RegistryCheck(dead, timeout=1.0)
    app = create_bridge_app(SECRET, tmp_path, emit=lambda **kw: emitted.append(kw), registry=registry)
    client = TestClient(app)
    for _ in range(2):
        body, headers = _signed({"name": "m", "alias": "champion", "version": "1"})
        resp = client.post("/webhooks/mlflow", content=body, headers=headers)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
        assert "unreachable" in resp.json()["error"]
    assert registry.lookups == 2  # failures are not cached
    assert emitted == [] and app.state.deliveries.count() == 0


def test_deeply_nested_webhook_body_is_400_json(tmp_path):
    app = create_bridge_app(SECRET, tmp_path, emit=lambda **kw: None)
    body = b"[" * 60_000
    delivery, ts = "deep-1", str(int(time.time()))
    headers = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": sign(SECRET, delivery, ts, body)}  # fmt: skip
    resp = TestClient(app).post("/webhooks/mlflow", content=body, headers=headers)
    assert resp.status_code == 400 and resp.json()["status"] == "error"
