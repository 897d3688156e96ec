"""Drift: compare current data with the reference (Evidently) and say so in markdown.

Plain functions only (tests call them directly); the drift check's I/O and its tasks are in tasks/monitoring.py,
its windows and cooldown in tasks/drift_windows.py, the retraining decision in tasks/retrain_policy.py, reading
Evidently's snapshot (per-column verdicts, quality metrics) in tasks/drift_snapshot.py.
Evidently is imported inside `compute_drift` only: its import costs 7–8 s.

How Evidently 0.7.23 decides, per column (auto-selected by the *reference* row count):
- reference ≤ 1,000 rows: K-S p-value (numeric), chi-square / Z-test p-value (categorical) — drift if the
  p-value is below the threshold (0.05);
- above that: Wasserstein distance normed by the reference std (numeric with > 5 values) or Jensen-Shannon
  distance (categorical, few-valued numeric) — drift if the distance is at or above the threshold (0.1).
Dataset drift = share of drifted columns >= `drift_share`.

Both frames are sampled down to `sample_cap` rows each before Evidently sees them: Evidently's run time grows
with rows while the distances it reports settle long before that. Measured on the flights data (12 columns,
1M rows per side, 2 shared cores): unsampled Evidently 26–29 s; a bare scipy Wasserstein/Jensen-Shannon pass
over all rows 2.4–2.6 s; this function at the default 50,000 rows 2.5–3.8 s, with the same per-column verdicts
as the unsampled run on 239 of 240 columns (5 seeds × March and July). The cap may not go below 5,000 rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from flywheel.core.sampling import sample_rows
from flywheel.core.spec import DatasetSpec
from flywheel.tasks.drift_snapshot import ColumnDrift, parse_columns, parse_quality, relative_decay

# Dataset drift when a strict majority of the monitored columns drift. Evidently compares with `>=`, so 0.5
# would call exactly half a dataset drift: on the flights demo Jan–Feb vs March drifts 6 of 12 columns (the
# weather moves a little every month) and would sit on that knife edge, one column deciding. 0.55 needs 7 of
# 12 (July has 7–8), and is a strict majority for any column count up to 20.
DEFAULT_DRIFT_SHARE = 0.55
DEFAULT_SAMPLE_CAP = 50_000
MIN_SAMPLE_CAP = 5_000
DEFAULT_MIN_ROWS = 500
# Relative fall of the primary quality metric (f1 for binary, macro f1 for multiclass, rmse rise for regression) that
# counts as decay.
DEFAULT_MAX_QUALITY_DECAY = 0.10

# Evidently averages a multiclass model's F1, precision and recall over the classes (macro): named as the training
# run's metrics are (tasks/evaluation.py).
_MULTICLASS_NAMES = {"f1": "f1_macro", "precision": "precision_macro", "recall": "recall_macro"}


class DriftDataError(ValueError):
    """The data given to the drift check cannot be compared: empty, missing or all-null columns, too few rows."""


# --------------------------------------------------------------------------------------------------- results
@dataclass
class DriftResult:
    """What a drift check found, small and JSON-serialisable (`as_dict` / `from_dict`)."""

    dataset_drift: bool
    drift_share: float  # share of the monitored columns that drifted
    drift_share_threshold: float  # dataset drift when drift_share >= this
    n_drifted: int
    n_columns: int
    columns: list[ColumnDrift]
    rows_reference: int  # rows given, before sampling
    rows_current: int
    rows_reference_used: int  # rows Evidently compared, after sampling
    rows_current_used: int
    sampled: bool
    sample_cap: int
    quality: dict[str, dict[str, float]] | None = None  # {"reference": {...}, "current": {...}} with labels
    quality_metric: str | None = None  # the metric quality decay is read from (f1 / f1_macro / rmse)
    quality_decay: float | None = None  # relative worsening of quality_metric, current vs reference
    html_path: str | None = None
    seconds: float = 0.0
    evidently_version: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def drifted_columns(self) -> list[ColumnDrift]:
        """The drifted columns, furthest past their threshold first."""
        return sorted((c for c in self.columns if c.drifted), key=lambda c: c.severity, reverse=True)

    def column(self, name: str) -> ColumnDrift:
        for c in self.columns:
            if c.column == name:
                return c
        raise KeyError(name)

    def verdicts(self) -> dict[str, bool]:
        return {c.column: c.drifted for c in self.columns}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftResult:
        data = dict(data)
        data["columns"] = [c if isinstance(c, ColumnDrift) else ColumnDrift(**c) for c in data.get("columns", [])]
        return cls(**data)


# --------------------------------------------------------------------------------------------------- helpers
def drift_columns(spec: DatasetSpec) -> list[str]:
    """The spec's features minus `drift_exclude` (calendar columns and ids drift by construction)."""
    excluded = set(spec.drift_exclude)
    return [c for c in spec.features if c not in excluded]


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _validate(
    frame: pd.DataFrame | None, columns: Sequence[str], min_rows: int, which: str, numeric: set[str] | None = None
) -> None:
    """Raise DriftDataError naming what is wrong with one side's data."""
    if frame is None or not isinstance(frame, pd.DataFrame):
        raise DriftDataError(f"{which} data is missing (got {type(frame).__name__}, expected a DataFrame)")
    if len(frame) == 0:
        raise DriftDataError(f"{which} data is empty (0 rows): nothing to compare")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, list(frame.columns)[:30]))
        raise DriftDataError(f"{which} data lacks drift column(s) {missing}; it has: {have}")
    all_null = [c for c in columns if frame[c].isna().all()]
    if all_null:
        raise DriftDataError(f"{which} data has column(s) {all_null} with no values at all (all null)")
    if len(frame) < min_rows:
        raise DriftDataError(
            f"{which} data has {len(frame)} rows; the drift check needs at least {min_rows} "
            "(fewer rows make the per-column tests noise)"
        )
    if numeric:
        wrong = [f"{c} ({frame[c].dtype})" for c in columns if c in numeric and not _is_numeric(frame[c])]
        if wrong:
            raise DriftDataError(f"{which} data has non-numeric values in numeric column(s): {', '.join(wrong)}")


def _prepare(frame: pd.DataFrame, numerical: list[str], categorical: list[str], extra: list[str]) -> pd.DataFrame:
    """Only the columns Evidently needs, in plain dtypes (float64 numbers, str categories with NaN kept)."""
    out = {}
    for c in numerical:
        out[c] = pd.to_numeric(frame[c], errors="coerce").astype("float64").to_numpy()
    for c in categorical:
        s = frame[c]
        out[c] = s.astype(str).astype(object).where(s.notna(), None).to_numpy()
    for c in extra:
        out[c] = frame[c].to_numpy()
    return pd.DataFrame(out)


def _label_config(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    target: str | None,
    prediction: str | None,
    task_type: str,
    pos_label: Any,
):
    """Evidently's classification/regression definition when both frames carry target and prediction."""
    if not target or not prediction:
        return None, None
    if not all(c in f.columns for c in (target, prediction) for f in (reference, current)):
        return None, None
    from evidently import BinaryClassification, MulticlassClassification, Regression

    if task_type == "regression":
        return "regression", Regression(target=target, prediction=prediction)
    if task_type == "multiclass":  # predicted labels; Evidently's F1, precision and recall are then macro averages
        return "classification", MulticlassClassification(target=target, prediction_labels=prediction)
    pred = pd.concat([reference[prediction], current[prediction]]).dropna()
    is_proba = (
        _is_numeric(pred)
        and len(pred) > 0
        and pred.between(0, 1).all()
        and not (pred.round() == pred).all()  # 0/1 labels are labels, anything else in [0, 1] a probability
    )
    kwargs = {"prediction_probas": prediction} if is_proba else {"prediction_labels": prediction}
    return "classification", BinaryClassification(target=target, pos_label=pos_label, **kwargs)


def class_labels(series: pd.Series) -> pd.Series:
    """Class labels as text, the same on both sides whatever the source's dtype (labels read from a CSV with a gap
    come as floats, predictions as ints: 2.0 and 2 are both "2"); missing values stay missing."""
    values = series
    if _is_numeric(series):
        known = series.dropna()
        if len(known) and (known == known.round()).all():
            values = series.astype("Int64")
    return values.astype(str).astype(object).where(series.notna(), None)


def _with_class_labels(frame: pd.DataFrame, columns: Iterable[str | None]) -> pd.DataFrame:
    present = [c for c in dict.fromkeys(columns) if c and c in frame.columns]
    return frame.assign(**{c: class_labels(frame[c]) for c in present}) if present else frame


# --------------------------------------------------------------------------------------------------- compute
def compute_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: list[str],
    *,
    drift_share: float,
    sample_cap: int = DEFAULT_SAMPLE_CAP,
    seed: int = 0,
    target: str | None = None,
    prediction: str | None = None,
    task: str = "binary",
    pos_label: Any = 1,
    categorical: Iterable[str] | None = None,
    min_rows: int = DEFAULT_MIN_ROWS,
    html_path: str | Path | None = None,
) -> DriftResult:
    """Evidently's data drift (and quality, with labels) of `current` against `reference`, reduced to a DriftResult.

    Columns are numerical when the reference holds numbers, categorical otherwise (or when listed in
    `categorical`). Both frames are sampled to at most `sample_cap` rows each (seeded). With `target` and
    `prediction` present in both frames, a Classification/RegressionPreset adds quality metrics. With
    `html_path`, Evidently's self-contained HTML report is written there.

    `task="multiclass"`: the `prediction` column, when both frames have it, is also a (categorical) drift column
    — the distribution of predicted classes — and with labels the quality is Evidently's multiclass
    classification (`f1_macro`, `precision_macro`, `recall_macro`, `accuracy`; decay read from `f1_macro`); labels
    and predictions are compared as text.
    """
    if sample_cap < MIN_SAMPLE_CAP:
        raise ValueError(
            f"sample_cap={sample_cap} is below {MIN_SAMPLE_CAP}: Evidently switches to other statistical tests "
            "under 1,000 reference rows and small samples make the distances noise"
        )
    if not 0 < drift_share <= 1:
        raise ValueError(f"drift_share={drift_share} must be in (0, 1]")
    columns = list(dict.fromkeys(columns))
    if not columns:
        raise ValueError("no columns to check for drift")
    started = time.perf_counter()
    forced_cat = set(categorical or ())
    multiclass = task == "multiclass"
    if multiclass and prediction and all(isinstance(f, pd.DataFrame) and prediction in f for f in (reference, current)):
        columns = [*columns, prediction] if prediction not in columns else columns  # the predicted-class mix
        forced_cat.add(prediction)
    _validate(reference, columns, 1, "reference")
    numerical = [c for c in columns if c not in forced_cat and _is_numeric(reference[c])]
    cats = [c for c in columns if c not in numerical]
    _validate(current, columns, min_rows, "current", numeric=set(numerical))

    import evidently
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import ClassificationPreset, DataDriftPreset, RegressionPreset

    label_kind, label_def = _label_config(reference, current, target, prediction, task, pos_label)
    notes: list[str] = []
    if (target or (prediction and not multiclass)) and not label_kind:
        notes.append(f"no quality metrics: target {target!r} and prediction {prediction!r} are not in both frames")
    extra = [target, prediction] if label_kind else []
    extra = [c for c in dict.fromkeys(extra) if c not in columns]
    ref_rows, cur_rows = sample_rows(reference, sample_cap, seed), sample_rows(current, sample_cap, seed + 1)
    if multiclass:
        ref_rows, cur_rows = (_with_class_labels(f, (target, prediction)) for f in (ref_rows, cur_rows))
    ref = _prepare(ref_rows, numerical, cats, extra)
    cur = _prepare(cur_rows, numerical, cats, extra)

    definition_kwargs: dict[str, Any] = {"numerical_columns": numerical, "categorical_columns": cats}
    presets: list[Any] = [DataDriftPreset(columns=columns, drift_share=drift_share)]
    if label_kind == "classification":
        definition_kwargs["classification"] = [label_def]
        presets.append(ClassificationPreset())
    elif label_kind == "regression":
        definition_kwargs["regression"] = [label_def]
        presets.append(RegressionPreset())
    definition = DataDefinition(**definition_kwargs)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Evidently's plotting helpers warn on every run
        snapshot = Report(presets, include_tests=True).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition),
        )
        dump = snapshot.dict()

    kinds = {c: "numerical" for c in numerical} | {c: "categorical" for c in cats}
    per_column, evidently_share, parse_notes = parse_columns(dump, kinds)
    notes += parse_notes
    n_drifted = sum(c.drifted for c in per_column)
    share = n_drifted / len(per_column) if per_column else 0.0
    if evidently_share is not None and not math.isclose(share, evidently_share):
        notes.append(f"Evidently counts drift share {evidently_share:.3f}, the per-column tests {share:.3f}")

    quality = quality_metric = decay = None
    if label_kind:
        quality = parse_quality(snapshot, dump)
        quality_metric = "rmse" if label_kind == "regression" else "f1"
        if multiclass:
            quality = {side: {_MULTICLASS_NAMES.get(k, k): v for k, v in values.items()}
                       for side, values in quality.items()}  # fmt: skip
            quality_metric = _MULTICLASS_NAMES["f1"]
        decay = relative_decay(quality, quality_metric)

    written = None
    if html_path is not None:
        path = Path(html_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            snapshot.save_html(str(path))  # a Path object is silently ignored by Evidently 0.7.23
        written = str(path)

    return DriftResult(
        dataset_drift=bool(share >= drift_share),
        drift_share=share,
        drift_share_threshold=drift_share,
        n_drifted=n_drifted,
        n_columns=len(per_column),
        columns=per_column,
        rows_reference=len(reference),
        rows_current=len(current),
        rows_reference_used=len(ref),
        rows_current_used=len(cur),
        sampled=len(reference) > sample_cap or len(current) > sample_cap,
        sample_cap=sample_cap,
        quality=quality,
        quality_metric=quality_metric,
        quality_decay=decay,
        html_path=written,
        seconds=round(time.perf_counter() - started, 3),
        evidently_version=evidently.__version__,
        warnings=notes,
    )


# --------------------------------------------------------------------------------------------------- report
def drift_markdown(
    result: DriftResult, report_url: str | None, top: int = 10, window: tuple[Any, Any] | None = None,
    reference: str | None = None,
) -> str:  # fmt: skip
    """A Prefect artifact: verdict, the window checked, share, the most drifted columns, the sampling note and the
    report link."""
    verdict = "DRIFT DETECTED" if result.dataset_drift else "no dataset drift"
    lines = [f"# Data drift: {verdict}", ""]
    if window is not None:
        lines += [f"**Window (event time):** [{window[0]}, {window[1]})" + (f", against {reference}" if reference
                                                                               else "") + ".", ""]  # fmt: skip
    lines += [
        f"**{result.n_drifted} of {result.n_columns} columns drifted** (share {result.drift_share:.0%}; "
        f"dataset drift at >= {result.drift_share_threshold:.0%}).",
        "",
    ]
    drifted = result.drifted_columns
    if drifted:
        lines += ["| column | method | score | threshold | severity |", "|---|---|---|---|---|"]
        for c in drifted[:top]:
            lines.append(f"| {c.column} | {c.method} | {c.score:.4g} | {c.threshold:g} | {c.severity:.1f}× |")
        lines.append("\nSeverity: score ÷ threshold for distances, log p ÷ log threshold for p-values (> 1 = drift).")
        if len(drifted) > top:
            lines.append(f"\n…and {len(drifted) - top} more: {', '.join(c.column for c in drifted[top:])}")
        lines.append("")
    steady = [c.column for c in result.columns if not c.drifted]
    if steady:
        lines += [f"No drift in: {', '.join(steady)}.", ""]
    if result.quality:
        ref, cur = result.quality["reference"], result.quality["current"]
        lines += ["| quality | reference | current |", "|---|---|---|"]
        for key in sorted(set(ref) | set(cur)):
            r = f"{ref[key]:.4f}" if key in ref else ""
            c = f"{cur[key]:.4f}" if key in cur else ""
            lines.append(f"| {key} | {r} | {c} |")
        if result.quality_decay is not None:
            lines.append(f"\n{result.quality_metric} is {result.quality_decay:+.1%} worse than on the reference.")
        lines.append("")
    rows = f"Rows: reference {result.rows_reference:,}, current {result.rows_current:,}."
    if result.sampled:
        rows += (
            f" Sampled to at most {result.sample_cap:,} rows per side "
            f"({result.rows_reference_used:,} / {result.rows_current_used:,} compared)."
        )
    lines.append(rows)
    if report_url:
        lines += ["", f"Full Evidently report: [{report_url}]({report_url})"]
    return "\n".join(lines)
