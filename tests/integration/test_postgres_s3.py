"""The scale-out configuration for real: MLflow on PostgreSQL with its artifacts in S3 (moto's server), Prefect on
PostgreSQL, and the train flow pulling its data from s3:// — no SQLite and no local artifact store anywhere."""

from __future__ import annotations

import asyncio
import time
import uuid

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

JAN = ("2013-01-01", "2013-02-01")


def read_prefect_flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(uuid.UUID(flow_run_id))

    return asyncio.run(read())


def test_train_flow_on_postgres_and_s3(on_pg_stack, model_name, upload_flights, record_property):
    """(a) MLflow on PostgreSQL + S3 artifacts, data from s3://; (b) the flow runs on a Prefect server on PostgreSQL."""
    import boto3
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from flywheel.core.spec import load_spec
    from flywheel.flows.train import train
    from flywheel.tasks.data import load_flights, window
    from flywheel.tasks.training import feature_frame

    stack = on_pg_stack
    record_property("pg_stack_startup_s", round(stack.startup_s, 1))
    bucket = f"data-{model_name}"
    data_uri = f"s3://{bucket}/flights/2013-jan-feb.parquet"
    upload_flights(stack.s3_endpoint, bucket, "flights/2013-jan-feb.parquet")

    t0 = time.monotonic()
    result = train(data_uri=data_uri, start=JAN[0], end=JAN[1], model_name=model_name)
    record_property("train_flow_s", round(time.monotonic() - t0, 1))
    assert result["status"] == "registered" and result["promoted"] is True
    assert result["rows"] == len(window(load_flights(), "time_hour", *JAN))

    client = MlflowClient(stack.mlflow.url)
    mv = client.get_model_version(model_name, result["version"])
    assert mv.tags["data_source"] == data_uri
    assert client.get_registered_model(model_name).aliases == {
        "champion": result["version"],
        "challenger": result["version"],
    }

    # The registry really lives in PostgreSQL: the version and its aliases are rows of the `mlflow` database.
    rows = stack.postgres.query("mlflow", "SELECT version FROM model_versions WHERE name = %s", (model_name,))
    assert [str(r[0]) for r in rows] == [result["version"]]
    aliases = stack.postgres.query(
        "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias", (model_name,)
    )
    assert [(a, str(v)) for a, v in aliases] == [("challenger", result["version"]), ("champion", result["version"])]

    # The model's files are objects in the S3 bucket behind the server (clients only see the proxy).
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint)
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=stack.prefix + "/")
        for obj in page.get("Contents", [])
    ]
    model_id = mv.model_id or mv.source.removeprefix("models:/")  # MLflow 3: the version's source is its logged model
    model_files = [k for k in keys if f"/models/{model_id}/artifacts/" in k]
    assert any(k.endswith("/MLmodel") for k in model_files), f"no MLmodel of {mv.source} in {keys}"
    assert any(k.endswith(".skops") or k.endswith(".pkl") for k in model_files), model_files
    run_files = [k for k in keys if f"/{mv.run_id}/artifacts/" in k]
    assert any(k.endswith("reference/train_sample.parquet") for k in run_files), run_files

    # The champion loads from the registry (through the server's S3 proxy) and predicts.
    spec = load_spec()
    sample = feature_frame(load_flights().query("month == 1").head(20), spec)
    preds = mlflow.pyfunc.load_model(f"models:/{model_name}@champion").predict(sample)
    assert len(preds) == 20 and set(pd.unique(preds)) <= {0, 1}

    # (b) The flow run was orchestrated by the Prefect server on PostgreSQL and recorded there.
    flow_run_id = mv.tags["prefect_flow_run_id"]
    assert read_prefect_flow_run(flow_run_id).state.is_completed()
    state = stack.postgres.query("prefect", "SELECT state_type FROM flow_run WHERE id = %s", (flow_run_id,))
    assert state == [("COMPLETED",)]
    tasks = stack.postgres.query("prefect", "SELECT name FROM task_run WHERE flow_run_id = %s", (flow_run_id,))
    assert any(name.startswith("pull-dataset") for (name,) in tasks)
    assert any(name.startswith("log-and-register") for (name,) in tasks)
