"""Versions registered outside Flywheel (issue 14, item 6): a notebook's `mlflow.sklearn.log_model(...,
registered_model_name=...)` carries none of Flywheel's tags or samples, yet it is smoke-tested and deployed from its
own signature, on the first input found: its own holdout sample, else the champion's, else the latest served rows,
else its input example. It is refused only for its own failures, and the ledger says which rows it was tried on.

A real MLflow registry (SQLite in tmp, no server) holds the versions; the smoke test runs on a real model server
app in this process (Starlette's TestClient behind the admin API client the deployment uses).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from starlette.testclient import TestClient

from flywheel.core.settings import get_settings
from flywheel.core.spec import load_spec
from flywheel.tasks import ledger, monitoring, registry, rollout, serving
from flywheel.tasks.verdicts import SMOKE_ROWS

MODEL = "wine-from-a-notebook"
ADMIN = "admin-secret"

BROKEN = """
import mlflow.pyfunc
from mlflow.models import set_model


class Broken(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        raise RuntimeError("this model is broken on purpose")


set_model(Broken())
"""


@pytest.fixture(scope="module")
def wine() -> pd.DataFrame:
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    return data.frame.rename(columns={"target": "cultivar"})


@pytest.fixture(scope="module")
def notebook(tmp_path_factory, wine):
    """v1: a notebook's model (no run, cloudpickle, input example); v2: one with a Flywheel-style holdout sample in
    its run; v3: a pyfunc whose predict raises, with neither holdout sample nor input example."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from sklearn.ensemble import RandomForestClassifier

    root = tmp_path_factory.mktemp("foreign")
    uri = f"sqlite:///{root}/mlflow.db"
    X, y = wine.drop(columns=["cultivar"]), wine["cultivar"]
    model = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
    (root / "broken.py").write_text(BROKEN)
    with _use_tracking_uri(uri):
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("notebook", artifact_location=str(root / "a")))
        mlflow.sklearn.log_model(model, name="model", input_example=X.head(5), registered_model_name=MODEL,
                                 serialization_format="cloudpickle")  # fmt: skip
        with mlflow.start_run():
            holdout = X.tail(30).assign(cultivar=y.tail(30))
            path = root / "holdout_sample.parquet"
            holdout.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), artifact_path="reference")
            mlflow.sklearn.log_model(model, name="model", signature=infer_signature(X, y), registered_model_name=MODEL,
                                     serialization_format="cloudpickle")  # fmt: skip
        mlflow.pyfunc.log_model(name="model", python_model=str(root / "broken.py"), registered_model_name=MODEL)
    yield {"uri": uri, "root": root, "X": X}


@pytest.fixture
def env(notebook, tmp_path, monkeypatch):
    """This test's settings: the notebook registry, a fresh state dir (so no served rows yet), a small drift floor."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", notebook["uri"])
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FLYWHEEL_MODEL_NAME", MODEL)
    monkeypatch.setenv("FLYWHEEL_DRIFT_MIN_ROWS", "20")
    get_settings.cache_clear()
    yield notebook
    get_settings.cache_clear()


@dataclass
class AppTarget(serving.LocalTarget):
    """The deployment's admin API client, talking to an in-process model server app."""

    http: Any = None

    def _call(self, method: str, path: str, **kwargs) -> dict:
        resp = self.http.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)
        if resp.status_code >= 400:
            raise serving.TargetError(f"{method} {path} → {resp.status_code}: {resp.json().get('message')}")
        return resp.json()


@pytest.fixture
def target(env):
    from flywheel.serving.app import create_app

    app = create_app(MODEL, env["uri"], admin_token=ADMIN, request_log_dir=None, batching=False)
    with TestClient(app) as http:
        yield AppTarget(url="http://testserver", admin_token=ADMIN, http=http)


def serve_rows(frame: pd.DataFrame, version: str = "1", ts: float | None = None) -> None:
    """Rows as the production model server records them (the same writer), in this test's state dir."""
    from flywheel.serving.request_log import RequestLogWriter

    writer = RequestLogWriter(get_settings().request_log_dir("production"), MODEL)
    writer.start()
    ids = [f"req-{i}" for i in range(len(frame))]
    writer.append(frame.reset_index(drop=True), [0] * len(frame), version=version, request_ids=ids,
                  ts=ts or time.time())  # fmt: skip
    writer.close()


def smoke(target: AppTarget, version: str, champion: str | None = None) -> serving.SmokeResult:
    target.load(version)
    return rollout.smoke_test.fn(target, MODEL, version, champion)


# --------------------------------------------------------------------------------------------------- registry
def test_a_notebook_version_carries_no_flywheel_artefact_but_its_own_signature_and_example(env):
    client = registry.client()
    v1 = client.get_model_version(MODEL, "1")
    assert not v1.run_id and not registry.is_flywheel_version(v1)  # logged with no run, no lineage tags
    assert registry.find_sample(client, v1) is None  # no holdout sample: not an error
    assert registry.find_sample(client, client.get_model_version(MODEL, "2")) is not None
    inputs = registry.model_inputs(MODEL, "1")
    assert inputs.columns == list(env["X"].columns)
    assert inputs.example.shape == (5, len(env["X"].columns))
    broken = registry.model_inputs(MODEL, "3")
    assert broken.columns is None and broken.example is None


def test_the_first_input_found_wins_and_the_later_ones_are_never_read():
    def never():
        raise AssertionError("read after an earlier source gave rows")

    rows = pd.DataFrame({"x": [1, 2]})
    found = rollout.first_input([("own", lambda: None), ("empty", lambda: rows.head(0)), ("champion", lambda: rows),
                                 ("served", never)])  # fmt: skip
    assert found[0] == "champion" and found[1] is rows and found[2] == ["own", "empty"]
    assert rollout.first_input([("own", lambda: None)]) == ("", None, ["own"])


def test_the_champion_to_borrow_from_is_what_served_until_now(env):
    client = registry.client()
    assert rollout.champion_for_smoke(client, MODEL, "champion", "2", "3") == "2"
    assert rollout.champion_for_smoke(client, MODEL, "champion", "3", "3") is None
    assert rollout.champion_for_smoke(client, MODEL, "champion", None, "3") is None
    registry.set_alias(client, MODEL, "champion", "1")
    try:
        assert rollout.champion_for_smoke(client, MODEL, "challenger", None, "3") == "1"
    finally:
        client.delete_registered_model_alias(MODEL, "champion")


# --------------------------------------------------------------------------------------------------- smoke test
def test_a_notebook_version_is_smoke_tested_on_its_input_example(target):
    result = smoke(target, "1")
    assert result.ok, result.reason
    assert result.rows == 5
    assert result.source == "5 rows of v1's input example (none found: v1's holdout sample, the latest served rows)"
    assert rollout.smoke_note(result).startswith("smoke test passed on 5 rows of v1's input example")


def test_without_a_holdout_sample_of_its_own_it_borrows_the_champions(target):
    result = smoke(target, "1", champion="2")
    assert result.ok, result.reason  # the champion's sample has the target column too: only v1's inputs are sent
    assert result.source == "30 rows of the champion v2's holdout sample (none found: v1's holdout sample)"


def test_a_version_with_its_own_holdout_sample_uses_it(target):
    assert smoke(target, "2", champion="1").source == "30 rows of v2's holdout sample"


def test_served_rows_are_the_inputs_as_sent(env, wine):
    assert rollout.served_rows(MODEL) is None  # nothing served yet
    served = wine.drop(columns=["cultivar"]).assign(event_time="2026-01-01").rename(columns={"hue": "timestamp"})
    serve_rows(served.head(120))  # a clashing input name is logged as input_timestamp: it comes back as sent
    frame = rollout.served_rows(MODEL, rows=50)
    assert len(frame) == 50 and "input_timestamp" not in frame and "timestamp" in frame and "event_time" in frame
    assert not {"prediction", "model_version", "request_id"} & set(frame.columns)
    assert frame["alcohol"].tolist() == served["alcohol"].iloc[70:120].tolist()  # the latest rows


def test_served_rows_come_before_the_input_example(target, wine):
    serve_rows(wine.drop(columns=["cultivar"]).head(120))
    result = smoke(target, "1")
    assert result.ok, result.reason
    assert result.source == f"{SMOKE_ROWS} rows of the latest served rows (none found: v1's holdout sample)"


def test_a_version_whose_predict_raises_is_refused_for_its_predictions(target, wine):
    serve_rows(wine.drop(columns=["cultivar"]).head(40))
    result = smoke(target, "3", champion="1")  # v1 has no holdout sample either: the served rows it is
    assert not result.ok
    assert result.failure_kind() == "predictions that error"
    note = rollout.smoke_note(result)
    assert note.startswith("smoke test failed on 40 rows of the latest served rows (none found: v3's holdout sample, "
                           "the champion v1's holdout sample): predictions that error: ")  # fmt: skip
    assert "this model is broken on purpose" in note


def test_a_wrong_schema_is_refused_as_such(target, january):
    serve_rows(january.head(30))  # the served traffic is another table: v1 cannot read it
    result = smoke(target, "1")
    assert not result.ok and result.failure_kind() == "wrong schema"
    assert "30 rows of the latest served rows" in rollout.smoke_note(result)
    assert "alcohol" in result.reason  # MLflow's schema message names the missing inputs


def test_with_no_input_anywhere_the_smoke_test_is_not_run_and_says_what_it_looked_for(target):
    result = smoke(target, "3")
    assert not result.ok and result.rows == 0
    assert rollout.smoke_note(result) == (
        "smoke test not run: no input to try it on (none found: v3's holdout sample, the latest served rows, "
        "v3's input example)"
    )


def test_latency_alone_is_a_breached_limit():
    slow = serving.SmokeResult(ok=False, rows=10, error_rate=0.0, p50_ms=900.0, reason="p50 latency 900.0 ms > 250 ms")
    assert slow.failure_kind() == "limits breached"
    failures = [{"row": 0, "status": 502, "error": "v3 could not predict: connection reset"}]
    upstream = serving.SmokeResult(ok=False, rows=1, error_rate=1.0, p50_ms=1.0, reason="", failures=failures)
    assert upstream.failure_kind() == "predictions that error"


def test_the_ledger_keeps_the_smoke_note_after_the_switch():
    note = "smoke test passed on 5 rows of v1's input example, p50 3 ms"
    rec = ledger.DeploymentRecord(model_name=MODEL, version="1", alias="champion", target="local", url="u",
                                  trigger="event", reason=note)  # fmt: skip
    target = SimpleNamespace(counters=lambda: (0, 0))
    rollout.watch(rec, target, seconds=0)
    assert rec.outcome == "serving"
    assert rec.reason == note + "; held: 0 scored requests, 0 failed (0.0%); first deployment: nothing to roll back to"


# --------------------------------------------------------------------------------------------------- drift check
def test_the_drift_check_of_a_notebook_champion_compares_what_it_served_before(env, wine, tmp_path):
    client = registry.client()
    registry.set_alias(client, MODEL, "champion", "1")
    try:
        champion, reference = monitoring.champion_reference(client, MODEL)
        assert str(champion.version) == "1" and reference is None  # no training sample: no crash
        spec = load_spec()  # the flights spec: its columns are not this model's
        lo = pd.Timestamp.now(tz="UTC")
        assert monitoring.served_reference(spec, MODEL, champion, lo) is None  # nothing served yet
        serve_rows(wine.drop(columns=["cultivar"]).head(60), version="1", ts=time.time() - 3600)
        serve_rows(wine.drop(columns=["cultivar"]).head(60), version="2", ts=time.time() - 3600)  # not the champion
        reference = monitoring.served_reference(spec, MODEL, champion, lo)
        assert len(reference) == 60 and set(reference["model_version"]) == {"1"}
        current = reference.assign(alcohol=reference["alcohol"] + 3)
        columns = monitoring.monitored_columns(spec, reference, current)
        assert columns == list(wine.columns.drop("cultivar"))  # its own inputs, not the log's or the spec's columns
        result = monitoring.measure_drift(reference, current, spec, tmp_path / "drift.html", labelled=False)
        assert result.n_columns == len(columns) and result.column("alcohol").drifted
    finally:
        client.delete_registered_model_alias(MODEL, "champion")
