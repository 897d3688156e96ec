"""Reading Evidently's snapshot (`snapshot.dict()` of a drift Report): the per-column verdicts, with the direction
and severity of each method's score, and the quality metrics with their decay against the reference.

Plain functions (tasks/drift.py's `compute_drift` and bench/drift.py call them); Evidently itself is imported
inside `parse_quality` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Stat tests whose score is a distance (drift if score >= threshold); every other Evidently test reports a
# p-value (drift if score < threshold). Matched case-insensitively against the method's display name.
_DISTANCE_METHODS = ("wasserstein", "jensen-shannon", "hellinger", "kullback", "psi", "energy", "text content")
_QUALITY_NAMES = {
    "Accuracy": "accuracy",
    "Precision": "precision",
    "Recall": "recall",
    "F1Score": "f1",
    "RocAuc": "roc_auc",
    "LogLoss": "log_loss",
    "TPR": "tpr",
    "TNR": "tnr",
    "FPR": "fpr",
    "FNR": "fnr",
    "RMSE": "rmse",
    "MAE": "mae",
    "MeanError": "mean_error",
    "MAPE": "mape",
    "R2Score": "r2",
    "AbsMaxError": "abs_max_error",
}
_LOWER_IS_BETTER = {"log_loss", "fpr", "fnr", "rmse", "mae", "mape", "abs_max_error"}


@dataclass
class ColumnDrift:
    column: str
    kind: str  # "numerical" | "categorical"
    method: str  # Evidently's display name, e.g. "Wasserstein distance (normed)", "K-S p_value"
    score: float
    threshold: float
    drifted: bool
    direction: str  # "distance" (drift if score >= threshold) | "p_value" (drift if score < threshold)

    @property
    def severity(self) -> float:
        """How far past (> 1) or short of (< 1) its threshold the score is, comparable across methods."""
        return _severity(self.direction, self.score, self.threshold)


def _direction(method: str) -> str:
    name = method.lower()
    return "distance" if any(key in name for key in _DISTANCE_METHODS) else "p_value"


def _drifted_by_direction(direction: str, score: float, threshold: float) -> bool:
    return score >= threshold if direction == "distance" else score < threshold


def _severity(direction: str, score: float, threshold: float) -> float:
    if direction == "distance":
        return score / threshold if threshold > 0 else math.inf
    # p-values: compare orders of magnitude, so p=1e-30 at 0.05 ranks far above p=0.01.
    p = max(score, 1e-300)
    return math.log10(p) / math.log10(threshold) if 0 < threshold < 1 else (threshold / p)


def parse_quality(snapshot, dump: dict) -> dict[str, dict[str, float]]:
    """Current and reference values of the scalar quality metrics in a snapshot."""
    try:
        from evidently.core.report import ReferenceMetricNotFound
    except ImportError:  # pragma: no cover - other Evidently versions
        ReferenceMetricNotFound = KeyError  # noqa: N806
    current: dict[str, float] = {}
    reference: dict[str, float] = {}
    for metric in dump["metrics"]:
        kind = str(metric.get("config", {}).get("type", "")).rsplit(":", 1)[-1]
        name = _QUALITY_NAMES.get(kind)
        if name is None:
            continue
        value = metric.get("value")
        if isinstance(value, dict):  # MeanError / MAE / MAPE report {"mean", "std"}
            value = value.get("mean")
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            current[name] = float(value)
        try:
            ref = snapshot.context.get_reference_metric_result(metric["id"])
        except (ReferenceMetricNotFound, KeyError, AttributeError):
            continue
        ref_value = getattr(ref, "value", None)
        if isinstance(ref_value, dict):
            ref_value = ref_value.get("mean")
        if isinstance(ref_value, (int, float)) and math.isfinite(float(ref_value)):
            reference[name] = float(ref_value)
    return {"reference": reference, "current": current}


def relative_decay(quality: dict[str, dict[str, float]], metric: str) -> float | None:
    """How much worse `metric` is on the current data than on the reference, relative to the reference (None
    without both values or with a reference of 0)."""
    ref, cur = quality["reference"].get(metric), quality["current"].get(metric)
    if ref is None or cur is None or ref == 0:
        return None
    worse = (cur - ref) if metric in _LOWER_IS_BETTER else (ref - cur)
    return worse / abs(ref)


def parse_columns(dump: dict, kinds: dict[str, str]) -> tuple[list[ColumnDrift], float | None, list[str]]:
    """Per-column verdicts from `snapshot.dict()`, Evidently's own test status first, the method's direction else
    (also how bench/drift.py reads the snapshots of its unsampled Evidently runs)."""
    status = {}
    for test in dump.get("tests", []):
        metric_id = (test.get("metric_config") or {}).get("metric_id")
        if metric_id:
            status.setdefault(metric_id, []).append(str(getattr(test.get("status"), "value", test.get("status"))))
    out: list[ColumnDrift] = []
    evidently_share = None
    notes: list[str] = []
    for metric in dump["metrics"]:
        config = metric.get("config", {})
        kind = str(config.get("type", "")).rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            evidently_share = float(metric["value"]["share"])
        if kind != "ValueDrift":
            continue
        column, method = config["column"], str(config.get("method") or "")
        score, threshold = float(metric["value"]), float(config["threshold"])
        direction = _direction(method)
        drifted = _drifted_by_direction(direction, score, threshold)
        verdict = status.get(metric["id"])
        if verdict:  # Evidently's test: FAIL = drift detected
            tested = "FAIL" in verdict
            if tested != drifted and not math.isclose(score, threshold):
                notes.append(f"{column}: Evidently's test says drifted={tested}, {method} {score:.4g} vs {threshold}")
            drifted = tested
        out.append(ColumnDrift(column, kinds.get(column, "numerical"), method, score, threshold, drifted, direction))
    return out, evidently_share, notes
