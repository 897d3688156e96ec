"""Drift on the real 2013 flights: Jan–Feb as reference against March (weather moves a little) and July (summer).

Evidently is slow, so each comparison runs once per module and the tests read its result. What the data shows
(normed Wasserstein, threshold 0.1 std; Jensen-Shannon 0.1 for categories), Jan–Feb vs:
- March: temp, dewp, humid, wind_speed, pressure, visib drift (all ≥ 1.9× threshold); hour, distance, precip,
  carrier, origin, dest do not (≤ 0.6×) → 6/12 = 0.50, below the 0.55 default: no dataset drift.
- July: the seven weather columns drift (temp 52×, dewp 34×, precip ≥ 1.7×); hour, carrier, origin do not →
  ≥ 7/12, dataset drift. distance (0.08–0.09) and dest (0.11) sit near the threshold, so they are not asserted.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pandas as pd
import pytest

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import drift, training
from flywheel.tasks.drift import DriftDataError, DriftResult, compute_drift, drift_markdown
from flywheel.tasks.retrain_policy import should_retrain

CAP = 15_000  # per side: Jan–Feb has ~50k rows, so the reference is always sampled
WEATHER = ["temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"]
MARCH_DRIFTED = ["temp", "dewp", "humid", "wind_speed", "pressure", "visib"]
MARCH_STEADY = ["hour", "distance", "precip", "carrier", "origin", "dest"]
JULY_STEADY = ["hour", "carrier", "origin"]


@pytest.fixture(scope="module")
def columns(flights_spec: DatasetSpec) -> list[str]:
    return drift.drift_columns(flights_spec)


@pytest.fixture(scope="module")
def jan_feb(flights: pd.DataFrame) -> pd.DataFrame:
    return flights.loc[flights["month"].isin([1, 2])]


@pytest.fixture(scope="module")
def march(flights: pd.DataFrame) -> pd.DataFrame:
    return flights.loc[flights["month"] == 3]


@pytest.fixture(scope="module")
def july(flights: pd.DataFrame) -> pd.DataFrame:
    return flights.loc[flights["month"] == 7]


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory) -> str:
    return tmp_path_factory.mktemp("drift-html")


@pytest.fixture(scope="module")
def march_result(jan_feb, march, columns) -> DriftResult:
    return compute_drift(jan_feb, march, columns, drift_share=drift.DEFAULT_DRIFT_SHARE, sample_cap=CAP, seed=0)


@pytest.fixture(scope="module")
def july_result(jan_feb, july, columns, html_dir) -> DriftResult:
    return compute_drift(
        jan_feb, july, columns, drift_share=drift.DEFAULT_DRIFT_SHARE, sample_cap=CAP, seed=0,
        html_path=html_dir / "nested" / "july.html",
    )  # fmt: skip


@pytest.fixture(scope="module")
def shifted_result(jan_feb, columns) -> DriftResult:
    """Reference = 8,000 Jan–Feb flights; current = the same rows with every distance × 1.5.

    A target is named but no prediction column exists: the check runs without quality metrics and says so.
    """
    ref = jan_feb.sample(n=8_000, random_state=7).reset_index(drop=True)
    cur = ref.copy()
    cur["distance"] = cur["distance"] * 1.5
    return compute_drift(
        ref, cur, columns, drift_share=drift.DEFAULT_DRIFT_SHARE, sample_cap=CAP, target="late", prediction="prediction"
    )


# --------------------------------------------------------------------------------------------------- columns
def test_drift_columns_leave_out_the_calendar(flights_spec, columns):
    assert "month" not in columns and "day_of_week" not in columns
    assert columns == [c for c in flights_spec.features if c not in ("month", "day_of_week")]
    assert set(WEATHER) | {"hour", "distance", "carrier", "origin", "dest"} == set(columns)


# --------------------------------------------------------------------------------------------------- real drift
def test_march_drifts_in_weather_only_and_is_no_dataset_drift(march_result: DriftResult):
    verdicts = march_result.verdicts()
    assert [c for c in MARCH_DRIFTED if not verdicts[c]] == []
    assert [c for c in MARCH_STEADY if verdicts[c]] == []
    assert march_result.n_drifted == 6 and march_result.n_columns == 12
    assert march_result.drift_share == pytest.approx(0.5)
    assert march_result.dataset_drift is False  # 0.50 < 0.55


def test_july_drifts_in_all_weather_columns_and_is_dataset_drift(july_result: DriftResult):
    verdicts = july_result.verdicts()
    assert [c for c in WEATHER if not verdicts[c]] == []
    assert [c for c in JULY_STEADY if verdicts[c]] == []
    assert 7 <= july_result.n_drifted <= 9
    assert july_result.dataset_drift is True
    assert july_result.drifted_columns[0].column == "temp"  # 36 °F → 82 °F: furthest past its threshold
    assert july_result.column("temp").severity > 20


def test_methods_and_both_parse_directions_agree_with_evidentlys_tests(march_result, july_result):
    """Above 1,000 reference rows: Wasserstein (numeric) / Jensen-Shannon (categorical), drift if score >= 0.1."""
    for result in (march_result, july_result):
        assert result.warnings == []  # our direction rule == Evidently's test status; our count == its count
        for c in result.columns:
            assert c.direction == "distance" and c.threshold == pytest.approx(0.1)
            assert c.drifted == (c.score >= c.threshold)
            expected = "Jensen-Shannon" if c.column in ("carrier", "origin", "dest") else "Wasserstein"
            assert expected in c.method


def test_small_reference_switches_to_p_values(jan_feb, july, columns):
    """At ≤ 1,000 reference rows Evidently uses K-S / chi-square p-values: drift if the p-value is below 0.05."""
    ref = jan_feb.sample(n=900, random_state=1)
    cur = july.sample(n=900, random_state=1)
    result = compute_drift(ref, cur, columns, drift_share=0.5, sample_cap=5_000, min_rows=500)
    assert result.sampled is False and result.rows_reference_used == 900
    assert result.warnings == []
    temp = result.column("temp")
    assert temp.direction == "p_value" and "K-S" in temp.method
    assert temp.drifted and temp.score < temp.threshold == pytest.approx(0.05)
    assert result.column("carrier").direction == "p_value"
    for c in result.columns:
        assert c.drifted == (c.score < c.threshold)


def test_a_synthetic_shift_of_one_feature_is_detected_and_named(shifted_result: DriftResult):
    assert [c.column for c in shifted_result.drifted_columns] == ["distance"]
    assert shifted_result.column("distance").score > 0.3
    assert shifted_result.n_drifted == 1 and shifted_result.dataset_drift is False
    assert shifted_result.sampled is False
    assert shifted_result.quality is None and "no quality metrics" in shifted_result.warnings[0]
    assert "| distance |" in drift_markdown(shifted_result, None)


# --------------------------------------------------------------------------------------------------- result
def test_result_records_rows_and_sampling(july_result, jan_feb, july):
    assert july_result.rows_reference == len(jan_feb) and july_result.rows_current == len(july)
    assert july_result.sampled is True and july_result.sample_cap == CAP
    assert july_result.rows_reference_used == CAP and july_result.rows_current_used == CAP
    assert july_result.evidently_version == "0.7.23"


def test_result_is_json_serialisable_and_round_trips(july_result):
    data = json.loads(json.dumps(july_result.as_dict()))
    assert data["dataset_drift"] is True and len(data["columns"]) == 12
    assert set(data["columns"][0]) == {"column", "kind", "method", "score", "threshold", "drifted", "direction"}
    assert DriftResult.from_dict(data) == july_result


def test_html_report_is_written(july_result, html_dir):
    path = html_dir / "nested" / "july.html"
    assert july_result.html_path == str(path)
    text = path.read_text(encoding="utf-8")
    assert len(text) > 100_000 and "<html" in text.lower() and "temp" in text


def test_quality_metrics_when_target_and_prediction_are_given(jan_feb, july, columns, flights_model, flights_spec):
    """With labels, ClassificationPreset adds quality on both sides; decay = relative fall of f1."""
    from sklearn.metrics import f1_score

    ref = jan_feb.sample(n=6_000, random_state=3).reset_index(drop=True)
    cur = july.sample(n=6_000, random_state=3).reset_index(drop=True)
    for frame in (ref, cur):
        frame["prediction"] = flights_model.predict(training.feature_frame(frame, flights_spec))
    result = compute_drift(
        ref, cur, columns, drift_share=0.55, sample_cap=CAP, target="late", prediction="prediction", pos_label=1
    )
    assert result.quality_metric == "f1"
    f1_ref, f1_cur = f1_score(ref["late"], ref["prediction"]), f1_score(cur["late"], cur["prediction"])
    assert result.quality["reference"]["f1"] == pytest.approx(f1_ref)
    assert result.quality["current"]["f1"] == pytest.approx(f1_cur)
    assert {"accuracy", "precision", "recall"} <= set(result.quality["current"])
    assert result.quality_decay == pytest.approx((f1_ref - f1_cur) / f1_ref)
    assert [c.column for c in result.columns] == columns  # labels are not drift-checked
    assert "| f1 |" in drift_markdown(result, None)


# --------------------------------------------------------------------------------------------------- bad data
def test_the_sample_cap_may_not_go_below_5000(jan_feb, march, columns):
    with pytest.raises(ValueError, match="5000"):
        compute_drift(jan_feb, march, columns, drift_share=0.5, sample_cap=4_999)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda df: df.iloc[0:0], "empty"),
        (lambda df: df.drop(columns=["temp", "dest"]), r"lacks drift column\(s\) \['temp', 'dest'\]"),
        (lambda df: df.assign(humid=float("nan")), r"\['humid'\].*all null"),
        (lambda df: df.head(120), "120 rows.*at least 500"),
        (lambda df: df.assign(pressure="n/a"), "non-numeric.*pressure"),
    ],
    ids=["empty", "missing-columns", "all-null", "too-few-rows", "text-in-numeric"],
)
def test_broken_current_data_raises_drift_data_error(jan_feb, march, columns, breakage, message):
    with pytest.raises(DriftDataError, match=message):
        compute_drift(jan_feb, breakage(march.copy()), columns, drift_share=0.5, min_rows=500)


def test_missing_current_data_and_empty_reference_raise(jan_feb, march, columns):
    with pytest.raises(DriftDataError, match="current data is missing"):
        compute_drift(jan_feb, None, columns, drift_share=0.5)
    with pytest.raises(DriftDataError, match="reference data is empty"):
        compute_drift(jan_feb.iloc[0:0], march, columns, drift_share=0.5)
    assert issubclass(DriftDataError, ValueError)


# --------------------------------------------------------------------------------------------------- retrain
NOW = pd.Timestamp("2013-08-01", tz="UTC")


def decide(result, last=None, cooldown_days=30, min_rows=500, in_flight=False):
    return should_retrain(
        result,
        now_event_time=NOW,
        last_retrain_event_time=last,
        cooldown=timedelta(days=cooldown_days),
        min_rows=min_rows,
        in_flight=in_flight,
    )


def test_drift_outside_cooldown_retrains_with_reasons(july_result):
    first = decide(july_result)
    assert first.retrain is True
    assert "dataset drift" in first.reasons[0] and "temp" in first.reasons[0]
    later = decide(july_result, last="2013-06-15T00:00:00+00:00")  # 47 days of event time ago
    assert later.retrain is True and any("outside cooldown" in r for r in later.reasons)


def test_cooldown_is_measured_in_event_time(july_result):
    decision = decide(july_result, last=NOW - pd.Timedelta(days=10))
    assert decision.retrain is False and any("cooldown" in r for r in decision.reasons)
    # A naive last time is taken as UTC; 30 days and 1 hour of event time later the cooldown is over.
    assert decide(july_result, last=pd.Timestamp("2013-07-01 23:00")).retrain is True
    as_days = should_retrain(
        july_result,
        now_event_time=NOW,
        last_retrain_event_time="2013-07-20",
        cooldown=30.0,  # a bare number is days
        min_rows=1,
        in_flight=False,
    )
    assert as_days.retrain is False and "30.0 days" in as_days.reasons[-1]


def test_no_retrain_while_a_training_run_is_in_flight(july_result):
    decision = decide(july_result, in_flight=True)
    assert decision.retrain is False and any("in flight" in r for r in decision.reasons)


def test_no_retrain_without_drift(march_result):
    decision = decide(march_result)
    assert decision.retrain is False and "no dataset drift" in decision.reasons[0]


def test_no_retrain_on_too_few_rows(july_result):
    decision = decide(july_result, min_rows=july_result.rows_current + 1)
    assert decision.retrain is False and any("too few current rows" in r for r in decision.reasons)


def test_quality_decay_alone_retrains(march_result):
    decayed = DriftResult.from_dict(
        march_result.as_dict()
        | {"quality": {"reference": {"f1": 0.5}, "current": {"f1": 0.35}}, "quality_metric": "f1", "quality_decay": 0.3}
    )
    decision = decide(decayed)
    assert decision.retrain is True and "quality decay" in decision.reasons[0]


def test_a_last_retraining_after_now_is_inside_the_cooldown(july_result):
    """A window already acted on (the last retraining lies at or after its end) is in cooldown, never skipped
    (issue 16: the cron right after the demo retrained at once)."""
    decision = decide(july_result, last="2013-12-01")
    assert decision.retrain is False and any("already acted on" in r for r in decision.reasons)


# --------------------------------------------------------------------------------------------------- markdown
def test_markdown_has_verdict_share_sorted_columns_sampling_and_link(july_result, march_result):
    md = drift_markdown(july_result, "http://127.0.0.1:5050/#/experiments/1/runs/abc")
    assert md.startswith("# Data drift: DRIFT DETECTED")
    assert f"**{july_result.n_drifted} of 12 columns drifted**" in md
    assert md.index("| temp |") < md.index("| dewp |") < md.index("| precip |")  # furthest past threshold first
    assert "Sampled to at most 15,000 rows per side" in md
    assert "(http://127.0.0.1:5050/#/experiments/1/runs/abc)" in md
    quiet = drift_markdown(march_result, None)
    assert quiet.startswith("# Data drift: no dataset drift") and "Full Evidently report" not in quiet
    assert "No drift in: hour, distance, precip, carrier, origin, dest." in quiet
