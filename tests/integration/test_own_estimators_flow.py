"""A factory of the user's own (README's `features.py` next to `params.yaml`) through the real `train` flow, against
real MLflow and Prefect servers: the registered model carries the user's code, loads and predicts in a fresh process
that cannot import that code otherwise, and an edit to the code is a new version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration

# The README's example ("Training on your own data"), as a user would save it next to their params file.
FEATURES = """
import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

def log_amounts(X):
    return np.log1p(X.clip(lower=0))

def churn_model(spec, learning_rate=0.1):
    features = ColumnTransformer([("log", FunctionTransformer(log_amounts), spec.numeric)], remainder="drop")
    return Pipeline([("features", features), ("model", HistGradientBoostingClassifier(learning_rate=learning_rate))])
"""

# Runs in a fresh interpreter, in an empty directory: `features` must come from the model's own code_paths.
LOAD_AND_PREDICT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import mlflow.pyfunc, pandas as pd

    assert importlib.util.find_spec("features") is None, "the user's code is importable without the model"
    model = mlflow.pyfunc.load_model(sys.argv[1])
    print(json.dumps([int(p) for p in model.predict(pd.read_parquet(sys.argv[2]))]))
    """
)


@pytest.fixture
def flow_env(tracking, prefect_server, fresh_settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking)


@pytest.fixture
def user_project(tmp_path):
    """A user's directory: their data, a dataset spec, `features.py` and a params file naming its factory."""
    from sklearn.datasets import load_breast_cancer

    project = tmp_path / "project"
    project.mkdir()
    frame = load_breast_cancer(as_frame=True).frame
    frame.to_csv(project / "cancer.csv", index=False)
    spec = {
        "name": "cancer", "source": str(project / "cancer.csv"), "target": "target", "task": "binary",
        "positive_class": 1, "numeric": [c for c in frame.columns if c != "target"],
    }  # fmt: skip
    (project / "cancer.yaml").write_text(yaml.safe_dump(spec))
    (project / "features.py").write_text(FEATURES)
    (project / "params.yaml").write_text(
        "name: churn-features\nfactory: features:churn_model\nparams: {learning_rate: 0.05}\n"
    )
    return project, frame


def test_factory_model_goes_with_its_code(flow_env, model_name, user_project, tmp_path):
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.models import Model

    from flywheel.core.spec import load_spec
    from flywheel.flows.train import train
    from flywheel.tasks import registry
    from flywheel.tasks.model_specs import load_model_specs
    from flywheel.tasks.training import feature_frame

    client = flow_env
    project, frame = user_project
    run = dict(spec_path=str(project / "cancer.yaml"), params_path=str(project / "params.yaml"), model_name=model_name)
    first = train(**run)

    assert first["status"] == "registered" and first["promoted"] is True
    assert first["metrics"]["f1"] > 0.9
    mv = client.get_model_version(model_name, first["version"])
    assert mv.tags["estimator"] == "features:churn_model"
    spec = load_spec(project / "cancer.yaml")
    specs = load_model_specs(project / "params.yaml", "binary", dataset=spec)
    assert mv.tags["code_version"] == registry.code_version(specs) != registry.code_version()

    uri = f"models:/{model_name}/{first['version']}"
    meta = Model.load(uri)
    assert meta.flavors["sklearn"]["serialization_format"] == "cloudpickle"
    assert meta.flavors["python_function"]["code"] == "code"
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "downloaded")))
    assert (local / "code" / "features.py").read_text() == FEATURES
    assert not any(r.startswith("features") for r in (local / "requirements.txt").read_text().split())

    # A fresh process, in a directory without the user's code and no PYTHONPATH, loads the model and predicts.
    rows = feature_frame(frame.drop(columns="target").head(25), spec)
    rows_path = tmp_path / "rows.parquet"
    rows.to_parquet(rows_path, index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, uri, str(rows_path)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = json.loads(proc.stdout.strip().splitlines()[-1])
    here = mlflow.pyfunc.load_model(uri).predict(rows)
    assert predicted == [int(p) for p in here] and len(predicted) == 25
    assert set(predicted) <= {0, 1} and pd.Series(predicted).eq(frame["target"].head(25)).mean() > 0.8

    # Same data, params and code: nothing new. An edit to the user's code: a new version with a new code version.
    assert train(**run)["status"] == "unchanged"
    features = project / "features.py"
    features.write_text(features.read_text().replace("np.log1p(X.clip(lower=0))", "np.log1p(X.clip(lower=0)) * 2"))
    third = train(**run)
    assert third["status"] == "registered" and third["version"] != first["version"]
    assert client.get_model_version(model_name, third["version"]).tags["code_version"] != mv.tags["code_version"]
