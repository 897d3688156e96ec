"""What a person sees of a training in the MLflow UI, without a server (a SQLite registry in tmp): the experiment
opens in the model-training view with a description, the parent run shows the winner's metrics and links its
version, the gate's reasons read as text; and the lineage lock's name."""

from __future__ import annotations

import json

import pytest

from flywheel.tasks import registry, tracking, training_run


@pytest.fixture
def sqlite_client(tmp_path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def test_a_new_experiment_is_a_model_training_experiment_with_a_description(sqlite_client):
    exp_id = tracking.ensure_experiment(sqlite_client, "flywheel")
    tags = sqlite_client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "train" in tags["mlflow.note.content"]
    assert f"(#/experiments/{exp_id}/runs?workflowType=machine_learning&" in tags["mlflow.note.content"]
    view = json.loads(tags["mlflow.sharedViewState.flywheel-training"])
    assert "metrics.`holdout_f1`" in view["selectedColumns"] and "params.`data_window`" in view["selectedColumns"]
    assert tracking.ensure_experiment(sqlite_client, "flywheel") == exp_id
    assert tracking.runs_page(exp_id).endswith("viewStateShareKey=flywheel-training")


def test_an_existing_experiment_gets_the_kind_and_keeps_a_persons_description(sqlite_client, tmp_path):
    bare = sqlite_client.create_experiment("old", artifact_location=str(tmp_path / "a"))
    mine = sqlite_client.create_experiment(
        "mine", artifact_location=str(tmp_path / "b"), tags={"mlflow.note.content": "my words"}
    )
    assert tracking.ensure_experiment(sqlite_client, "old") == bare
    tracking.ensure_experiment(sqlite_client, "mine")
    old_tags, my_tags = sqlite_client.get_experiment(bare).tags, sqlite_client.get_experiment(mine).tags
    assert old_tags["mlflow.experimentKind"] == "custom_model_development" and old_tags["mlflow.note.content"]
    assert my_tags["mlflow.experimentKind"] == "custom_model_development"
    assert my_tags["mlflow.note.content"] == "my words"


def test_runs_carry_a_relative_source_name(sqlite_client):
    exp_id = tracking.ensure_experiment(sqlite_client, "flywheel")
    run_id = tracking.start_run(sqlite_client, exp_id, "r", {"a": 1})
    tags = sqlite_client.get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == "flows/train.py" and tags["a"] == "1"


def test_the_parent_run_summary_shows_the_winners_metrics_and_links_its_version():
    metrics, tags = tracking.parent_summary(
        "flights delay", "3", "hgb", "run-9", {"f1": 0.61234, "roc_auc": 0.7}, "2013-01-01..2013-02-01", 1200, "f1"
    )
    assert metrics == {"holdout_f1": 0.61234, "holdout_roc_auc": 0.7, "rows": 1200.0}
    assert tags["flywheel.registered_version"] == "3" and tags["flywheel.data_window"] == "2013-01-01..2013-02-01"
    assert tags["flywheel.registered_version_page"] == "#/models/flights%20delay/versions/3"
    assert tags["flywheel.registered_model_uri"] == "models:/flights delay/3"
    assert "f1 0.6123" in tags["mlflow.note.content"] and "1200 rows" in tags["mlflow.note.content"]
    assert not any("127.0.0.1" in v or "http" in v for v in tags.values())


def test_the_parent_run_logs_its_closing_metrics_and_tags(sqlite_client):
    exp_id = tracking.ensure_experiment(sqlite_client, "flywheel")

    def opener(experiment, run_name, tags, params):
        run_id = tracking.start_run(sqlite_client, exp_id, run_name, tags)
        tracking.log_run_data(sqlite_client, run_id, params=params)
        return exp_id, run_id

    def closer(run_id, status, tags, metrics):
        tracking.log_run_data(sqlite_client, run_id, tags=tags, metrics=metrics)
        tracking.end_run(sqlite_client, run_id, status)

    with tracking.parent_run("flywheel", "p", {}, {"rows": 5}, opener=opener, closer=closer) as (_, run_id, t, m):
        m["holdout_f1"] = 0.5
        t["flywheel.registered_version"] = "1"
    run = sqlite_client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["holdout_f1"] == 0.5
    assert run.data.tags["flywheel.registered_version"] == "1" and run.data.params["rows"] == "5"


def test_gate_reasons_read_as_text():
    text = registry.reasons_tag(["f1 0.61 needs ≥ 0.02 ok", "roc_auc −2% ok"])
    assert "≥" in text and "−" in text and "\\u" not in text
    assert json.loads(text) == ["f1 0.61 needs ≥ 0.02 ok", "roc_auc −2% ok"]


def test_the_lineage_lock_is_one_per_model_data_candidates_and_code(flights_spec):
    plan = training_run.TrainingPlan("Flights/Delay", flights_spec, [], "f1", "p1", None, None)
    lock = plan.lineage_lock("d1", "c1")
    assert lock.startswith("train-flights-delay-") and lock == plan.lineage_lock("d1", "c1")
    others = {plan.lineage_lock("d2", "c1"), plan.lineage_lock("d1", "c2")}
    other_params = training_run.TrainingPlan("Flights/Delay", flights_spec, [], "f1", "p2", None, None)
    assert lock not in others | {other_params.lineage_lock("d1", "c1")}
