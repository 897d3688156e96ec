"""The `train` flow against a real MLflow server, a real Prefect server and moto's S3 server."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration

JAN = ("2013-01-01", "2013-02-01")


@pytest.fixture
def flow_env(tracking, prefect_server, fresh_settings):
    """Everything the train flow needs: MLflow + Prefect servers and fresh settings."""
    from mlflow import MlflowClient

    return MlflowClient(tracking)


def _versions(client, name):
    return client.search_model_versions(f"name = '{name}'")


def _params_file(tmp_path, estimator, **params):
    path = tmp_path / f"{estimator}.yaml"
    path.write_text(yaml.safe_dump({"name": estimator, "estimator": estimator, "params": params}))
    return str(path)


def test_train_registers_version_with_lineage_and_aliases(flow_env, model_name):
    from flywheel.flows.train import train

    client = flow_env
    result = train(start=JAN[0], end=JAN[1], model_name=model_name)

    assert result["status"] == "registered" and result["promoted"] is True
    mv = client.get_model_version(model_name, result["version"])
    for key in ("data_hash", "params_hash", "code_version", "prefect_flow_run_id", "metric_f1", "gate_passed"):
        assert mv.tags.get(key), f"missing version tag {key}"
    assert mv.tags["data_hash"] == result["data_hash"]
    assert mv.tags["gate_passed"] == "true"
    assert json.loads(mv.tags["gate_reasons"])
    model = client.get_registered_model(model_name)
    assert model.aliases == {"champion": result["version"], "challenger": result["version"]}

    run = client.get_run(mv.run_id)
    assert {"holdout_f1", "holdout_accuracy", "holdout_precision", "holdout_recall", "holdout_roc_auc"} <= set(
        run.data.metrics
    )
    assert run.inputs.dataset_inputs, "the dataset is logged as an MLflow input"
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
    assert "confusion_matrix.png" in artifacts and "reference" in artifacts

    # The registered model scores rows like the ones it was trained on.
    import mlflow.pyfunc

    from flywheel.core.spec import load_spec
    from flywheel.tasks.data import pull_dataset
    from flywheel.tasks.training import feature_frame

    spec = load_spec()
    rows = feature_frame(pull_dataset(spec, *JAN).head(20), spec)
    preds = mlflow.pyfunc.load_model(f"models:/{model_name}@champion").predict(rows)
    assert len(preds) == 20 and set(pd.unique(preds)) <= {0, 1}

    # The gate's verdict is a Prefect markdown artifact of the flow run.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def artifacts_of_gate():
        async with get_client() as pc:
            key = "gate-" + model_name.lower()
            return await pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    import asyncio

    arts = asyncio.run(artifacts_of_gate())
    assert arts and "PASSED" in arts[0].data


def test_second_run_on_unchanged_data_registers_nothing(flow_env, model_name):
    from flywheel.flows.train import train

    first = train(start=JAN[0], end=JAN[1], model_name=model_name)
    second = train(start=JAN[0], end=JAN[1], model_name=model_name)
    assert second["status"] == "unchanged"
    assert second["version"] == first["version"]
    assert len(_versions(flow_env, model_name)) == 1

    # New data (a wider window) is a new version.
    third = train(start=JAN[0], end="2013-02-15", model_name=model_name)
    assert third["status"] == "registered" and third["version"] != first["version"]


def test_worse_model_is_not_promoted(flow_env, model_name, tmp_path):
    from flywheel.flows.train import train

    client = flow_env
    good = train(start=JAN[0], end=JAN[1], model_name=model_name)
    worse = train(
        start=JAN[0],
        end=JAN[1],
        model_name=model_name,
        params_path=_params_file(tmp_path, "logistic_regression", C=0.001, max_iter=200),
    )
    assert worse["status"] == "registered" and worse["promoted"] is False
    assert any("FAILED" in r for r in worse["gate"]["reasons"])
    aliases = client.get_registered_model(model_name).aliases
    assert aliases["champion"] == good["version"]
    assert aliases["challenger"] == worse["version"]
    assert client.get_model_version(model_name, worse["version"]).tags["gate_passed"] == "false"


def test_bad_data_registers_nothing(flow_env, model_name, tmp_path):
    from flywheel.flows.train import train
    from flywheel.tasks.data import load_flights
    from flywheel.tasks.validation import DataValidationError

    bad = load_flights().head(500).drop(columns=["carrier"])
    bad["late"] = 0  # single class as well: both problems must be reported at once
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(DataValidationError) as err:
        train(data_uri=str(path), model_name=model_name)
    assert "carrier" in str(err.value) and "single class" in str(err.value)
    assert _versions(flow_env, model_name) == []


def test_train_from_s3_prefix(flow_env, s3_server, model_name):
    import boto3

    from flywheel.flows.train import train
    from flywheel.tasks.data import DataSourceError, load_flights

    s3 = boto3.client("s3")
    bucket = f"data-{model_name}"
    s3.create_bucket(Bucket=bucket)
    jan = load_flights().query("month == 1")
    for i, part in enumerate((jan.iloc[: len(jan) // 2], jan.iloc[len(jan) // 2 :])):
        s3.put_object(Bucket=bucket, Key=f"flights/part-{i}.parquet", Body=part.to_parquet(index=False))

    result = train(data_uri=f"s3://{bucket}/flights/", model_name=model_name)
    assert result["status"] == "registered" and result["rows"] == len(jan)
    assert flow_env.get_model_version(model_name, result["version"]).tags["data_source"] == f"s3://{bucket}/flights/"

    with pytest.raises(DataSourceError, match="does not exist"):
        train(data_uri="s3://no-such-bucket/flights/", model_name=model_name)
    with pytest.raises(DataSourceError, match="no .csv or .parquet objects"):
        train(data_uri=f"s3://{bucket}/nothing-here/", model_name=model_name)
    assert len(_versions(flow_env, model_name)) == 1


def test_regression_spec_with_random_forest(flow_env, model_name, tmp_path):
    from sklearn.datasets import load_diabetes

    from flywheel.flows.train import train

    frame = load_diabetes(as_frame=True).frame
    data_path = tmp_path / "diabetes.csv"
    frame.to_csv(data_path, index=False)
    spec_path = tmp_path / "diabetes.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "diabetes",
                "source": str(data_path),
                "target": "target",
                "task": "regression",
                "numeric": [c for c in frame.columns if c != "target"],
            }
        )
    )
    result = train(
        spec_path=str(spec_path),
        model_name=model_name,
        params_path=_params_file(tmp_path, "random_forest_regressor", n_estimators=50, min_samples_leaf=3),
    )
    assert result["status"] == "registered"
    assert {"rmse", "mae", "r2"} <= set(result["metrics"]) and result["metrics"]["r2"] > 0.2
    assert result["promoted"] is True
