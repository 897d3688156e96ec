"""The `check-drift` flow against real MLflow and Prefect servers, on the real flights data.

The champion (trained on January–February) is the reference through its lineage; served data comes from the
model server's request-log format (Parquet files, written here by the same writer the server uses) or from a
`current_uri`. July drifts and schedules retraining once (the event reaches Prefect); a second check inside the
cooldown schedules nothing; March does not drift; empty or broken data fails clearly and schedules nothing; the
Evidently report is an artifact of a monitoring run in MLflow.

The champion is trained once for the session (`trained_champion` in integration/conftest.py); each test gets its
own registered model whose v1 is that trained model (same run, artifacts and lineage tags), so the verdicts,
cooldowns and events of one test do not reach another.
Absence checks wait for a positive sentinel first: the verdict's own `flywheel.drift.checked` event (check-drift
emits it after any retraining event), or an event this process sends after the check (the same events worker).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

JAN_FEB = ("2013-01-01", "2013-03-01")


@pytest.fixture
def drift_env(tracking, prefect_server, fresh_settings, model_name, tmp_path, champion_copy):
    """`model_name`'s v1 = the session's trained champion (same run and tags), champion; a private state dir."""
    from mlflow import MlflowClient

    fresh_settings.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
    client = MlflowClient(tracking)
    assert champion_copy(client, model_name) == "1"
    return client, prefect_server.url + "/api"


def _month(start: str, end: str):
    from flywheel.core.spec import load_spec
    from flywheel.tasks import data

    spec = load_spec(None)
    return spec, data.pull_dataset(spec, start, end)


def _log_as_served(frame, model_name, log_dir):
    """Rows as the model server records them (inputs incl. the event time, prediction, version, request id)."""
    from flywheel.serving.request_log import RequestLogWriter

    writer = RequestLogWriter(log_dir, model_name)
    writer.start()
    inputs = frame.drop(columns=["late"])
    for start in range(0, len(inputs), 1000):
        part = inputs.iloc[start : start + 1000].reset_index(drop=True)
        writer.append(part, [0] * len(part), version="1", request_ids=f"req-{start}", ts=time.time())
    writer.close()


def _drift_events(api: str, model_name: str) -> list[dict]:
    return _events(api, model_name, "flywheel.drift.detected")


def _events(api: str, model_name: str, name: str) -> list[dict]:
    resp = httpx.post(
        api + "/events/filter",
        json={"filter": {"event": {"name": [name]}, "resource": {"id": [f"flywheel.model.{model_name}"]}}, "limit": 50},
        timeout=30,
    )
    resp.raise_for_status()
    return resp.json()["events"]


def _wait_events(api, model_name, n, name="flywheel.drift.detected", timeout=60):
    """At least `n` events `name` about the model (fails when they do not come)."""
    from stacks import wait_for

    def enough():
        found = _events(api, model_name, name)
        return found if len(found) >= n else None

    return wait_for(f"{n} {name} event(s) for {model_name}", enough, timeout)


def _verdicts_seen(api, model_name, n):
    """The sentinel: the n-th verdict's `flywheel.drift.checked` event has reached Prefect."""
    return _wait_events(api, model_name, n, name="flywheel.drift.checked")


def _after_this_process(api, model_name):
    """The sentinel for a check that failed before its verdict: an event sent now through this process' events
    worker (where any event of the check went before it) has reached Prefect."""
    from prefect.events import emit_event

    from flywheel.core.events import model_resource

    marker = emit_event(event="flywheel.test.sentinel", resource=model_resource(model_name))
    assert marker is not None
    return _wait_events(api, model_name, 1, name="flywheel.test.sentinel")


def test_july_drifts_and_schedules_retraining_once(drift_env, model_name):
    from flywheel.flows.check_drift import check_drift
    from flywheel.tasks.monitoring import serving_log_dir

    client, api = drift_env
    spec, july = _month("2013-07-01", "2013-08-01")
    _log_as_served(july, model_name, serving_log_dir())

    first = check_drift(model_name=model_name, start="2013-07-01", end="2013-08-01")
    assert first["dataset_drift"] and first["drift_share"] >= 0.55 and first["retrain"], first
    assert first["retrain_window"] == ["2013-05-01T00:00:00", "2013-08-01T00:00:00"]  # the spec's 3 months (NY)
    assert first["rows"] == len(july)
    events = _wait_events(api, model_name, 1)
    assert len(events) == 1
    assert events[0]["payload"]["start"] == "2013-05-01T00:00:00" and events[0]["payload"]["model_name"] == model_name

    # The verdict is on the registered model, the Evidently report in a monitoring run linked to the champion.
    verdict = json.loads(client.get_registered_model(model_name).tags["last_drift_json"])
    assert verdict["champion"] == "1" and verdict["retrain"]
    runs = client.search_runs(
        [client.get_experiment_by_name("flywheel-monitoring").experiment_id],
        filter_string=f"tags.`flywheel.model_name` = '{model_name}'",
    )
    assert len(runs) == 1 and runs[0].data.tags["flywheel.model_version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "drift")}
    assert {"drift/drift_report.html", "drift/summary.json"} <= artifacts
    assert runs[0].data.metrics["drift_share"] == pytest.approx(first["drift_share"])

    # A second check inside the cooldown (same event time): drift again, but no second retraining.
    second = check_drift(model_name=model_name, start="2013-07-01", end="2013-08-01")
    assert second["dataset_drift"] and not second["retrain"]
    assert any("cooldown" in r for r in second["reasons"]), second["reasons"]
    _verdicts_seen(api, model_name, 2)
    assert len(_drift_events(api, model_name)) == 1


def test_march_does_not_drift_and_schedules_nothing(drift_env, model_name, tmp_path):
    from flywheel.flows.check_drift import check_drift

    _, api = drift_env
    _, march = _month("2013-03-01", "2013-04-01")
    path = tmp_path / "march.parquet"
    march.to_parquet(path)
    result = check_drift(model_name=model_name, current_uri=str(path))
    assert not result["dataset_drift"] and not result["retrain"]
    _verdicts_seen(api, model_name, 1)
    assert _drift_events(api, model_name) == []


def test_empty_or_broken_current_data_fails_clearly_and_schedules_nothing(drift_env, model_name, tmp_path):
    from flywheel.flows.check_drift import check_drift
    from flywheel.tasks.drift import DriftDataError

    client, api = drift_env
    _, march = _month("2013-03-01", "2013-03-08")
    empty, broken = tmp_path / "empty.parquet", tmp_path / "broken.parquet"
    march.head(0).to_parquet(empty)
    march.drop(columns=["time_hour"]).to_parquet(broken)
    for path, expected in ((empty, "no current data"), (broken, "event_time")):
        with pytest.raises(DriftDataError, match=expected):
            check_drift(model_name=model_name, current_uri=str(path))
    _after_this_process(api, model_name)
    assert _drift_events(api, model_name) == []
    assert _events(api, model_name, "flywheel.drift.checked") == []
    assert "last_drift" not in client.get_registered_model(model_name).tags


def test_late_labels_are_joined_by_request_id_and_quality_is_measured(drift_env, model_name, tmp_path):
    import mlflow

    from flywheel.flows.check_drift import check_drift
    from flywheel.serving.request_log import RequestLogWriter
    from flywheel.tasks.monitoring import serving_log_dir

    client, _ = drift_env
    spec, aug = _month("2013-08-01", "2013-08-15")
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    ids = [f"flight-{i}" for i in range(len(aug))]
    writer = RequestLogWriter(serving_log_dir(), model_name)
    writer.start()
    inputs = aug.drop(columns=["late"]).reset_index(drop=True)
    preds = model.predict(inputs[spec.features].astype({c: "float64" for c in spec.numeric}))
    writer.append(inputs, list(preds), version="1", request_ids=ids, ts=time.time())
    writer.close()
    labels = tmp_path / "labels.parquet"  # the ground truth arrives later, keyed by request id
    aug.assign(request_id=ids)[["request_id", "late"]].iloc[: len(aug) // 2].to_parquet(labels)

    result = check_drift(model_name=model_name, start="2013-08-01", end="2013-08-15", labels_uri=str(labels))
    assert result["quality"] is not None, result
    ref_f1, cur_f1 = result["quality"]["reference"]["f1"], result["quality"]["current"]["f1"]
    assert 0.2 < cur_f1 < 0.9 and 0.2 < ref_f1 < 0.95
    assert result["quality_decay"] is not None

    broken = tmp_path / "labels-broken.parquet"
    aug[["late"]].to_parquet(broken)
    from flywheel.tasks.drift import DriftDataError

    with pytest.raises(DriftDataError, match="request_id"):
        check_drift(model_name=model_name, start="2013-08-01", end="2013-08-15", labels_uri=str(broken))
