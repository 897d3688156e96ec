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


# A class with fewer labelled rows than this, or under this share of them, gets a warning (its per-class metrics
# rest on a handful of holdout rows).
RARE_CLASS_ROWS = 10
RARE_CLASS_SHARE = 0.01


@dataclass(frozen=True)
class ValidationReport:
    rows: int  # rows pulled
    columns: int
    null_share: dict[str, float]  # of the labelled rows
    positive_share: float | None
    rows_unlabeled: int = 0  # rows without a value in the target: left out of training and evaluation
    class_counts: dict[str, int] | None = None  # labelled rows per class (multiclass)
    warnings: tuple[str, ...] = ()

    @property
    def rows_labeled(self) -> int:
        return self.rows - self.rows_unlabeled


def _coerces_to_number(series: pd.Series) -> float:
    """Share of non-null values that cannot be read as numbers."""
    present = series.dropna()
    if present.empty:
        return 0.0
    return float(pd.to_numeric(present, errors="coerce").isna().mean())


def unlabeled_mask(df: pd.DataFrame, spec: DatasetSpec) -> pd.Series:
    """Rows with no value in the target column (missing, or text that is only blanks)."""
    target = df[spec.target]
    text = target.dtype == object or isinstance(target.dtype, pd.StringDtype)
    blank = target.astype("string").str.strip().eq("").fillna(False).astype(bool) if text else False
    return target.isna() | blank


def labelled_rows(df: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The rows that have a label: what is trained and evaluated on (the frame itself when every row has one)."""
    mask = unlabeled_mask(df, spec)
    return df.loc[~mask] if mask.any() else df


def _target_problems(target: pd.Series, spec: DatasetSpec) -> tuple[list[str], list[str], float | None, dict | None]:
    """Problems and warnings about the labelled target values; the positive share (binary) and class counts."""
    problems: list[str] = []
    warnings: list[str] = []
    positive_share = counts = None
    if spec.task == "regression":
        bad = _coerces_to_number(target)
        if bad > 0:
            problems.append(f"regression target '{spec.target}' has {bad:.1%} values that are not numbers")
        elif target.nunique() < 2:
            problems.append(f"regression target '{spec.target}' is constant: cannot train")
        return problems, warnings, positive_share, counts
    by_class = target.value_counts()
    seen = {str(k): int(v) for k, v in by_class.items()}
    classes = set(by_class.index.tolist())
    if len(classes) < 2:
        problems.append(f"target '{spec.target}' has a single class {sorted(map(str, classes))}: cannot train")
    if spec.task == "binary":
        if len(classes) > 2:
            problems.append(
                f"target '{spec.target}' has {len(classes)} classes; task 'binary' needs two (or use 'multiclass')"
            )
        if len(classes) >= 1 and spec.positive_class not in classes and str(spec.positive_class) not in seen:
            problems.append(
                f"positive_class {spec.positive_class!r} does not occur in target '{spec.target}' "
                f"(values: {sorted(seen)[:10]})"
            )
        elif len(target):
            positive = (target == spec.positive_class) | (target.astype(str) == str(spec.positive_class))
            positive_share = float(positive.mean())
    elif len(classes) >= 2:
        counts = seen
        limit = max(RARE_CLASS_ROWS, RARE_CLASS_SHARE * len(target))
        for label, n in by_class.items():
            if n < limit:
                warnings.append(
                    f"class {str(label)!r} of target '{spec.target}' is rare: {n} of {len(target)} labelled rows "
                    f"({n / len(target):.1%}); its holdout precision and recall rest on about {max(1, round(n * 0.2))}"
                    " row(s)" + ("; with fewer than 2 rows the split cannot be stratified" if n < 2 else "")
                )
    return problems, warnings, positive_share, counts


def validate_dataset(
    df: pd.DataFrame, spec: DatasetSpec, *, min_rows: int = 200, max_null_share: float = 0.3
) -> ValidationReport:
    """Check columns, types, nulls, size and target; raise one DataValidationError listing every problem.

    Rows without a label are counted and left out of the checks of size, nulls and classes: they are not trained
    on. Validation fails only when fewer than `min_rows` labelled rows remain, or for the other problems.
    """
    problems: list[str] = []
    missing = [c for c in spec.required_columns if c not in df.columns]
    if missing:
        problems.append(f"missing columns: {missing} (have: {sorted(map(str, df.columns))})")
    unlabeled = int(unlabeled_mask(df, spec).sum()) if spec.target in df.columns else 0
    labelled = labelled_rows(df, spec) if unlabeled else df
    if len(labelled) < min_rows:
        if unlabeled:
            problems.append(
                f"too few labelled rows: {len(labelled)} < {min_rows} ({unlabeled} of {len(df)} rows have no "
                f"value in target '{spec.target}')"
            )
        else:
            problems.append(f"too few rows: {len(df)} < {min_rows}")

    null_share: dict[str, float] = {}
    for col in spec.features:
        if col not in labelled.columns:
            continue
        share = float(labelled[col].isna().mean()) if len(labelled) else 1.0
        null_share[col] = round(share, 4)
        if share > max_null_share:
            problems.append(f"column '{col}' is {share:.0%} null (limit {max_null_share:.0%})")
    for col in spec.numeric:
        if col in labelled.columns:
            bad = _coerces_to_number(labelled[col])
            if bad > 0:
                values = labelled[col]
                example = values[pd.to_numeric(values, errors="coerce").isna() & values.notna()].iloc[0]
                problems.append(f"numeric column '{col}' has {bad:.1%} values that are not numbers (e.g. {example!r})")
    if spec.event_time and spec.event_time in df.columns:
        ts = to_utc(df[spec.event_time])
        bad = float((ts.isna() & df[spec.event_time].notna()).mean()) if len(df) else 0.0
        if bad > 0:
            problems.append(f"event_time column '{spec.event_time}' has {bad:.1%} values that are not timestamps")

    positive_share, counts, warnings = None, None, []
    if spec.target in df.columns:
        target_problems, warnings, positive_share, counts = _target_problems(labelled[spec.target], spec)
        problems += target_problems
    if problems:
        raise DataValidationError(problems)
    return ValidationReport(
        rows=len(df), columns=df.shape[1], null_share=null_share, positive_share=positive_share,
        rows_unlabeled=unlabeled, class_counts=counts, warnings=tuple(warnings),
    )  # fmt: skip


@task(name="validate-dataset", cache_policy=NO_CACHE)
def validate(df: pd.DataFrame, spec: DatasetSpec, min_rows: int = 200, max_null_share: float = 0.3) -> ValidationReport:
    return validate_dataset(df, spec, min_rows=min_rows, max_null_share=max_null_share)
