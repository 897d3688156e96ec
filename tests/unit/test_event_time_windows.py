"""Windows and cooldowns in the data's own event time (issue 16 item 4, issue 15 item 8): clean boundaries,
calendar alignment in the data's time zone, per-model lengths from the spec, and a cooldown 'after now' that
blocks instead of being skipped."""

from __future__ import annotations

import pandas as pd
import pytest

from flywheel.core.settings import Settings
from flywheel.core.spec import DatasetSpec, Period, SpecError, parse_period
from flywheel.tasks import drift_windows as w

NY = "America/New_York"


def spec(**kw) -> DatasetSpec:
    return DatasetSpec(source="x.csv", target="y", task="regression", numeric=["a"], event_time="t", **kw)


def test_periods_parse_as_people_write_them():
    assert parse_period("1 month") == Period(1, "month")
    assert parse_period("30 days") == Period(30, "day") == parse_period(30)
    assert parse_period("2 weeks") == Period(2, "week") and str(parse_period("2 weeks")) == "2 weeks"
    for bad in ("soon", "0 days", "1.5 months", -3):
        with pytest.raises(SpecError):
            parse_period(bad)


def test_a_monthly_window_is_the_calendar_month_in_the_data_time_zone():
    lo, hi = w.latest_window(pd.Timestamp("2013-12-31T23:00Z"), parse_period("1 month"), NY)
    assert (lo, hi) == (pd.Timestamp("2013-12-01T05:00Z"), pd.Timestamp("2014-01-01T05:00Z"))
    # Across the switch to summer time the boundary stays local midnight.
    lo, hi = w.latest_window(pd.Timestamp("2013-03-20T12:00Z"), parse_period("1 month"), NY)
    assert lo == pd.Timestamp("2013-03-01T05:00Z") and hi == pd.Timestamp("2013-04-01T04:00Z")


def test_windows_end_on_clean_boundaries_never_last_event_plus_a_microsecond():
    lo, hi = w.latest_window(pd.Timestamp("2013-12-31T23:00Z"), parse_period("30 days"))
    assert hi == pd.Timestamp("2014-01-01T00:00Z") and lo == pd.Timestamp("2013-12-02T00:00Z")
    assert hi.microsecond == 0 and hi.second == 0
    # An event exactly on a boundary is inside the window that starts there.
    day = w.latest_window(pd.Timestamp("2014-01-01T00:00Z"), parse_period("1 day"))
    assert day[1] == pd.Timestamp("2014-01-02T00:00Z")
    # Weeks start on Monday.
    week = w.latest_window(pd.Timestamp("2013-03-15T10:00Z"), parse_period("1 week"))
    assert week[0] == pd.Timestamp("2013-03-11T00:00Z")


def test_retrain_window_and_cooldown_are_per_model_in_the_spec():
    settings = Settings(drift_window_days=30, retrain_window_days=90, retrain_cooldown_days=30)
    plan = w.monitoring_plan(spec(drift_window="1 month", retrain_window="3 months", retrain_cooldown="2 weeks",
                                  time_zone=NY), settings)  # fmt: skip
    assert (plan.drift_window, plan.retrain_window, plan.cooldown) == (Period(1, "month"), Period(3, "month"),
                                                                       Period(2, "week"))  # fmt: skip
    assert plan.time_zone == NY and "3 months" in plan.describe()
    fallback = w.monitoring_plan(spec(), settings)
    assert fallback.retrain_window == Period(90, "day") and fallback.time_zone == "UTC"
    lo, hi = w.window_before(pd.Timestamp("2013-10-01T04:00Z"), plan.retrain_window, NY)
    assert lo == pd.Timestamp("2013-07-01T04:00Z")


def test_a_bad_window_or_zone_in_the_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="drift_window"):
        spec(drift_window="a while")
    with pytest.raises(ValueError, match="time_zone"):
        spec(time_zone="Mars/Olympus")


def test_a_cooldown_after_now_blocks_and_says_the_window_was_already_acted_on():
    """The cron after the demo: the December check scheduled a retraining at 2014-01-01; the next check of the
    same month must not retrain again."""
    check = w.check_cooldown("2014-01-01T00:00Z", "2014-01-01T00:00Z", parse_period("1 month"))
    assert check.blocked and "already acted on" in check.reason
    assert w.check_cooldown("2013-12-31T23:00Z", "2014-01-01", 30).blocked


def test_cooldown_counts_calendar_months_and_days_in_event_time():
    month = parse_period("1 month")
    assert w.check_cooldown("2013-10-01", "2013-09-01", month).blocked is False
    blocked = w.check_cooldown("2013-09-30", "2013-09-01", month)
    assert blocked.blocked and "next allowed from 2013-10-01" in blocked.reason
    assert not w.check_cooldown("2013-10-01", None, month).blocked
    assert not w.check_cooldown("2013-10-02", "2013-09-01", 30).blocked
