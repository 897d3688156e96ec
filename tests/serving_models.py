"""Shared by the model server's tests (tests/unit/test_model_server.py, in-process, and
tests/integration/test_model_server_live.py, on real sockets): a real MLflow registry (SQLite in tmp) with two
versions of a small flights classifier (the `registry` and `rows` fixtures both modules take), and small helpers
(`log_version`: a model with its holdout sample as the next registered version)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

FEATURES = ["hour", "distance", "carrier", "origin"]


def register_two_versions(root: Path, january: pd.DataFrame, model_name: str) -> dict:
    """Two registered versions of a ColumnTransformer(OneHotEncoder) + LogisticRegression pipeline, loaded."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    uri = f"sqlite:///{root}/mlflow.db"
    X, y = january[FEATURES], january["late"]
    with _use_tracking_uri(uri):
        exp = mlflow.create_experiment("serving-test", artifact_location=str(root / "artifacts"))
        for params in ({"C": 1.0}, {"C": 0.01, "class_weight": "balanced"}):
            pre = ColumnTransformer(
                [
                    ("num", StandardScaler(), ["hour", "distance"]),
                    ("cat", OneHotEncoder(handle_unknown="ignore"), ["carrier", "origin"]),
                ]
            )
            model = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=300, **params))]).fit(X, y)
            with mlflow.start_run(experiment_id=exp):
                mlflow.sklearn.log_model(
                    model,
                    name="model",
                    registered_model_name=model_name,
                    signature=infer_signature(X, y),
                    input_example=X.head(3),
                    pip_requirements=["scikit-learn"],
                    serialization_format="cloudpickle",
                )
        models = {v: mlflow.pyfunc.load_model(f"models:/{model_name}/{v}") for v in ("1", "2")}
        return {"uri": uri, "root": root, "models": models}


@contextlib.contextmanager
def sqlite_experiment(root: Path, name: str):
    """`with sqlite_experiment(root, name) as (uri, experiment_id):` an MLflow registry in `root` (SQLite,
    artifacts in `root/artifacts`) as the tracking URI for the block, with a new experiment `name` in it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = f"sqlite:///{root}/mlflow.db"
    with _use_tracking_uri(uri):
        yield uri, mlflow.create_experiment(name, artifact_location=str(root / "artifacts"))


def log_version(root: Path, experiment_id: str, model, example: pd.DataFrame, holdout_sample: pd.DataFrame | None,
                model_name: str, signature=None) -> str:  # fmt: skip
    """Log `model` as the next version of `model_name` in its own run (under the current tracking URI), with
    `holdout_sample` as its run's `reference/holdout_sample.parquet` (as the train flow logs it) unless None; the
    signature is inferred from `example` unless given. Returns the version."""
    import mlflow
    from mlflow.models import infer_signature

    with mlflow.start_run(experiment_id=experiment_id):
        if holdout_sample is not None:
            path = root / "holdout_sample.parquet"
            holdout_sample.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), artifact_path="reference")
        info = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=model_name, input_example=example.head(3),
            signature=signature or infer_signature(example.head(200), model.predict(example.head(200))),
            pip_requirements=["scikit-learn"], serialization_format="cloudpickle",
        )  # fmt: skip
    return str(info.registered_model_version)


def registry_fixtures(model_name: str) -> tuple:
    """A model server test module's `registry` (two registered versions of `model_name`, loaded) and `rows` (40 rows
    as clients send them: the features plus columns the model ignores, such as event time, target and weather)
    fixtures, module-scoped, over the module's `january` fixture: `registry, rows = registry_fixtures(MODEL)`."""

    @pytest.fixture(scope="module")
    def registry(tmp_path_factory, january):
        return register_two_versions(tmp_path_factory.mktemp("model-server"), january, model_name)

    @pytest.fixture(scope="module")
    def rows(january) -> pd.DataFrame:
        return january.sample(n=40, random_state=7).reset_index(drop=True)

    return registry, rows


def expected(registry, frame: pd.DataFrame, version: str = "1") -> list:
    return registry["models"][version].predict(frame).tolist()


def wait_until(cond, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """True as soon as `cond()` is; an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    raise AssertionError(f"{what} not met in time")


def records_json(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records", date_format="iso"))
