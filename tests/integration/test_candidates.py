"""Competing candidates: the `train` flow trains several models in parallel as nested MLflow runs under one parent
run, registers only the best and gates it; with FLYWHEEL_DASK_ADDRESS set they train on a real Dask cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

JAN = ("2013-01-01", "2013-02-01")  # January: 27k flights (HistGradientBoosting stops early above 10k rows)
CANDIDATES_FILE = Path(__file__).resolve().parents[2] / "flywheel" / "params" / "candidates.yaml"


@pytest.fixture
def flow_env(tracking, prefect_server, fresh_settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking)


def _children(client, parent_run_id: str) -> list:
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return sorted(runs, key=lambda r: r.info.run_name)


def test_three_candidates_nested_runs_best_registered_and_gated(flow_env, model_name):
    from flywheel.flows.train import train
    from flywheel.tasks import model_specs, training

    client = flow_env
    result = train(start=JAN[0], end=JAN[1], model_name=model_name, params_path=str(CANDIDATES_FILE))

    assert result["status"] == "registered" and result["selection_metric"] == "f1"
    names = {c["name"] for c in result["candidates"]}
    assert names == {"logreg", "hgb", "rf"} and not any(c["error"] for c in result["candidates"])

    # Only the best candidate is registered; the version's run is the winner's nested run.
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1
    mv = client.get_model_version(model_name, result["version"])
    best_run = client.get_run(mv.run_id)
    parent_id = best_run.data.tags["mlflow.parentRunId"]
    children = _children(client, parent_id)
    assert len(children) == 3
    assert {r.data.tags["flywheel.candidate"] for r in children} == names
    assert all(r.info.status == "FINISHED" for r in children)

    # Every candidate logged its params and holdout metrics; the registered one is the best on F1.
    f1 = {r.data.tags["flywheel.candidate"]: r.data.metrics["holdout_f1"] for r in children}
    assert all(r.data.params["estimator"].startswith("sklearn.") for r in children)
    best_name = max(f1, key=f1.get)
    assert mv.tags["candidate"] == best_name == result["candidates"][0]["name"]
    assert mv.tags["selection_metric"] == "f1"
    assert float(mv.tags["metric_f1"]) == pytest.approx(f1[best_name])
    # The winner's run also holds the model and the samples; the losers hold no model.
    assert "reference" in {a.path for a in client.list_artifacts(mv.run_id)}
    for run in children:
        if run.info.run_id != mv.run_id:
            assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")

    # The parent run: one per flow run, FINISHED, naming the winner.
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["flywheel.best_candidate"] == best_name
    assert parent.data.tags["flywheel.flow_run_id"] == mv.tags["prefect_flow_run_id"]
    assert parent.data.params["selection_metric"] == "f1"

    # Lineage: the params hash covers the whole candidate set; the gate was applied.
    specs = model_specs.load_model_specs(CANDIDATES_FILE, "binary")
    assert mv.tags["params_hash"] == model_specs.candidate_set_hash(specs, "f1") != specs[0].params_hash()
    assert mv.tags["gate_passed"] in {"true", "false"} and result["gate"]["reasons"]
    aliases = client.get_registered_model(model_name).aliases
    assert aliases["challenger"] == result["version"]
    assert ("champion" in aliases) is result["promoted"]

    # In parallel or one by one, the same models (seeded): each candidate trained alone with the plain functions on
    # the same data and split scores what its nested run logged, so the same one wins.
    from flywheel.core.settings import get_settings
    from flywheel.core.spec import load_spec
    from flywheel.tasks import data, evaluation

    spec = load_spec(None)
    split = training.split.fn(data.pull_dataset(spec, *JAN), spec, seed=get_settings().seed)  # the flow's own split
    positive = training.positive_label(split.y_test, spec)
    alone = {
        m.name: evaluation.evaluate_model(
            training.train_model(split, spec, m, get_settings().seed), split.X_test, split.y_test, spec, positive
        )["f1"]
        for m in specs
    }
    assert alone == pytest.approx(f1, abs=1e-9)
    assert max(alone, key=alone.get) == best_name

    # Unchanged data, candidates and code: nothing new is trained or registered.
    again = train(start=JAN[0], end=JAN[1], model_name=model_name, params_path=str(CANDIDATES_FILE))
    assert again["status"] == "unchanged" and again["version"] == result["version"]
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1


@pytest.fixture
def dask_cluster():
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        worker_dashboard_address=None,
    )  # fmt: skip
    try:
        yield cluster
    finally:
        cluster.close()


def test_candidates_fan_out_on_a_dask_cluster(flow_env, fresh_settings, dask_cluster, model_name, tmp_path):
    from flywheel.flows.train import train

    client = flow_env
    fresh_settings.setenv("FLYWHEEL_DASK_ADDRESS", dask_cluster.scheduler_address)
    params = tmp_path / "small.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "candidates": [
                    {"name": "logreg", "estimator": "logistic_regression", "params": {"max_iter": 500}},
                    {"name": "rf", "estimator": "random_forest", "params": {"n_estimators": 20, "max_depth": 8}},
                    {"name": "broken", "estimator": "logistic_regression", "params": {"C": -1.0}},  # fails to fit
                ]
            }
        )
    )
    result = train(start=JAN[0], end=JAN[1], model_name=model_name, params_path=str(params))
    assert result["status"] == "registered"

    # Every candidate ran in a Dask worker process, not in the flow's process.
    workers = set(dask_cluster.scheduler_info["workers"])
    parent_id = client.get_run(client.get_model_version(model_name, result["version"]).run_id).data.tags[
        "mlflow.parentRunId"
    ]
    children = _children(client, parent_id)
    assert [r.data.tags["flywheel.candidate"] for r in children] == ["broken", "logreg", "rf"]
    for run in children:
        tags = run.data.tags
        assert tags["flywheel.worker.dask_worker"] in workers, tags
        assert tags["flywheel.worker.pid"] != str(os.getpid())
    assert client.get_run(parent_id).data.tags["flywheel.task_runner"].startswith("dask:")

    # The candidate that failed to fit is a FAILED nested run and is left out; the others carry on.
    status = {r.data.tags["flywheel.candidate"]: r.info.status for r in children}
    assert status == {"broken": "FAILED", "logreg": "FINISHED", "rf": "FINISHED"}
    by_name = {c["name"]: c for c in result["candidates"]}
    assert "C" in by_name["broken"]["error"] and by_name["broken"]["run_id"] is None
    assert result["candidates"][0]["name"] in {"logreg", "rf"}
    assert all(by_name[n]["worker"].get("dask_worker") in workers for n in ("logreg", "rf"))
