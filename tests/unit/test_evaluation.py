"""Evaluation: metrics on tiny cases that can be checked by hand, and the confusion-matrix figure."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from flywheel.core.spec import DatasetSpec
from flywheel.tasks.evaluation import (
    HIGHER_IS_BETTER,
    classification_metrics,
    confusion_figure,
    evaluate,
    evaluate_model,
    positive_scores,
    primary_metric,
    regression_metrics,
)


class FixedModel:
    """A stand-in for a fitted classifier with known predictions and scores."""

    def __init__(self, pred, proba=None, classes=(0, 1)):
        self.pred = np.asarray(pred)
        self.classes_ = np.asarray(classes)
        if proba is not None:
            self.proba = np.asarray(proba, dtype=float)

    def predict(self, X):
        return self.pred[: len(X)]

    def predict_proba(self, X):
        if not hasattr(self, "proba"):
            raise AttributeError("predict_proba")
        return self.proba[: len(X)]


class NoProba:
    def __init__(self, pred):
        self.pred = np.asarray(pred)

    def predict(self, X):
        return self.pred


X4 = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0]})
BINARY = DatasetSpec(source="x", target="y", positive_class=1, numeric=["a"])
REGRESSION = DatasetSpec(source="x", target="y", task="regression", numeric=["a"])


def with_scores(pos_scores):
    """predict_proba columns for classes (negative, positive)."""
    s = np.asarray(pos_scores)
    return np.column_stack([1 - s, s])


def test_binary_metrics_by_hand():
    # truth 1 1 0 0, predicted 1 0 0 0: TP=1 FN=1 TN=2 FP=0.
    # Scores 0.9 0.2 | 0.3 0.1: of the 4 (positive, negative) pairs, 3 are ranked right → AUC 0.75.
    y = pd.Series([1, 1, 0, 0])
    model = FixedModel([1, 0, 0, 0], with_scores([0.9, 0.2, 0.3, 0.1]))
    assert evaluate_model(model, X4, y, BINARY) == {
        "accuracy": 0.75,
        "precision": 1.0,
        "recall": 0.5,
        "f1": 0.666667,
        "roc_auc": 0.75,
    }


def test_binary_metrics_with_string_labels():
    y = pd.Series(["no", "yes", "yes", "no"])
    # predicted: yes yes no no → TP=1 FP=1 FN=1 TN=1
    model = FixedModel(["yes", "yes", "no", "no"], with_scores([0.8, 0.7, 0.1, 0.2]), classes=("no", "yes"))
    spec = BINARY.with_overrides(positive_class="yes")
    metrics = evaluate_model(model, X4, y, spec)
    assert (metrics["accuracy"], metrics["precision"], metrics["recall"], metrics["f1"]) == (0.5, 0.5, 0.5, 0.5)
    # "yes" scores 0.7, 0.1 against "no" scores 0.8, 0.2: only 0.7 > 0.2 of the 4 pairs is ranked right.
    assert metrics["roc_auc"] == 0.25


def test_positive_given_explicitly_overrides_the_spec():
    # Labels read as text while the spec says 1: the caller passes positive_label()'s answer, "1".
    y = pd.Series(["1", "1", "0", "0"])
    model = FixedModel(["1", "0", "0", "0"], with_scores([0.9, 0.2, 0.3, 0.1]), classes=("0", "1"))
    metrics = evaluate_model(model, X4, y, BINARY, positive="1")
    assert (metrics["recall"], metrics["roc_auc"]) == (0.5, 0.75)


def test_positive_scores_pick_the_positive_column():
    model = FixedModel([0] * 4, np.array([[0.1, 0.9], [0.6, 0.4], [0.5, 0.5], [1.0, 0.0]]), classes=(1, 0))
    np.testing.assert_array_equal(positive_scores(model, X4, 1), [0.1, 0.6, 0.5, 1.0])
    np.testing.assert_array_equal(positive_scores(model, X4, "0"), [0.9, 0.4, 0.5, 0.0])
    assert positive_scores(NoProba([0]), X4, 1) is None


def test_no_roc_auc_without_scores_or_with_one_class():
    assert "roc_auc" not in evaluate_model(NoProba([1, 0, 0, 0]), X4, pd.Series([1, 1, 0, 0]), BINARY)
    one_class = classification_metrics(pd.Series([0, 0, 0, 0]), [0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9], 1)
    assert "roc_auc" not in one_class
    assert one_class["precision"] == 0.0 and one_class["accuracy"] == 0.75


def test_all_negative_predictions_score_zero_f1_without_warning_noise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(pd.Series([1, 0, 0, 0]), [0, 0, 0, 0], None, 1)
    assert metrics == {"accuracy": 0.75, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_regression_metrics_by_hand():
    # errors 0 0 0 2: MSE 1 → RMSE 1; MAE 0.5; R² = 1 - 4 / 5 = 0.2 (total sum of squares of 1..4 is 5).
    assert regression_metrics(pd.Series([1.0, 2.0, 3.0, 4.0]), [1.0, 2.0, 3.0, 6.0]) == {
        "rmse": 1.0,
        "mae": 0.5,
        "r2": 0.2,
    }


def test_evaluate_model_regression():
    model = NoProba(np.array([1.0, 2.0, 3.0, 6.0]))
    assert evaluate_model(model, X4, pd.Series([1.0, 2.0, 3.0, 4.0]), REGRESSION)["r2"] == 0.2


def test_evaluate_task_wrapper():
    model = FixedModel([1, 0, 0, 0], with_scores([0.9, 0.2, 0.3, 0.1]))
    assert evaluate.fn(model, X4, pd.Series([1, 1, 0, 0]), BINARY)["f1"] == 0.666667


def test_metric_values_are_plain_floats():
    model = FixedModel([1, 0, 0, 0], with_scores([0.9, 0.2, 0.3, 0.1]))
    metrics = evaluate_model(model, X4, pd.Series([1, 1, 0, 0]), BINARY)
    assert all(type(v) is float for v in metrics.values())


@pytest.mark.parametrize(("task", "metric", "higher"), [("binary", "f1", True), ("regression", "rmse", False)])
def test_primary_metric_and_its_direction(task, metric, higher):
    assert primary_metric(task) == metric
    assert (metric in HIGHER_IS_BETTER) is higher


def test_confusion_figure():
    import matplotlib.pyplot as plt

    model = FixedModel([1, 0, 0, 0, 1, 1])
    fig = confusion_figure(model, pd.DataFrame({"a": range(6)}), pd.Series([1, 1, 0, 0, 0, 1]), title="holdout")
    try:
        ax = fig.axes[0]
        assert ax.get_title() == "holdout"
        cells = sorted(int(t.get_text()) for t in ax.texts)
        assert cells == [1, 1, 2, 2]  # TN=2 FP=1 FN=1 TP=2
    finally:
        plt.close(fig)


def test_confusion_figure_of_the_flights_model(flights_model, january_split):
    import matplotlib.pyplot as plt

    fig = confusion_figure(flights_model, january_split.X_test, january_split.y_test)
    try:
        assert sum(int(t.get_text()) for t in fig.axes[0].texts) == len(january_split.y_test)
    finally:
        plt.close(fig)
