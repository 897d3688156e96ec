"""The train flow's composition without Prefect: `run_train` over `TrainSteps().bare()` (what the orchestration
benchmark's bare script runs) on a week of the real flights, against a real MLflow registry (SQLite in tmp)."""

from __future__ import annotations

import logging
from dataclasses import fields

from flywheel.flows.train import TrainSteps, run_train
from flywheel.tasks import candidates, gate

WEEK = ("2013-01-01", "2013-01-08")


def test_the_bare_steps_are_the_flow_tasks_own_functions():
    flow_steps, bare = TrainSteps(), TrainSteps().bare()
    for f in fields(TrainSteps):
        if f.name in ("compete", "promote", "hold_lineage"):
            continue
        assert getattr(bare, f.name) is getattr(flow_steps, f.name).fn, f.name
    assert bare.compete is candidates.compete_in_order and flow_steps.compete is candidates.compete
    assert bare.promote is gate.promote_version and flow_steps.promote is gate.promote


def test_the_flows_composition_runs_without_prefect(sqlite_mlflow):
    client = sqlite_mlflow
    logger = logging.getLogger("test.train")
    first = run_train(TrainSteps().bare(), logger, start=WEEK[0], end=WEEK[1], model_name="bare-model")
    again = run_train(TrainSteps().bare(), logger, start=WEEK[0], end=WEEK[1], model_name="bare-model")

    assert first["status"] == "registered" and first["promoted"], first
    assert [c["name"] for c in first["candidates"]] == ["hgb"] and first["window"] == WEEK
    assert again["status"] == "unchanged" and str(again["version"]) == str(first["version"])
    version = client.get_model_version("bare-model", str(first["version"]))
    assert version.tags["gate_passed"] == "true" and version.tags["data_window"] == "2013-01-01..2013-01-08"
    # compiled before the alias moved (the train flow's `compile-model` step), so its deployment reuses the verdict
    assert version.tags["compiled"].startswith("yes"), version.tags.get("compiled")
    assert client.get_model_version_by_alias("bare-model", "champion").version == version.version
