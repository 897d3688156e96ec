"""UTC, the one time zone Flywheel computes in: event times, windows and cooldowns."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pandas as pd


def utc_timestamp(value: Any) -> pd.Timestamp | None:
    """One timestamp in UTC (a naive one is taken as UTC); None stays None."""
    if value is None:
        return None
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def to_utc(series: pd.Series) -> pd.Series:
    """Timestamps in UTC (naive ones taken as UTC); values that are not timestamps become NaT."""
    ts = pd.to_datetime(series, utc=True, errors="coerce")
    # pandas guesses one format from the first value: parse the values that did not fit it one by one.
    retry = ts.isna() & series.notna()
    if retry.any():
        ts[retry] = pd.to_datetime(series[retry], utc=True, errors="coerce", format="mixed")
    return ts


def epoch_iso(ts: float | None) -> str | None:
    """A Unix time as an ISO-8601 string in UTC; None stays None."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()
