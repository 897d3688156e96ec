"""The demo's record, without a server (a SQLite registry in tmp, Prefect's artifact call captured): its MLflow
experiment opens in model-training mode with a description, its run names no path of this machine, and the Prefect
artifact names the run by id and relative page, never this machine's host or port; the table says which champion
served each month."""

from __future__ import annotations

from types import SimpleNamespace

from flywheel.cli.demo import MonthRow, publish
from flywheel.core.settings import Settings
from flywheel.tasks import tracking


def test_the_demo_run_and_artifact_carry_ids_and_relative_pages(tmp_path, monkeypatch):
    import prefect.artifacts
    from mlflow import MlflowClient

    made: list[dict] = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: made.append(kw))
    from mlflow.tracking._tracking_service import utils

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # `publish` sets MLflow's global tracking URI (and the variable): both are put back after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    client = MlflowClient(uri)
    settings = Settings()
    client.create_experiment(f"{settings.experiment_name}-demo", artifact_location=str(tmp_path / "artifacts"))
    loop = SimpleNamespace(name="flights-demo", client=client, urls={"mlflow_url": uri}, s=settings)
    rows = [
        MonthRow("2013-03", 500, 0, 0.41, 0.2, False, False, None, False, "1", 0.45, live_champion="1"),
        MonthRow("2013-04", 500, 0, 0.30, 0.7, True, True, "2", True, "2", 0.44, live_champion="1"),
    ]
    summary = publish(loop, rows, tmp_path / "out")

    experiment = client.get_experiment_by_name(f"{settings.experiment_name}-demo")
    assert experiment.tags[tracking.TAG_EXPERIMENT_KIND] == tracking.KIND_MODEL_TRAINING
    assert "flywheel demo" in experiment.tags[tracking.TAG_NOTE]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.tags[tracking.TAG_SOURCE_NAME] == "flywheel/cli/demo.py"
    [artifact] = made
    page = tracking.run_page(experiment.experiment_id, run.info.run_id, "demo")
    assert f"`{page}`" in artifact["markdown"] and "sqlite" not in artifact["markdown"]
    assert str(tmp_path) not in artifact["markdown"] and "http" not in artifact["markdown"]
    assert "| served by |" in artifact["markdown"] and "| 2013-04 | v1 " in artifact["markdown"]
    assert summary["mlflow_run"].endswith(page)
