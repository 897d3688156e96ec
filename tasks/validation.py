"""Validation: check a pulled table against its dataset spec before anything is trained or registered."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.errors import UserError
from flywheel.core.spec import DatasetSpec
from flywheel.core.timeutil import to_utc


class DataValidationError(UserError, ValueError):
    """The data does not match its spec; `problems` lists every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("data failed validation:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ValidationReport:
    rows: int
    columns: int
    null_share: dict[str, float]
    positive_share: float | None


def _coerces_to_number(series: pd.Series) -> float:
    """Share of non-null values that cannot be read as numbers."""
    present = series.dropna()
    if present.empty:
        return 0.0
    return float(pd.to_numeric(present, errors="coerce").isna().mean())


def validate_dataset(
    df: pd.DataFrame, spec: DatasetSpec, *, min_rows: int = 200, max_null_share: float = 0.3
) -> ValidationReport:
    """Check columns, types, nulls, size and target; raise one DataValidationError listing every problem."""
    problems: list[str] = []
    missing = [c for c in spec.required_columns if c not in df.columns]
    if missing:
        problems.append(f"missing columns: {missing} (have: {sorted(map(str, df.columns))})")
    if len(df) < min_rows:
        problems.append(f"too few rows: {len(df)} < {min_rows}")

    null_share: dict[str, float] = {}
    for col in spec.features:
        if col not in df.columns:
            continue
        share = float(df[col].isna().mean()) if len(df) else 1.0
        null_share[col] = round(share, 4)
        if share > max_null_share:
            problems.append(f"column '{col}' is {share:.0%} null (limit {max_null_share:.0%})")
    for col in spec.numeric:
        if col in df.columns:
            bad = _coerces_to_number(df[col])
            if bad > 0:
                example = df[col][pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()].iloc[0]
                problems.append(f"numeric column '{col}' has {bad:.1%} values that are not numbers (e.g. {example!r})")
    if spec.event_time and spec.event_time in df.columns:
        ts = to_utc(df[spec.event_time])
        bad = float((ts.isna() & df[spec.event_time].notna()).mean()) if len(df) else 0.0
        if bad > 0:
            problems.append(f"event_time column '{spec.event_time}' has {bad:.1%} values that are not timestamps")

    positive_share = None
    if spec.target in df.columns:
        target = df[spec.target]
        if target.isna().any():
            problems.append(f"target '{spec.target}' has {int(target.isna().sum())} missing values")
        if spec.task == "binary":
            classes = set(target.dropna().unique().tolist())
            if len(classes) < 2:
                problems.append(f"target '{spec.target}' has a single class {sorted(map(str, classes))}: cannot train")
            elif len(classes) > 2:
                problems.append(f"target '{spec.target}' has {len(classes)} classes; task 'binary' needs two")
            if (
                len(classes) >= 1
                and spec.positive_class not in classes
                and str(spec.positive_class) not in set(map(str, classes))
            ):
                problems.append(
                    f"positive_class {spec.positive_class!r} does not occur in target '{spec.target}' "
                    f"(values: {sorted(map(str, classes))[:10]})"
                )
            elif len(df):
                positive = (target == spec.positive_class) | (target.astype(str) == str(spec.positive_class))
                positive_share = float(positive.mean())
        else:
            bad = _coerces_to_number(target)
            if bad > 0:
                problems.append(f"regression target '{spec.target}' has {bad:.1%} values that are not numbers")
            elif target.dropna().nunique() < 2:
                problems.append(f"regression target '{spec.target}' is constant: cannot train")
    if problems:
        raise DataValidationError(problems)
    return ValidationReport(rows=len(df), columns=df.shape[1], null_share=null_share, positive_share=positive_share)


@task(name="validate-dataset", cache_policy=NO_CACHE)
def validate(df: pd.DataFrame, spec: DatasetSpec, min_rows: int = 200, max_null_share: float = 0.3) -> ValidationReport:
    return validate_dataset(df, spec, min_rows=min_rows, max_null_share=max_null_share)
