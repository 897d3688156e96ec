"""Shared fixtures for the unit tests: the real flights data (loaded once) and a model trained on a slice of it,
scikit-learn's diabetes table as a regression dataset, and a SQLite MLflow registry as the tracking URI."""

from __future__ import annotations

import pandas as pd
import pytest

from flywheel.core.spec import DatasetSpec, load_spec
from flywheel.tasks import model_specs, training
from flywheel.tasks.data import load_flights

SEED = 42


@pytest.fixture(scope="session")
def flights() -> pd.DataFrame:
    """All 2013 flights (~2 s to build, so once a session). Tests must not modify it."""
    return load_flights()


@pytest.fixture(scope="session")
def flights_spec() -> DatasetSpec:
    return load_spec()


@pytest.fixture(scope="session")
def january(flights: pd.DataFrame) -> pd.DataFrame:
    """A seeded sample of 4,000 January flights: big enough to learn from, small enough to train in a second."""
    jan = flights.loc[flights["month"] == 1]
    return jan.sample(n=4000, random_state=SEED).sort_index().reset_index(drop=True)


@pytest.fixture(scope="session")
def january_split(january: pd.DataFrame, flights_spec: DatasetSpec) -> training.Split:
    return training.split_dataset(january, flights_spec, seed=SEED)


@pytest.fixture(scope="session")
def flights_model(january_split: training.Split, flights_spec: DatasetSpec):
    """The default binary model (what `flywheel demo` trains), fitted on the January training split."""
    return training.train_model(january_split, flights_spec, model_specs.default_model_spec("binary"), SEED)


@pytest.fixture(scope="module")
def diabetes() -> tuple[pd.DataFrame, DatasetSpec]:
    """scikit-learn's diabetes table (every feature numeric) and its regression spec."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame
    spec = DatasetSpec(
        name="diabetes", source="unused.csv", target="target", task="regression",
        numeric=[c for c in frame.columns if c != "target"],
    )  # fmt: skip
    return frame, spec


@pytest.fixture
def sqlite_mlflow(tmp_path, monkeypatch):
    """A real MLflow registry (SQLite in `tmp_path`) as this process's tracking URI (and MLFLOW_TRACKING_URI) for
    the test, with the `flywheel` experiment's artifacts in `tmp_path` (nothing in the cwd): its MlflowClient."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        client.create_experiment("flywheel", artifact_location=str(tmp_path / "artifacts"))
        yield client
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def tiny_spec() -> DatasetSpec:
    """A small binary spec over hand-made frames."""
    return DatasetSpec(
        name="tiny",
        source="unused.csv",
        target="label",
        task="binary",
        positive_class=1,
        numeric=["x1", "x2"],
        categorical=["colour"],
        event_time="ts",
    )
