"""Validation: every kind of problem is found, and all of them are reported together."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flywheel.core.spec import DatasetSpec
from flywheel.tasks.validation import DataValidationError, ValidationReport, validate, validate_dataset

N = 250


@pytest.fixture
def good() -> pd.DataFrame:
    """A frame that satisfies `tiny_spec`: 250 rows, 40 % positives, a few nulls."""
    rng = np.random.default_rng(0)
    x2 = rng.normal(size=N)
    x2[:10] = np.nan
    return pd.DataFrame(
        {
            "x1": rng.integers(0, 100, size=N),
            "x2": x2,
            "colour": rng.choice(["red", "green", "blue"], size=N),
            "label": [1, 1, 0, 0, 0] * (N // 5),
            "ts": pd.date_range("2013-01-01", periods=N, freq="h").astype(str),
            "extra": "ignored",
        }
    )


@pytest.fixture
def regression_spec() -> DatasetSpec:
    return DatasetSpec(source="unused.csv", target="price", task="regression", numeric=["area"])


def problems_of(df: pd.DataFrame, spec: DatasetSpec, **kwargs) -> list[str]:
    with pytest.raises(DataValidationError) as err:
        validate_dataset(df, spec, **kwargs)
    return err.value.problems


def only_problem(df: pd.DataFrame, spec: DatasetSpec, **kwargs) -> str:
    problems = problems_of(df, spec, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------------------------------- the good case
def test_valid_frame_gives_a_report(good, tiny_spec):
    report = validate_dataset(good, tiny_spec)
    assert report == ValidationReport(
        rows=N, columns=6, null_share={"x1": 0.0, "x2": 0.04, "colour": 0.0}, positive_share=0.4
    )


def test_validate_task_wrapper(good, tiny_spec):
    assert validate.fn(good, tiny_spec).rows == N


def test_limits_are_inclusive(good, tiny_spec):
    df = good.copy()
    df.loc[: int(N * 0.3) - 1, "x1"] = np.nan  # exactly 30 % null
    assert validate_dataset(df, tiny_spec, min_rows=N, max_null_share=0.3).null_share["x1"] == 0.3


def test_numbers_stored_as_text_are_numbers(good, tiny_spec):
    df = good.assign(x1=good["x1"].astype(str))
    assert validate_dataset(df, tiny_spec).rows == N


def test_positive_class_matches_across_types(good, tiny_spec):
    # A YAML `1` against labels read as text, and against labels read as floats.
    assert validate_dataset(good.assign(label=good["label"].astype(str)), tiny_spec).positive_share == 0.4
    assert validate_dataset(good.assign(label=good["label"].astype(float)), tiny_spec).positive_share == 0.4
    spec = tiny_spec.with_overrides(positive_class="1")
    assert validate_dataset(good, spec).positive_share == 0.4


def test_the_flights_demo_passes(january, flights_spec):
    report = validate_dataset(january, flights_spec)
    assert report.rows == len(january)
    assert 0.1 < report.positive_share < 0.4
    assert all(share < 0.3 for share in report.null_share.values())


# --------------------------------------------------------------------------------------------------- each problem
def test_missing_column(good, tiny_spec):
    problem = only_problem(good.drop(columns=["colour"]), tiny_spec)
    assert problem.startswith("missing columns: ['colour']")


def test_missing_event_time_column(good, tiny_spec):
    assert only_problem(good.drop(columns=["ts"]), tiny_spec).startswith("missing columns: ['ts']")


def test_non_numeric_values_in_a_numeric_column(good, tiny_spec):
    df = good.assign(x1=good["x1"].astype(object))
    df.loc[[3, 7], "x1"] = "n/a"
    problem = only_problem(df, tiny_spec)
    assert "numeric column 'x1'" in problem and "0.8%" in problem and "'n/a'" in problem


def test_too_many_nulls(good, tiny_spec):
    df = good.copy()
    df.loc[: N // 2, "colour"] = None
    problem = only_problem(df, tiny_spec)
    assert problem.startswith("column 'colour' is 50% null (limit 30%)")


def test_null_limit_is_configurable(good, tiny_spec):
    assert "x2" in only_problem(good, tiny_spec, max_null_share=0.01)


def test_too_few_rows(good, tiny_spec):
    assert only_problem(good.head(199), tiny_spec) == "too few rows: 199 < 200"
    assert only_problem(good, tiny_spec, min_rows=N + 1) == f"too few rows: {N} < {N + 1}"


def test_single_class_target(good, tiny_spec):
    problems = problems_of(good.assign(label=0), tiny_spec)
    assert any("single class ['0']" in p for p in problems)
    assert any("positive_class 1 does not occur" in p for p in problems)


def test_positive_class_absent(good, tiny_spec):
    spec = tiny_spec.with_overrides(positive_class="yes")
    problem = only_problem(good, spec)
    assert problem.startswith("positive_class 'yes' does not occur in target 'label'")
    assert "['0', '1']" in problem


def test_more_than_two_classes(good, tiny_spec):
    df = good.assign(label=[0, 1, 2, 1, 0] * (N // 5))
    assert "3 classes" in only_problem(df, tiny_spec)


def test_missing_target_values_are_counted_not_refused(good, tiny_spec):
    # Rows without a label are left out of training (issue 14): counted, not a problem while enough remain.
    df = good.assign(label=good["label"].astype(float))
    df.loc[[0, 5, 9], "label"] = np.nan
    report = validate_dataset(df, tiny_spec)
    assert (report.rows, report.rows_unlabeled, report.rows_labeled) == (N, 3, N - 3)


def test_regression_target_not_numeric(regression_spec):
    df = pd.DataFrame({"area": range(N), "price": ["cheap", "dear"] * (N // 2)})
    problem = only_problem(df, regression_spec)
    assert problem == "regression target 'price' has 100.0% values that are not numbers"


def test_regression_target_constant(regression_spec):
    df = pd.DataFrame({"area": range(N), "price": 3.5})
    assert only_problem(df, regression_spec) == "regression target 'price' is constant: cannot train"


def test_regression_target_passes(regression_spec):
    df = pd.DataFrame({"area": range(N), "price": [a * 2.0 + 1 for a in range(N)]})
    assert validate_dataset(df, regression_spec).positive_share is None


def test_bad_event_time_values(good, tiny_spec):
    df = good.copy()
    df.loc[[1, 2], "ts"] = "yesterday-ish"
    problem = only_problem(df, tiny_spec)
    assert problem == "event_time column 'ts' has 0.8% values that are not timestamps"


def test_event_time_in_several_formats_is_fine(good, tiny_spec):
    df = good.copy()
    df.loc[1, "ts"] = "2013-01-01"
    df.loc[2, "ts"] = "2013-01-01T02:00:00.5Z"
    assert validate_dataset(df, tiny_spec).rows == N


# --------------------------------------------------------------------------------------------------- all at once
def test_every_problem_is_listed_in_one_error(good, tiny_spec):
    df = good.drop(columns=["colour"]).head(50).assign(label=0)
    df["x1"] = df["x1"].astype(object)
    df.loc[0, "x1"] = "abc"
    df.loc[:30, "x2"] = np.nan
    df.loc[4, "ts"] = "not a time"
    with pytest.raises(DataValidationError) as err:
        validate_dataset(df, tiny_spec)
    problems = err.value.problems
    expected = [
        "missing columns: ['colour']",
        "too few rows: 50 < 200",
        "column 'x2' is",
        "numeric column 'x1'",
        "event_time column 'ts'",
        "single class",
        "positive_class 1 does not occur",
    ]
    assert len(problems) == len(expected)
    for fragment, problem in zip(expected, problems, strict=True):
        assert fragment in problem
    message = str(err.value)
    assert message.startswith("data failed validation:")
    assert all(f"  - {p}" in message for p in problems)


def test_validation_error_is_a_value_error():
    err = DataValidationError(["a", "b"])
    assert isinstance(err, ValueError)
    assert err.problems == ["a", "b"]


def test_empty_frame(tiny_spec):
    problems = problems_of(pd.DataFrame(columns=["x1", "x2", "colour", "label", "ts"]), tiny_spec)
    assert "too few rows: 0 < 200" in problems
    assert any("single class" in p for p in problems)
