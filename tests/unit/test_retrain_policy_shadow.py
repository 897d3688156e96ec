"""The shadow challenger (issue 16 item 2): with labels, a retraining is decided by the question it asks — would
the candidate a retraining makes now beat the champion on the latest labelled period? — with the gain's paired
bootstrap bound as the tolerance, so noise does not retrain; the champion's fall below its own holdout decides
only where no challenger could be compared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from drift_results import drift_result

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import training
from flywheel.tasks.model_specs import ModelSpec
from flywheel.tasks.retrain_policy import (
    SIGNAL_LABELS,
    LabelEvidence,
    paired_gain,
    shadow_challenger,
    should_retrain,
)
from flywheel.tasks.validation import DataValidationError

NOW = pd.Timestamp("2020-07-01", tz="UTC")
BINARY = DatasetSpec(name="t", source="x", target="y", positive_class=1, numeric=["x1", "x2"], categorical=["c"],
                     event_time="t", drift_window="1 month", retrain_window="3 months")  # fmt: skip


def decide(ev: LabelEvidence):
    return should_retrain(drift_result(rows=3000), now_event_time=NOW, last_retrain_event_time=None, cooldown=30,
                          min_rows=500, in_flight=False, labels=ev)  # fmt: skip


def compared(live=0.80, holdout=0.80, challenger=0.85, lower=0.01) -> LabelEvidence:
    return LabelEvidence("f1", 3000, "1", live, holdout, challenger_version="shadow", challenger_live=challenger,
                         champion_same_rows=live, gain_lower=lower)  # fmt: skip


# --------------------------------------------------------------------------------------------------- bootstrap
def labels_and_guesses(seed: int, n: int, *accuracies: float) -> tuple:
    """`n` binary labels, then one model's predictions per accuracy (each right with that probability)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return (y, *(np.where(rng.random(n) < acc, y, 1 - y) for acc in accuracies))


def test_a_clearly_better_challenger_has_a_positive_lower_bound():
    y, good, poor = labels_and_guesses(0, 4000, 0.9, 0.7)
    est = paired_gain(y, poor, good, BINARY)
    assert est.gain > 0.1 and est.lower > 0.1 and est.rows == 4000
    assert paired_gain(y, good, poor, BINARY).lower < 0  # the other way round it is worse


def test_equally_good_models_are_not_significantly_different():
    y, a, b = labels_and_guesses(1, 3000, 0.8, 0.8)
    est = paired_gain(y, a, b, BINARY)
    assert est.lower < 0 < est.lower + 0.05  # an interval around a noise-sized gain, not a proof of one
    same = paired_gain(y, a, a, BINARY)
    assert same.gain == 0 and same.lower == 0


def test_rmse_gain_is_positive_when_the_challenger_errs_less():
    spec = DatasetSpec(name="r", source="x", target="y", task="regression", numeric=["x1"])
    rng = np.random.default_rng(2)
    y = rng.normal(size=2000)
    est = paired_gain(y, y + rng.normal(scale=1.0, size=2000), y + rng.normal(scale=0.5, size=2000), spec)
    assert est.gain > 0.3 and est.lower > 0.3


def test_macro_f1_gain_for_multiclass_labels_compared_as_text():
    spec = DatasetSpec(name="m", source="x", target="y", task="multiclass", numeric=["x1"])
    rng = np.random.default_rng(3)
    y = rng.choice(["a", "b", "c"], 2000)
    noisy = np.where(rng.random(2000) < 0.5, y, "a")
    est = paired_gain(y, noisy, y, spec)
    assert est.gain > 0.2 and est.lower > 0.2


# --------------------------------------------------------------------------------------------------- decisions
def test_a_significantly_better_challenger_retrains_and_says_its_bound():
    decision = decide(compared(challenger=0.85, lower=0.02))
    assert decision.retrain is True and decision.signal == SIGNAL_LABELS
    assert any("97.5% lower bound > 0, here +0.020" in r for r in decision.reasons)


def test_a_gain_within_noise_does_not_retrain():
    decision = decide(compared(challenger=0.81, lower=-0.004))
    assert decision.retrain is False and decision.signal == SIGNAL_LABELS
    assert any("+0.010" in r and "here -0.004" in r for r in decision.reasons)


def test_a_gain_below_the_uplift_does_not_retrain_even_when_significant():
    assert decide(compared(challenger=0.803, lower=0.001)).retrain is False


def test_a_decayed_champion_is_only_reported_when_no_challenger_beats_it():
    """A hard season makes every model worse: the champion far below its holdout, a fresh candidate no better."""
    decision = decide(compared(live=0.40, holdout=0.80, challenger=0.40, lower=-0.01))
    assert decision.retrain is False
    assert any("reported, the challenger comparison decides" in r for r in decision.reasons)
    alone = LabelEvidence("f1", 3000, "1", 0.40, 0.80)  # no challenger compared: the decay decides
    assert decide(alone).retrain is True


# --------------------------------------------------------------------------------------------------- shadow
def months(n: int, shift_from: int | None = None, rows: int = 800, seed: int = 0) -> pd.DataFrame:
    """Monthly rows whose target depends on x1 and x2; from `shift_from` on the relation flips (concept drift)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        t0 = pd.Timestamp("2020-01-01", tz="UTC") + pd.DateOffset(months=k)
        t = t0 + (t0 + pd.DateOffset(months=1) - t0) * np.sort(rng.random(rows))
        x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
        score = x1 + x2 if shift_from is None or k < shift_from else -(x1 + x2)
        y = (score + rng.normal(scale=0.3, size=rows) > 0).astype(int)
        frames.append(pd.DataFrame({"t": t, "x1": x1, "x2": x2, "c": rng.choice(["a", "b"], rows), "y": y}))
    return pd.concat(frames, ignore_index=True)


LINEAR = ModelSpec(name="lr", estimator="logistic_regression")  # fast: unit tests fit no boosted trees


def champion_on(frame: pd.DataFrame):
    X, y = training.feature_frame(frame, BINARY), training.target_series(frame, BINARY)
    parts = training.Split(X, X.iloc[:0], y, y.iloc[:0])
    return training.train_model(parts, BINARY, LINEAR, 42)


def test_the_shadow_candidate_beats_a_champion_the_world_left_behind():
    data = months(6, shift_from=2)
    champion = champion_on(data.iloc[:1600])  # months 0-1, before the change
    window = data.iloc[3 * 800 :]  # months 3-5: the retrain window ending now
    shadow = shadow_challenger(window, BINARY, champion, model_spec=LINEAR)
    assert shadow is not None and "time-honest holdout" in shadow.note
    assert shadow.estimate.rows == 800  # the latest month, which neither model was trained on
    assert shadow.challenger > shadow.champion + 0.3 and shadow.estimate.lower > 0
    ev = shadow.attach(LabelEvidence("f1", 800, "1", shadow.champion, 0.9))
    decision = decide(ev)
    assert decision.retrain is True and any("shadow candidate" in r for r in decision.reasons)


def test_no_shadow_retraining_when_nothing_changed():
    data = months(6)
    champion = champion_on(data.iloc[:1600])
    shadow = shadow_challenger(data.iloc[3 * 800 :], BINARY, champion, model_spec=LINEAR)
    ev = shadow.attach(LabelEvidence("f1", 800, "1", shadow.champion, shadow.champion))
    assert shadow.estimate.lower <= 0 and decide(ev).retrain is False


def test_a_window_the_train_flow_would_refuse_raises_its_validation_error():
    data = months(3)
    data["x2"] = np.nan
    with pytest.raises(DataValidationError):
        shadow_challenger(data, BINARY, champion_on(months(2)), model_spec=LINEAR)


# --------------------------------------------------------------------------------------------------- the task
def test_shadow_check_pulls_the_retrain_window_and_takes_the_uplift_from_the_spec(monkeypatch):
    from flywheel.core.spec import GateSpec
    from flywheel.tasks import data, registry, retrain_policy
    from flywheel.tasks.retrain_policy import GainEstimate, ShadowChallenger, shadow_check

    spec = BINARY.model_copy(update={"time_zone": "America/New_York", "gate": GateSpec(min_uplift=0.02)})
    pulled = {}
    monkeypatch.setattr(data, "pull_dataset", lambda s, start, end: pulled.update(start=start, end=end) or months(1))
    monkeypatch.setattr(registry, "load_sklearn_model", lambda name, version: "champion-model")
    monkeypatch.setattr(retrain_policy, "shadow_challenger", lambda frame, s, champ, **kw: ShadowChallenger(
        0.70, 0.73, GainEstimate(0.03, 0.01, 0.9, 500), "time-honest holdout: the last 1 month"))  # fmt: skip
    hi = pd.Timestamp("2013-10-01", tz="America/New_York")
    ev = shadow_check.fn(spec, "m", "3", hi, LabelEvidence("f1", 900, "3", 0.70, 0.72))
    assert pulled == {"start": "2013-07-01T04:00:00+00:00", "end": "2013-10-01T04:00:00+00:00"}  # New York months
    assert ev.challenger_version == "shadow" and ev.challenger_live == 0.73 and ev.min_uplift == 0.02
    decision = decide(ev)
    assert decision.retrain is True  # +0.03 clears the spec's uplift of 0.02 with a bound above zero
    assert any("shadow candidate (time-honest holdout" in r and "needs >= 0.02" in r for r in decision.reasons)


def test_without_a_shadow_candidate_the_champions_holdout_decides_and_the_note_says_why(monkeypatch):
    from flywheel.tasks import data
    from flywheel.tasks.retrain_policy import shadow_check

    def refuse(*a, **k):
        raise DataValidationError(["x2: 100% missing"])

    monkeypatch.setattr(data, "pull_dataset", refuse)
    ev = shadow_check.fn(BINARY, "m", "3", NOW, LabelEvidence("f1", 900, "3", 0.40, 0.80))
    assert ev.challenger_version is None and "no shadow candidate" in ev.notes[0] and "100% missing" in ev.notes[0]
    decision = decide(ev)
    assert decision.retrain is True and any("no shadow candidate" in r for r in decision.reasons)
