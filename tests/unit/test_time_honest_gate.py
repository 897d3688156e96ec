"""A time-honest gate (issue 16 item 3): for data with an event time the holdout is the most recent period, which
neither the candidate nor an earlier champion trained on; the split is stated; random only without event time."""

from __future__ import annotations

import numpy as np
import pandas as pd

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import training
from flywheel.tasks.evaluation import holdout_note, time_holdout_split
from flywheel.tasks.gate import champion_overlap


def frame(days: int = 90, per_day: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    t = pd.date_range("2013-07-01T05:00Z", periods=days * per_day, freq=pd.Timedelta(hours=24 / per_day))
    return pd.DataFrame({"t": t, "a": rng.normal(size=len(t)), "y": rng.integers(0, 2, len(t))})


def spec(**kw) -> DatasetSpec:
    return DatasetSpec(source="x", target="y", positive_class=1, numeric=["a"], event_time="t", **kw)


def test_the_holdout_is_the_last_calendar_month_and_training_comes_before_it():
    df = frame()
    parts = time_holdout_split(df, spec(drift_window="1 month", time_zone="America/New_York"))
    t = df["t"]
    assert t[parts.X_train.index].max() < t[parts.X_test.index].min()
    assert t[parts.X_test.index].min() >= pd.Timestamp("2013-09-01T04:00Z") > t[parts.X_train.index].max()
    note = holdout_note(parts.X_test)  # the boundary is midnight in New York
    assert note["note"].startswith("time-honest holdout: the last 1 month")
    assert note["start"] == "2013-09-01T04:00:00+00:00"


def test_a_too_short_period_falls_back_to_the_latest_rows_by_time():
    df = frame(days=20)
    parts = time_holdout_split(df, spec(drift_window="1 month"))
    assert len(parts.X_test) == int(np.ceil(0.2 * len(df)))
    assert df["t"][parts.X_train.index].max() < df["t"][parts.X_test.index].min()
    assert "last 20% of rows by event time" in holdout_note(parts.X_test)["note"]


def test_without_an_event_time_the_split_is_random_and_says_so():
    df = frame().drop(columns="t")
    plain = DatasetSpec(source="x", target="y", positive_class=1, numeric=["a"])
    assert time_holdout_split(df, plain) is None
    parts = training.split.fn(df, plain, 42)
    assert "random holdout" in holdout_note(parts.X_test)["note"]


def test_the_split_task_is_time_honest_for_event_time_data():
    df = frame()
    parts = training.split.fn(df, spec(drift_window="1 month"), 42)
    assert df["t"][parts.X_train.index].max() < df["t"][parts.X_test.index].min()


def test_the_gate_says_whether_the_champion_saw_the_holdout():
    hold = {"note": "", "start": "2013-09-01T04:00:00+00:00"}
    assert "neither saw it" in champion_overlap("2013-01-01..2013-03-01", hold, "1")
    assert "favours the champion" in champion_overlap("2013-06-01..2013-10-01", hold, "2")
    assert champion_overlap(None, hold, "1") is None
    assert champion_overlap("2013-01-01..2013-03-01", {"note": "random"}, "1") is None
