"""Label-aware retraining (issue 16 item 2): with labels, the champion's quality on recent labelled traffic
decides — against its own holdout with a stated tolerance, and against the challenger on the same rows; data drift
is then only noted. Without labels data drift decides. The decision names its signal."""

from __future__ import annotations

import pandas as pd

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import monitoring
from flywheel.tasks.drift import DriftResult
from flywheel.tasks.evaluation import score_predictions
from flywheel.tasks.retrain_policy import SIGNAL_DRIFT, SIGNAL_LABELS, LabelEvidence, should_retrain

NOW = pd.Timestamp("2013-10-01", tz="UTC")


def result(drift: bool) -> DriftResult:
    return DriftResult(
        dataset_drift=drift, drift_share=0.67 if drift else 0.2, drift_share_threshold=0.55,
        n_drifted=8 if drift else 2, n_columns=12, columns=[], rows_reference=20_000, rows_current=25_000,
        rows_reference_used=20_000, rows_current_used=25_000, sampled=False, sample_cap=50_000,
    )  # fmt: skip


def decide(drift: bool, labels: LabelEvidence | None, last=None):
    return should_retrain(result(drift), now_event_time=NOW, last_retrain_event_time=last, cooldown=30,
                          min_rows=500, in_flight=False, labels=labels)  # fmt: skip


def evidence(live: float, holdout: float = 0.45, **kw) -> LabelEvidence:
    return LabelEvidence("f1", 25_000, "3", live, holdout, tolerance=0.10, **kw)


def test_seasonal_drift_with_healthy_labels_does_not_retrain():
    decision = decide(True, evidence(live=0.43))
    assert decision.retrain is False and decision.signal == SIGNAL_LABELS
    assert any("tolerance 10%" in r for r in decision.reasons)
    assert any(r.startswith("data drift noted, labels decide") for r in decision.reasons)


def test_quality_decay_on_labels_retrains_without_any_drift():
    decision = decide(False, evidence(live=0.30))
    assert decision.retrain is True and decision.signal == SIGNAL_LABELS
    assert decision.reasons[0].startswith("labels: champion v3 f1 0.300 on 25,000")


def test_a_challenger_better_on_the_same_rows_retrains():
    ev = evidence(live=0.44, challenger_version="4", challenger_live=0.50, champion_same_rows=0.44)
    decision = decide(False, ev)
    assert decision.retrain is True and any("challenger v4" in r and "same 25,000 rows" in r for r in decision.reasons)
    worse = evidence(live=0.44, challenger_version="4", challenger_live=0.40, champion_same_rows=0.44)
    assert decide(False, worse).retrain is False


def test_without_labels_or_with_too_few_drift_decides():
    assert decide(True, None).signal == SIGNAL_DRIFT and decide(True, None).retrain is True
    few = LabelEvidence("f1", 50, "3", 0.1, 0.45)
    decision = decide(False, few)
    assert decision.signal == SIGNAL_DRIFT and decision.retrain is False
    assert any("only 50 labelled rows" in r for r in decision.reasons)


def test_a_label_trigger_still_respects_the_cooldown():
    decision = decide(False, evidence(live=0.2), last=NOW - pd.Timedelta(days=5))
    assert decision.retrain is False and any("in cooldown" in r for r in decision.reasons)


def test_lower_is_better_metrics_decay_upwards():
    ev = LabelEvidence("rmse", 1000, "1", live=12.0, holdout=10.0, tolerance=0.1)
    assert decide(False, ev).retrain is True
    assert decide(False, LabelEvidence("rmse", 1000, "1", live=10.5, holdout=10.0)).retrain is False


def test_labels_join_by_request_id_and_row_within_the_request():
    served = pd.DataFrame({"request_id": ["a", "a", "b"], "prediction": [1, 0, 1], "model_version": "3",
                           "x": [1.0, 2.0, 3.0]})  # fmt: skip
    labels = pd.DataFrame({"request_id": ["a", "a", "b"], "row": [1, 0, 0], "late": [1, 0, 1]})
    joined = monitoring._join_labels(served, labels, "late", "current", "labels/")
    assert joined.sort_values(["request_id", "row"])["late"].tolist() == [0, 1, 1]
    assert joined.loc[joined["x"] == 2.0, "late"].item() == 1


def test_served_predictions_score_against_labels_as_text():
    spec = DatasetSpec(source="x", target="late", positive_class=1, numeric=["x"])
    assert score_predictions([1.0, 0.0, 1.0], [1, 0, 1], spec) == 1.0
