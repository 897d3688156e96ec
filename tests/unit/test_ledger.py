"""The deployment ledger's registry tags, on a real MLflow registry (SQLite in tmp)."""

from __future__ import annotations

from flywheel.tasks import ledger


def test_champion_and_challenger_deployments_of_one_version_keep_separate_tags(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("ledger", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.create_registered_model("ledger-model")
    source = f"runs:/{run.info.run_id}/model"
    version = client.create_model_version("ledger-model", source, run_id=run.info.run_id).version

    def record(alias: str, outcome: str, url: str) -> None:
        ledger.record_in_registry(client, ledger.DeploymentRecord(
            model_name="ledger-model", version=version, alias=alias, target="local", url=url, trigger="event",
            outcome=outcome, reason="" if outcome == "serving" else "smoke test failed",
        ))  # fmt: skip

    record("champion", "failed-smoke", "http://127.0.0.1:5080")
    record("challenger", "serving", "http://127.0.0.1:5081")  # later, and must not hide the production failure
    tags = client.get_model_version("ledger-model", version).tags
    assert tags["deploy_outcome"] == "failed-smoke" and tags["deploy_url"].endswith(":5080")
    assert tags["deploy_reason"] == "smoke test failed"
    assert tags["deploy_challenger_outcome"] == "serving" and tags["deploy_challenger_url"].endswith(":5081")
    assert ledger.tag_prefix("champion") == "deploy_" and ledger.tag_prefix("challenger") == "deploy_challenger_"
