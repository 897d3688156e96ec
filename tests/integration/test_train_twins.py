"""Two identical `flywheel train` runs at once register one version (issue 15 item 5), and what that training shows
in the MLflow UI's data: a model-training experiment, the parent run with the winner's F1 and a link to its version,
gate reasons that read as text. Real MLflow and Prefect servers, two real CLI processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
WEEK = ("2013-01-01", "2013-01-08")


def test_two_identical_trainings_at_once_register_one_version(tracking, prefect_server, model_name, tmp_path):
    from mlflow import MlflowClient

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "PREFECT_API_URL": prefect_server.url + "/api",
        "FLYWHEEL_STATE_DIR": str(tmp_path / "state"),
    }
    cmd = [str(BIN / "flywheel"), "train", "--start", WEEK[0], "--end", WEEK[1], "--model-name", model_name]
    twins = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in "ab"]
    outputs = [p.communicate(timeout=900)[0] for p in twins]
    for proc, out in zip(twins, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]

    client = MlflowClient(tracking)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1, [(v.version, v.tags.get("data_hash")) for v in versions]
    [mv] = versions
    assert sorted("nothing new" in out for out in outputs) == [False, True], outputs
    assert sum(f"registered {model_name} v{mv.version}" in out for out in outputs) == 1

    # The lock that made them one step: a Prefect global concurrency limit of this lineage, free again.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        limits = [lim for lim in prefect.read_global_concurrency_limits(limit=200) if lim.name.startswith("train-")]
    mine = [lim for lim in limits if lim.name.startswith(f"train-{model_name}-")]
    assert len(mine) == 1 and mine[0].limit == 1 and mine[0].active_slots == 0

    # What the MLflow UI shows of it.
    assert "\\u" not in mv.tags["gate_reasons"] and "≥" in mv.tags["gate_reasons"]
    candidate = client.get_run(mv.run_id)
    parent = client.get_run(candidate.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["holdout_f1"] == candidate.data.metrics["holdout_f1"]
    assert parent.data.metrics["rows"] > 0 and parent.data.params["data_window"] == f"{WEEK[0]}..{WEEK[1]}"
    assert parent.data.tags["flywheel.registered_version"] == mv.version
    assert parent.data.tags["flywheel.registered_version_page"] == f"#/models/{model_name}/versions/{mv.version}"
    assert f"v{mv.version}" in parent.data.tags["mlflow.note.content"]
    assert not any(tracking in str(v) or str(tmp_path) in str(v) for v in parent.data.tags.values())
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]
