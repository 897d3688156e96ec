"""What a person sees of a drift check, without a server (a SQLite registry in tmp, Prefect's artifact call
captured): the monitoring experiment opens like the training one (model-training mode, a description, a saved view),
its run and every link carry ids and relative pages, never this machine's host or port; `last_drift` is a sentence
with the verdict's JSON under `last_drift_json`; the drift artifact states its window."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from flywheel.tasks import monitoring, tracking
from flywheel.tasks.drift import DriftResult

LO, HI = pd.Timestamp("2013-07-01", tz="UTC"), pd.Timestamp("2013-08-01", tz="UTC")


def result(drift: bool = True) -> DriftResult:
    return DriftResult(
        dataset_drift=drift, drift_share=0.7 if drift else 0.1, drift_share_threshold=0.55, n_drifted=7 if drift else 1,
        n_columns=10, columns=[], rows_reference=1000, rows_current=1234, rows_reference_used=1000,
        rows_current_used=1234, sampled=False, sample_cap=50_000,
    )  # fmt: skip


@pytest.fixture
def registry_in_tmp(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI at a SQLite file; the monitoring experiment made first with its artifacts in tmp (so
    nothing lands in the working directory), as a bare experiment an older Flywheel left."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    client.create_experiment(monitoring.monitoring_experiment(), artifact_location=str(tmp_path / "artifacts"))
    return client


def test_the_monitoring_experiment_opens_in_model_training_mode_and_its_run_links_relatively(registry_in_tmp, tmp_path):
    html = tmp_path / "drift_report.html"
    html.write_text("<html>Dataset Drift</html>")
    page = monitoring.log_report.fn(result(), str(html), "flights-delay", "3", LO, HI)

    experiment = registry_in_tmp.get_experiment_by_name(monitoring.monitoring_experiment())
    tags = experiment.tags
    assert tags[tracking.TAG_EXPERIMENT_KIND] == tracking.KIND_MODEL_TRAINING
    assert "check-drift" in tags[tracking.TAG_NOTE]
    assert tracking.runs_page(experiment.experiment_id, "flywheel-monitoring") in tags[tracking.TAG_NOTE]
    view = json.loads(tags["mlflow.sharedViewState.flywheel-monitoring"])
    assert "metrics.`drift_share`" in view["selectedColumns"] and "params.`window_start`" in view["selectedColumns"]

    [run] = registry_in_tmp.search_runs([experiment.experiment_id])
    assert page == f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}/artifacts/drift/drift_report.html"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "flows/check_drift.py"
    assert run.data.tags["flywheel.model_version"] == "3"
    assert run.data.params["window_start"] == str(LO) and run.data.params["window_end"] == str(HI)
    assert run.data.metrics["drift_share"] == 0.7 and run.data.metrics["rows"] == 1234
    note = run.data.tags[tracking.TAG_NOTE]
    assert f"[{LO}, {HI})" in note and f"]({page})" in note
    for written in (page, note, tags[tracking.TAG_NOTE]):
        assert "http" not in written and "127.0.0.1" not in written and str(tmp_path) not in written
    assert {a.path for a in registry_in_tmp.list_artifacts(run.info.run_id, "drift")} == {
        "drift/drift_report.html", "drift/summary.json"
    }  # fmt: skip


class TagRecorder:
    def __init__(self):
        self.tags: dict[str, str] = {}

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        self.tags[key] = value


def test_last_drift_is_a_sentence_and_its_json_has_its_own_key():
    from flywheel.tasks.retrain_policy import RetrainDecision

    decision = RetrainDecision(True, ["dataset drift: 7 of 10 columns drifted"], "data drift")
    summary = monitoring.verdict("m", "3", LO, HI, result(), decision, "#/experiments/2/runs/r", None)
    client = TagRecorder()
    monitoring.record_verdict(client, "m", summary)
    sentence = client.tags["last_drift"]
    assert sentence == (
        f"dataset drift over [{LO}, {HI}) on 1,234 rows against champion v3 (drift share 70%); decided by data drift; "
        "retraining scheduled — dataset drift: 7 of 10 columns drifted"
    )
    assert "{" not in sentence and json.loads(client.tags["last_drift_json"]) == summary


def test_a_verdict_too_long_for_a_tag_keeps_valid_json():
    from flywheel.tasks.retrain_policy import RetrainDecision

    decision = RetrainDecision(False, ["x" * 3000, "y" * 3000], "labels")
    summary = monitoring.verdict("m", "3", LO, HI, result(False), decision, "", None)
    summary["labels"] = {"note": "z" * 3000}
    client = TagRecorder()
    monitoring.record_verdict(client, "m", summary)
    kept = json.loads(client.tags["last_drift_json"])
    assert len(client.tags["last_drift_json"]) <= monitoring.TAG_LIMIT
    assert kept["champion"] == "3" and kept["window"] == [str(LO), str(HI)] and kept["retrain"] is False
    assert len(client.tags["last_drift"]) <= monitoring.TAG_LIMIT


@pytest.fixture
def artifacts(monkeypatch):
    import prefect.artifacts

    made: list[dict] = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: made.append(kw))
    return made


def test_the_drift_artifact_states_its_window_and_names_the_report_by_id(artifacts):
    page = "#/experiments/2/runs/abc/artifacts/drift/drift_report.html"
    monitoring.publish_verdict("m", "3", result(), page, ["dataset drift"], (LO, HI), "data drift")
    [made] = artifacts
    md = made["markdown"]
    assert made["key"] == "drift-m"
    assert f"**Window (event time):** [{LO}, {HI}), against champion v3's reference." in md
    assert f"`{page}`" in md and monitoring.monitoring_experiment() in md and "http" not in md
    assert "**Retrain (decided by data drift):** dataset drift" in md


def test_a_check_with_nothing_to_compare_states_its_window_and_says_not_checked(artifacts):
    client = TagRecorder()
    summary = monitoring.no_reference(client, "m", "3", LO, HI, 42)
    assert summary["retrain"] is False
    assert client.tags["last_drift"].startswith(f"not checked over [{LO}, {HI}) on 42 rows against champion v3")
    assert f"[{LO}, {HI}), 42 rows" in artifacts[0]["markdown"]
