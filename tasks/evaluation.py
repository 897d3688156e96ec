"""Evaluation: holdout metrics for a fitted model, and the confusion-matrix picture."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn import metrics as skm

from flywheel.core.spec import DatasetSpec

# Metrics where a larger value is better; the others (rmse, mae) are better when smaller.
HIGHER_IS_BETTER = {"accuracy", "precision", "recall", "f1", "roc_auc", "r2"}


def primary_metric(task: str) -> str:
    return "f1" if task == "binary" else "rmse"


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
    """Holdout metrics: accuracy/precision/recall/F1/ROC-AUC for binary, RMSE/MAE/R² for regression."""
    y_pred = model.predict(X)
    if spec.task == "regression":
        return regression_metrics(y, y_pred)
    positive = spec.positive_class if positive is None else positive
    return classification_metrics(y, y_pred, positive_scores(model, X, positive), positive)


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
