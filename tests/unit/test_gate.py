"""The promotion gate: floors for every model, uplift over the champion, and the decision's explanation."""

from __future__ import annotations

import pytest

from flywheel.tasks.gate import GateDecision, GateThresholds, promotion_gate

# Absolute floors are off by default (the baseline comparison is the default bar): these tests set the floors the
# flights demo used to have as defaults, through the same fields FLYWHEEL_GATE_* fill.
T = GateThresholds(min_f1=0.30, min_roc_auc=0.60, min_r2=0.0)  # min_uplift 0.005, no RMSE ceiling


def binary(f1: float, roc_auc: float = 0.75) -> dict[str, float]:
    return {"accuracy": 0.8, "precision": 0.5, "recall": 0.5, "f1": f1, "roc_auc": roc_auc}


def regression(rmse: float, r2: float = 0.5) -> dict[str, float]:
    return {"rmse": rmse, "mae": rmse * 0.8, "r2": r2}


# --------------------------------------------------------------------------------------------------- binary
def test_first_model_is_judged_on_floors_only():
    decision = promotion_gate(binary(0.45), None, task="binary", thresholds=T)
    assert decision.passed
    assert decision.metric == "f1"
    assert decision.champion is None and decision.champion_version is None
    assert decision.reasons == ["f1 0.4500 >= 0.3 ok", "roc_auc 0.7500 >= 0.6 ok", "no champion yet: floors only"]


@pytest.mark.parametrize(("f1", "roc_auc", "failed"), [(0.29, 0.75, "f1"), (0.45, 0.59, "roc_auc"), (0.1, 0.5, "both")])
def test_floor_failure(f1, roc_auc, failed):
    decision = promotion_gate(binary(f1, roc_auc), None, task="binary", thresholds=T)
    assert not decision.passed
    failures = [r for r in decision.reasons if "FAILED (floor)" in r]
    names = ["f1", "roc_auc"] if failed == "both" else [failed]
    assert [r.split()[0] for r in failures] == names


def test_floor_is_inclusive():
    assert promotion_gate(binary(0.30, 0.60), None, task="binary", thresholds=T).passed


def test_floor_failure_is_not_rescued_by_uplift():
    decision = promotion_gate(binary(0.25), binary(0.10), task="binary", thresholds=T, champion_version="3")
    assert not decision.passed
    assert any("FAILED (floor)" in r for r in decision.reasons)
    assert any("uplift" in r and r.endswith("ok") for r in decision.reasons)


def test_uplift_over_champion_passes():
    decision = promotion_gate(binary(0.50), binary(0.45), task="binary", thresholds=T, champion_version="2")
    assert decision.passed
    assert decision.reasons[-1].startswith("f1 uplift over champion v2: +0.0500 (candidate 0.5000 vs champion 0.4500")
    assert decision.reasons[-1].endswith("ok")


@pytest.mark.parametrize("candidate_f1", [0.45, 0.452, 0.40], ids=["equal", "below-min-uplift", "worse"])
def test_too_little_uplift_fails(candidate_f1):
    decision = promotion_gate(binary(candidate_f1), binary(0.45), task="binary", thresholds=T, champion_version="2")
    assert not decision.passed
    assert decision.reasons[-1].endswith("FAILED (uplift)")
    assert all(r.endswith("ok") for r in decision.reasons[:-1])  # the floors themselves were fine


def test_min_uplift_is_configurable():
    lenient = GateThresholds(min_uplift=0.0)
    assert promotion_gate(binary(0.45), binary(0.45), task="binary", thresholds=lenient, champion_version="1").passed
    strict = GateThresholds(min_uplift=0.1)
    assert not promotion_gate(binary(0.5), binary(0.45), task="binary", thresholds=strict, champion_version="1").passed


# --------------------------------------------------------------------------------------------------- regression
def test_regression_lower_rmse_is_better():
    decision = promotion_gate(regression(9.0), regression(10.0), task="regression", thresholds=T, champion_version="4")
    assert decision.metric == "rmse"
    assert decision.passed
    assert "rmse uplift over champion v4: +1.0000" in decision.reasons[-1]


def test_regression_higher_rmse_fails():
    decision = promotion_gate(regression(11.0), regression(10.0), task="regression", thresholds=T, champion_version="4")
    assert not decision.passed
    assert "-1.0000" in decision.reasons[-1] and decision.reasons[-1].endswith("FAILED (uplift)")


def test_regression_floors():
    assert promotion_gate(regression(5.0, r2=0.1), None, task="regression", thresholds=T).passed
    assert not promotion_gate(regression(5.0, r2=-0.2), None, task="regression", thresholds=T).passed
    capped = GateThresholds(min_r2=0.0, max_rmse=4.0)
    decision = promotion_gate(regression(5.0), None, task="regression", thresholds=capped)
    assert not decision.passed
    assert "rmse 5.0000 <= 4.0 FAILED (floor)" in decision.reasons


def test_floors_per_task():
    assert GateThresholds().floors("binary") == {} and GateThresholds().floors("regression") == {}
    assert T.floors("binary") == {"f1": (">=", 0.30), "roc_auc": (">=", 0.60)}
    assert T.floors("regression") == {"r2": (">=", 0.0)}
    assert GateThresholds(min_r2=0.0, max_rmse=3.0).floors("regression") == {"r2": (">=", 0.0), "rmse": ("<=", 3.0)}


# --------------------------------------------------------------------------------------------------- the decision
def test_markdown_of_a_passed_gate():
    decision = promotion_gate(binary(0.50), binary(0.45), task="binary", thresholds=T, champion_version="2")
    md = decision.markdown("flights-late", "3")
    assert md.splitlines()[0] == "# Gate for `flights-late` v3: PASSED — promoted to `champion`"
    assert "| f1 | 0.5000 | 0.4500 |" in md
    assert "Champion: v2. Primary metric: `f1`." in md
    for reason in decision.reasons:
        assert f"- {reason}" in md


def test_markdown_of_a_failed_first_model():
    decision = promotion_gate(binary(0.1), None, task="binary", thresholds=T)
    md = decision.markdown("m", "1")
    assert "FAILED — stays `challenger`" in md
    assert "| f1 | 0.1000 |  |" in md
    assert "Champion: none (first model: floors only)." in md
    assert "- f1 0.1000 >= 0.3 FAILED (floor)" in md


def test_decision_as_dict():
    decision = promotion_gate(regression(9.0), regression(10.0), task="regression", thresholds=T, champion_version="4")
    d = decision.as_dict()
    assert d["passed"] is True and d["metric"] == "rmse" and d["champion_version"] == "4"
    assert d["candidate"] == regression(9.0) and d["reasons"] == decision.reasons
    assert GateDecision(**d) == decision
