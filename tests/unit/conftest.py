"""Shared fixtures for the unit tests: the real flights data (loaded once) and a model trained on a slice of it."""

from __future__ import annotations

import pandas as pd
import pytest

from flywheel.core.spec import DatasetSpec, load_spec
from flywheel.tasks import training
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
    return training.train_model(january_split, flights_spec, training.default_model_spec("binary"), SEED)


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
