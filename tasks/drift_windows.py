"""Windows and cooldowns in the data's own event time: what a drift check reads, what a retraining trains on, and
when the next retraining may come.

Every bound is a clean boundary of the period it names, in the data's time zone (the spec's `time_zone`, UTC when
unset): a `1 month` drift window over flights whose last event is 2013-12-31 23:00 is [2013-12-01, 2014-01-01) in
New York time, never "last event + 1 µs". Windows end at the boundary after the last event, so the window holds
it; a window of `30 days` ends at the midnight after it. The lengths are per model, from its dataset spec, with
the FLYWHEEL_* day settings as the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from flywheel.core.spec import DatasetSpec, Period, parse_period
from flywheel.core.timeutil import utc_timestamp


@dataclass(frozen=True)
class MonitoringPlan:
    """One model's monitoring lengths and zone, from its spec with the settings as fallback."""

    drift_window: Period
    retrain_window: Period
    cooldown: Period
    time_zone: str = "UTC"

    def describe(self) -> str:
        return (
            f"drift window {self.drift_window}, retrain window {self.retrain_window}, cooldown {self.cooldown} "
            f"(event time, {self.time_zone})"
        )


def monitoring_plan(spec: DatasetSpec, settings=None) -> MonitoringPlan:
    """The spec's `drift_window`, `retrain_window`, `retrain_cooldown` and `time_zone`; the settings' day counts
    (FLYWHEEL_DRIFT_WINDOW_DAYS, _RETRAIN_WINDOW_DAYS, _RETRAIN_COOLDOWN_DAYS) where the spec sets none."""
    if settings is None:
        from flywheel.core.settings import get_settings

        settings = get_settings()
    return MonitoringPlan(
        drift_window=parse_period(spec.drift_window or settings.drift_window_days),
        retrain_window=parse_period(spec.retrain_window or settings.retrain_window_days),
        cooldown=parse_period(spec.retrain_cooldown or settings.retrain_cooldown_days),
        time_zone=spec.time_zone or "UTC",
    )


def offset(period: Period) -> pd.DateOffset | pd.Timedelta:
    """The period as something to add to a timestamp: calendar months and years, fixed days, weeks and hours."""
    if period.unit == "month":
        return pd.DateOffset(months=int(period.n))
    if period.unit == "year":
        return pd.DateOffset(years=int(period.n))
    return pd.Timedelta(**{f"{period.unit}s": period.n})


def _local(ts, tz: str) -> pd.Timestamp:
    return utc_timestamp(ts).tz_convert(tz)


def period_start(ts, unit: str, tz: str = "UTC") -> pd.Timestamp:
    """The start of the `unit` (hour, day, week from Monday, month, year) holding `ts`, in `tz`, as UTC."""
    local = _local(ts, tz)
    if unit == "hour":
        return local.replace(minute=0, second=0, microsecond=0, nanosecond=0).tz_convert("UTC")
    day = local.tz_localize(None).normalize()
    if unit == "week":
        day = day - pd.Timedelta(days=day.weekday())
    elif unit == "month":
        day = day.replace(day=1)
    elif unit == "year":
        day = day.replace(month=1, day=1)
    return _utc_from_wall(day, tz)


def _utc_from_wall(wall: pd.Timestamp, tz: str) -> pd.Timestamp:
    """A wall-clock time of `tz` as UTC (a DST gap shifts forward; an ambiguous hour takes the first)."""
    return pd.Timestamp(wall).tz_localize(tz, ambiguous=True, nonexistent="shift_forward").tz_convert("UTC")


def boundary_after(ts, unit: str, tz: str = "UTC") -> pd.Timestamp:
    """The first boundary of `unit` strictly after `ts` (in `tz`), as UTC: the end of a window that holds `ts`."""
    start = period_start(ts, unit, tz)
    if unit == "hour":
        return start + pd.Timedelta(hours=1)
    return _utc_from_wall(start.tz_convert(tz).tz_localize(None) + offset(Period(1, unit)), tz)


def shift(ts, period: Period, tz: str = "UTC", sign: int = -1) -> pd.Timestamp:
    """`ts` moved by `period` (back with sign -1), on the wall clock of `tz` for calendar units, as UTC."""
    if period.unit == "hour":
        return utc_timestamp(ts) + sign * offset(period)
    local = _local(ts, tz).tz_localize(None)
    return _utc_from_wall(local - offset(period) if sign < 0 else local + offset(period), tz)


def latest_window(last_event, period: Period, tz: str = "UTC") -> tuple[pd.Timestamp, pd.Timestamp]:
    """[lo, hi) of length `period` ending at the boundary after the last event (of the period's unit)."""
    if last_event is None or pd.isna(last_event):
        raise ValueError("no event time to place a window at")
    hi = boundary_after(last_event, period.unit, tz)
    return shift(hi, period, tz), hi


def window_before(hi, period: Period, tz: str = "UTC") -> tuple[pd.Timestamp, pd.Timestamp]:
    """[hi - period, hi): e.g. the retraining window that ends where the checked window ends."""
    hi = utc_timestamp(hi)
    return shift(hi, period, tz), hi


def last_period_split(times: pd.Series, period: Period, tz: str = "UTC") -> pd.Timestamp:
    """Where the last `period` of `times` starts: the boundary its holdout begins at (a time-honest holdout)."""
    _, hi = latest_window(times.max(), period, tz)
    return shift(hi, period, tz)


# --------------------------------------------------------------------------------------------------- cooldown
@dataclass
class CooldownCheck:
    blocked: bool
    reason: str


def _days(delta: pd.Timedelta) -> str:
    return f"{pd.Timedelta(delta).total_seconds() / 86400:.1f} days"


def check_cooldown(now, last, cooldown: Period | pd.Timedelta | float, tz: str = "UTC") -> CooldownCheck:
    """Is a retraining at event time `now` (the checked window's end) inside the cooldown that started at `last`
    (the end of the window the last retraining was scheduled at)?

    A `last` at or after `now` means this window was already acted on (the same month checked again, e.g. by the
    cron right after a replay): that is inside the cooldown, never a reason to skip it.
    """
    now = utc_timestamp(now)
    if last is None:
        return CooldownCheck(False, "no earlier retraining: no cooldown to respect")
    last = utc_timestamp(last)
    if isinstance(cooldown, Period):
        until = shift(last, cooldown, tz, sign=+1)
        length = str(cooldown)
    else:
        delta = pd.Timedelta(days=cooldown) if isinstance(cooldown, (int, float)) else pd.Timedelta(cooldown)
        until, length = last + delta, _days(delta)
    if last >= now:
        return CooldownCheck(
            True,
            f"in cooldown: the last retraining was scheduled at event time {last.isoformat()}, not before this "
            f"window's end {now.isoformat()} (this window was already acted on); next allowed from {until.isoformat()}",
        )
    if now < until:
        return CooldownCheck(
            True,
            f"in cooldown: last retraining scheduled at event time {last.isoformat()}, {_days(now - last)} ago "
            f"< {length}; next allowed from {until.isoformat()}",
        )
    return CooldownCheck(False, f"outside cooldown: last retraining {_days(now - last)} ago (>= {length})")
