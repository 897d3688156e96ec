"""The production configuration without Docker: the same services as processes, on PostgreSQL and S3.

`flywheel up` with MLflow on PostgreSQL (S3 artifacts on moto's server), Prefect on PostgreSQL, and the data in
S3: train → the gate sets `champion` → webhook → bridge → `deploy-model` → the model server answers with the
version. Then the data is where it should be: registry rows and flow runs in PostgreSQL, artifacts in the bucket.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from stacks import running_stack, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "flights-pg-stack"
BIN = Path(sys.executable).parent


def test_stack_on_postgres_and_s3_trains_and_deploys(postgres, s3_server, upload_flights, tmp_path):
    import boto3
    from mlflow import MlflowClient

    postgres.create_databases(("mlflow_stack", "prefect_stack"))
    upload_flights(s3_server, "flywheel-data", "flights/2013-jan.parquet", months=(1,))
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="flywheel-stack-artifacts")
    env = {
        "FLYWHEEL_DEPLOY_WATCH_SECONDS": "2",
        "FLYWHEEL_MLFLOW_BACKEND_STORE_URI": postgres.url("mlflow_stack", "postgresql+psycopg2"),
        "FLYWHEEL_MLFLOW_ARTIFACTS_DESTINATION": "s3://flywheel-stack-artifacts/mlflow",
        "FLYWHEEL_PREFECT_DATABASE_URL": postgres.url("prefect_stack", "postgresql+asyncpg"),
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with running_stack(tmp_path / "state", MODEL, **env) as (_, urls, _):
        cli_env = {**os.environ, "PREFECT_API_URL": urls["prefect_api_url"], "MLFLOW_TRACKING_URI": urls["mlflow_url"]}
        proc = subprocess.run(
            [str(BIN / "flywheel"), "train", "--data", "s3://flywheel-data/flights/2013-jan.parquet"],
            env=cli_env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        client = MlflowClient(urls["mlflow_url"])
        assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
        outcome = wait_for("v1's deployment", lambda: client.get_model_version(MODEL, "1").tags.get("deploy_outcome"),
                           timeout=180)  # fmt: skip
        assert outcome == "serving"
        served = httpx.get(urls["model_url"] + "/version", timeout=10).json()
        assert served["model_version"] == "1"

        # Where the data landed: the registry and the flow runs in PostgreSQL, the artifacts in the bucket.
        rows = postgres.query("mlflow_stack", "SELECT version FROM model_versions WHERE name = %s", (MODEL,))
        assert rows == [(1,)]

        def runs() -> list[tuple]:
            return postgres.query(
                "prefect_stack",
                "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id"
                " WHERE f.name IN ('train', 'deploy-model')",
            )

        # The production deployment finishes its run moments after it serves (artifact, final state).
        wait_for("a completed deploy-model run in PostgreSQL", lambda: ("deploy-model", "COMPLETED") in runs())
        assert ("train", "COMPLETED") in runs()
        keys = [
            o["Key"]
            for page in boto3.client("s3", endpoint_url=s3_server)
            .get_paginator("list_objects_v2")
            .paginate(Bucket="flywheel-stack-artifacts", Prefix="mlflow/")
            for o in page.get("Contents", [])
        ]
        assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("holdout_sample.parquet") for k in keys)
        assert not (tmp_path / "state" / "mlflow.db").exists()  # nothing fell back to SQLite
