"""Evaluation: the holdout (time-honest for data with an event time), holdout metrics for a fitted model, the
trivial baseline's on the same holdout, and the confusion-matrix picture."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn import metrics as skm

from flywheel.core.names import slug
from flywheel.core.spec import DatasetSpec

# Metrics where a larger value is better; the others (rmse, mae) are better when smaller. Multiclass per-class
# metrics (`precision_<class>`, `recall_<class>`) are scores too, but no gate or selection ranks on them.
HIGHER_IS_BETTER = {
    "accuracy", "precision", "recall", "f1", "roc_auc", "r2", "f1_macro", "f1_weighted", "roc_auc_ovr",
}  # fmt: skip
PRIMARY_METRIC = {"binary": "f1", "multiclass": "f1_macro", "regression": "rmse"}


def primary_metric(task: str) -> str:
    """The metric the gate compares: F1 of the positive class, macro F1 over the classes, RMSE."""
    return PRIMARY_METRIC[task]


def class_keys(classes: Any) -> dict[Any, str]:
    """Each class label as the tail of a valid MLflow metric key (`precision_<key>`): slugged, lower-case, made
    unique with a numeric suffix when two labels slug alike ('a b' and 'a-b')."""
    keys: dict[Any, str] = {}
    taken: set[str] = set()
    for c in classes:
        base = slug(str(c), keep="_.", fill="_", default="class")
        key, n = base, 2
        while key in taken:
            key, n = f"{base}_{n}", n + 1
        keys[c] = key
        taken.add(key)
    return keys


def multiclass_metrics(y_true: pd.Series, y_pred: Any, proba: Any | None, classes: Any | None) -> dict[str, float]:
    """Accuracy, macro and weighted F1, one-vs-rest ROC-AUC when probabilities for every class present are given,
    and precision and recall per class (`precision_<class>`, `recall_<class>`) over the classes of either side."""
    labels = sorted(set(pd.unique(pd.Series(y_true))) | set(pd.unique(pd.Series(np.asarray(y_pred)))), key=str)
    out = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "f1_macro": skm.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0),
        "f1_weighted": skm.f1_score(y_true, y_pred, average="weighted", labels=labels, zero_division=0),
    }
    if proba is not None and classes is not None and set(pd.unique(y_true)) <= set(classes) and len(classes) > 2:
        try:
            out["roc_auc_ovr"] = skm.roc_auc_score(y_true, proba, multi_class="ovr", labels=list(classes))
        except ValueError:  # a class of the model's absent from this holdout: no one-vs-rest AUC for it
            pass
    precision = skm.precision_score(y_true, y_pred, average=None, labels=labels, zero_division=0)
    recall = skm.recall_score(y_true, y_pred, average=None, labels=labels, zero_division=0)
    for key, p, r in zip(class_keys(labels).values(), precision, recall, strict=True):
        out[f"precision_{key}"], out[f"recall_{key}"] = p, r
    return {k: round(float(v), 6) for k, v in out.items()}


HOLDOUT_NOTE = "flywheel_holdout"  # X_test.attrs key: how the holdout was split, said in the gate's reasons
MIN_HOLDOUT_SHARE, MAX_HOLDOUT_SHARE = 0.05, 0.5


def time_holdout_split(df: pd.DataFrame, spec: DatasetSpec, test_size: float = 0.2):
    """A time-honest split for data with an event time: the holdout is the most recent period of the data (the
    spec's `drift_window`, e.g. the last calendar month in its time zone) and the model trains only on what came
    before, so a candidate and the champion are compared on rows neither was trained on. When that period holds
    under 5 % or over half of the rows, the holdout is the last `test_size` of the rows by event time instead.
    None without an event time (the caller splits at random). The split is described in `X_test.attrs`."""
    import math

    from flywheel.core.timeutil import to_utc
    from flywheel.tasks import drift_windows
    from flywheel.tasks.training import Split, feature_frame, target_series

    if not spec.event_time or spec.event_time not in df.columns or len(df) < 10:
        return None
    ts = to_utc(df[spec.event_time])
    if ts.isna().all():
        return None
    order = np.argsort(ts.fillna(ts.min()).to_numpy(), kind="stable")
    plan = drift_windows.monitoring_plan(spec)
    cut = drift_windows.last_period_split(ts.dropna(), plan.drift_window, plan.time_zone)
    test = (ts >= cut).to_numpy()
    how = f"the last {plan.drift_window} [{cut.isoformat()}, …)"
    if not MIN_HOLDOUT_SHARE <= test.mean() <= MAX_HOLDOUT_SHARE:
        n_test = math.ceil(test_size * len(df))
        test = np.zeros(len(df), dtype=bool)
        test[order[-n_test:]] = True
        cut = ts[test].min()
        how = f"the last {test_size:.0%} of rows by event time (from {cut.isoformat()}; the last {plan.drift_window} "
        how += "held too few or too many rows)"
    X, y = feature_frame(df, spec), target_series(df, spec)
    train_idx, test_idx = df.index[~test], df.index[test]
    parts = Split(X.loc[train_idx], X.loc[test_idx], y.loc[train_idx], y.loc[test_idx])
    note = (
        f"time-honest holdout: {how}, {len(test_idx):,} rows; trained on the {len(train_idx):,} rows before "
        f"(event time {ts[~test].min().isoformat()} .. {cut.isoformat()})"
    )
    parts.X_test.attrs[HOLDOUT_NOTE] = {"note": note, "start": cut.isoformat(), "end": ts[test].max().isoformat()}
    return parts


def holdout_note(X_test: pd.DataFrame) -> dict[str, str]:
    """How the holdout was split: a time-honest split's note and bounds, or the random split's."""
    return X_test.attrs.get(HOLDOUT_NOTE) or {
        "note": f"random holdout of {len(X_test):,} rows (no event time: a time-honest split is not possible)"
    }


def classification_metrics(y_true: pd.Series, y_pred: Any, y_score: Any | None, positive: Any) -> dict[str, float]:
    out = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "precision": skm.precision_score(y_true, y_pred, pos_label=positive, zero_division=0),
        "recall": skm.recall_score(y_true, y_pred, pos_label=positive, zero_division=0),
        "f1": skm.f1_score(y_true, y_pred, pos_label=positive, zero_division=0),
    }
    if y_score is not None and len(pd.unique(y_true)) == 2:
        out["roc_auc"] = skm.roc_auc_score((np.asarray(y_true) == positive).astype(int), y_score)
    return {k: round(float(v), 6) for k, v in out.items()}


def regression_metrics(y_true: pd.Series, y_pred: Any) -> dict[str, float]:
    out = {
        "rmse": float(np.sqrt(skm.mean_squared_error(y_true, y_pred))),
        "mae": skm.mean_absolute_error(y_true, y_pred),
        "r2": skm.r2_score(y_true, y_pred),
    }
    return {k: round(float(v), 6) for k, v in out.items()}


def positive_scores(model: Any, X: pd.DataFrame, positive: Any) -> np.ndarray | None:
    """Scores for the positive class when the model can give them (predict_proba), else None."""
    if not hasattr(model, "predict_proba"):
        return None
    proba = model.predict_proba(X)
    classes = list(getattr(model, "classes_", []))
    idx = next((i for i, c in enumerate(classes) if c == positive or str(c) == str(positive)), len(classes) - 1)
    return proba[:, idx]


def evaluate_model(
    model: Any, X: pd.DataFrame, y: pd.Series, spec: DatasetSpec, positive: Any = None
) -> dict[str, float]:
    """Holdout metrics: accuracy/precision/recall/F1/ROC-AUC for binary; accuracy, macro and weighted F1 and
    per-class precision and recall for multiclass; RMSE/MAE/R² for regression."""
    y_pred = model.predict(X)
    if spec.task == "regression":
        return regression_metrics(y, y_pred)
    if spec.task == "multiclass":
        proba = model.predict_proba(X) if hasattr(model, "predict_proba") else None
        return multiclass_metrics(y, y_pred, proba, getattr(model, "classes_", None))
    positive = spec.positive_class if positive is None else positive
    return classification_metrics(y, y_pred, positive_scores(model, X, positive), positive)


def score_predictions(y_true: Any, y_pred: Any, spec: DatasetSpec) -> float:
    """The task's primary metric of given predictions against labels (labels compared as text for classes, so a
    served 1 matches a label read as 1.0)."""
    from flywheel.tasks.drift import class_labels

    y, p = pd.Series(np.asarray(y_true)), pd.Series(np.asarray(y_pred))
    if spec.task == "regression":
        return regression_metrics(y.astype(float), p.astype(float))[primary_metric("regression")]
    y, p = class_labels(y), class_labels(p)
    if spec.task == "multiclass":
        return round(float(skm.f1_score(y, p, average="macro", zero_division=0)), 6)
    positive = class_labels(pd.Series([spec.positive_class]))[0]
    return round(float(skm.f1_score(y, p, pos_label=positive, zero_division=0)), 6)


BASELINE_NAMES = {"binary": "majority class", "multiclass": "majority class", "regression": "mean"}


def baseline_model(task: str) -> Any:
    """The trivial model a candidate must beat: the majority class, with the class shares as its probabilities
    (so ROC-AUC 0.5), for classification; the training mean for regression. It ignores the features."""
    from sklearn.dummy import DummyClassifier, DummyRegressor

    return DummyRegressor(strategy="mean") if task == "regression" else DummyClassifier(strategy="prior")


def baseline_metrics(
    X_train: pd.DataFrame, y_train: pd.Series, X_test: pd.DataFrame, y_test: pd.Series, spec: DatasetSpec,
    positive: Any = None,
) -> dict[str, float]:  # fmt: skip
    """The trivial baseline fitted on the training split and scored on the same holdout as the candidate."""
    model = baseline_model(spec.task).fit(X_train, y_train)
    return evaluate_model(model, X_test, y_test, spec, positive)


def confusion_figure(model: Any, X: pd.DataFrame, y: pd.Series, title: str = "Holdout confusion matrix"):
    """A matplotlib figure of the confusion matrix (logged to MLflow as an image)."""
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    disp = ConfusionMatrixDisplay.from_predictions(y, model.predict(X), colorbar=False)
    disp.ax_.set_title(title)
    disp.figure_.tight_layout()
    return disp.figure_


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate(model: Any, X: pd.DataFrame, y: pd.Series, spec: DatasetSpec, positive: Any = None) -> dict[str, float]:
    return evaluate_model(model, X, y, spec, positive)
