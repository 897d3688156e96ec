"""When to retrain: the decision a drift check takes from what it measured, with the signal that decided it.

With labels (late ground truth joined to served rows) the labels decide, by the question a retraining asks: would
the model it makes now beat the champion? `shadow_challenger` fits the train flow's candidate on the retrain
window with the train flow's split (time-honest: trained before the latest period) and scores it and the champion
on that latest labelled period; it retrains when the gain clears the gate's uplift and a paired bootstrap over the
rows puts it above zero with the stated confidence, so noise does not retrain. A registered challenger is compared
the same way where no shadow candidate could be fitted; with neither, the champion's fall below its own holdout
(beyond a stated tolerance) decides. Data drift is then reported but does not decide: seasonal columns drift
whether or not the model decays. Without labels, data drift (or Evidently's quality decay, when it has labels of
its own) is the only signal. Enough rows, no training run in flight and the cooldown (tasks/drift_windows.py) then
gate the trigger. Plain functions: the bench (bench/replay.py) replays the same decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.spec import Period
from flywheel.tasks.drift import DEFAULT_MAX_QUALITY_DECAY, DriftResult
from flywheel.tasks.drift_windows import check_cooldown
from flywheel.tasks.evaluation import HIGHER_IS_BETTER

DEFAULT_LABEL_TOLERANCE = 0.10  # relative fall of the primary metric against the champion's holdout
DEFAULT_MIN_LABEL_ROWS = 200  # fewer labelled rows: the label signal is noise, drift decides
DEFAULT_CHALLENGER_UPLIFT = 0.005  # the gate's default min uplift
DEFAULT_CONFIDENCE = 0.975  # one-sided: the challenger's gain over the champion is above zero with this confidence
BOOTSTRAP_SAMPLES = 300

SIGNAL_LABELS = "labels"
SIGNAL_DRIFT = "data drift"
SIGNAL_NONE = "none"


@dataclass
class RetrainDecision:
    retrain: bool
    reasons: list[str] = field(default_factory=list)
    signal: str = SIGNAL_NONE  # which signal decided: "labels", "data drift" or "none" (nothing to decide on)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LabelEvidence:
    """The champion's primary metric on recent labelled served rows, its own holdout value, and (where a
    challenger exists) both scored on the same rows."""

    metric: str
    rows: int
    champion_version: str
    live: float
    holdout: float | None
    tolerance: float = DEFAULT_LABEL_TOLERANCE
    challenger_version: str | None = None
    challenger_live: float | None = None  # the challenger on the same rows
    champion_same_rows: float | None = None  # the champion on the rows the challenger was scored on
    min_uplift: float = DEFAULT_CHALLENGER_UPLIFT
    gain_lower: float | None = None  # the gain's lower bound at `confidence` (paired bootstrap), when measured
    confidence: float = DEFAULT_CONFIDENCE
    challenger_rows: int | None = None  # rows the challenger comparison was scored on, when not `rows`
    challenger_note: str | None = None  # what the challenger is (e.g. the shadow candidate and its split)
    notes: list[str] = field(default_factory=list)  # observations that decide nothing (why no shadow candidate)

    def worse_by(self, reference: float, value: float) -> float:
        """How much worse `value` is than `reference`, relative (> 0 worse)."""
        if reference == 0:
            return 0.0
        worse = (reference - value) if self.metric in HIGHER_IS_BETTER else (value - reference)
        return worse / abs(reference)

    def gain(self, champion: float, challenger: float) -> float:
        return challenger - champion if self.metric in HIGHER_IS_BETTER else champion - challenger

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_triggers(ev: LabelEvidence) -> tuple[list[str], list[str]]:
    """(triggers, observations) of the label signal. A challenger compared on the same rows decides; the
    champion's fall below its own holdout decides only where no challenger could be compared (a fall that every
    model a retraining could make shares, e.g. a hard season, is no reason to retrain)."""
    triggers, seen = [], []
    m = ev.metric
    compared = ev.challenger_version is not None and ev.challenger_live is not None
    if ev.holdout is not None:
        decay = ev.worse_by(ev.holdout, ev.live)
        text = (
            f"labels: champion v{ev.champion_version} {m} {ev.live:.3f} on {ev.rows:,} recent labelled rows vs "
            f"{ev.holdout:.3f} on its holdout ({abs(decay):.0%} {'worse' if decay > 0 else 'better'}; tolerance "
            f"{ev.tolerance:.0%} worse)"
        )
        if compared and decay > ev.tolerance:
            text += ": reported, the challenger comparison decides"
        (triggers if decay > ev.tolerance and not compared else seen).append(text)
    else:
        seen.append(f"labels: champion v{ev.champion_version} {m} {ev.live:.3f} on {ev.rows:,} rows (no holdout value)")
    if compared:
        base = ev.live if ev.champion_same_rows is None else ev.champion_same_rows
        gain = ev.gain(base, ev.challenger_live)
        rows = ev.challenger_rows if ev.challenger_rows is not None else ev.rows
        what = ev.challenger_note or f"challenger v{ev.challenger_version}"
        needs = f"needs >= {ev.min_uplift}"
        ok = gain >= ev.min_uplift
        if ev.gain_lower is not None:
            needs += f" and a {ev.confidence * 100:g}% lower bound > 0, here {ev.gain_lower:+.3f}"
            ok = ok and ev.gain_lower > 0
        text = f"labels: {what} {m} {ev.challenger_live:.3f} vs champion {base:.3f} on the same {rows:,} rows "
        text += f"({gain:+.3f}; {needs})"
        (triggers if ok else seen).append(text)
    seen += ev.notes
    return triggers, seen


# --------------------------------------------------------------------------------------------------- statistics
def _metric_samples(y: np.ndarray, pred: np.ndarray, weights: np.ndarray, task: str, positive) -> np.ndarray:
    """The task's primary metric under each row of bootstrap `weights` (samples × rows)."""
    if task == "regression":
        err = (pred.astype(float) - y.astype(float)) ** 2
        return np.sqrt(weights @ err / np.maximum(weights.sum(axis=1), 1e-12))
    classes = [positive] if task == "binary" else sorted(set(y) | set(pred))
    scores = []
    for c in classes:
        is_y, is_p = y == c, pred == c
        tp = weights @ (is_y & is_p).astype(np.float32)
        wrong = weights @ (is_y ^ is_p).astype(np.float32)  # false positives + false negatives
        denom = 2 * tp + wrong
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0))
    return np.mean(scores, axis=0)


@dataclass
class GainEstimate:
    """A challenger's gain over the champion on the same rows (> 0 better) and its one-sided lower bound."""

    gain: float
    lower: float
    confidence: float
    rows: int


def paired_gain(y_true, champion_pred, challenger_pred, spec, *, confidence: float = DEFAULT_CONFIDENCE,
                samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> GainEstimate:  # fmt: skip
    """The challenger's gain on the primary metric over the champion on the same labelled rows, with the lower
    bound of a paired bootstrap (both scored on each resample of the rows, Poisson weights) at `confidence`."""
    from flywheel.tasks.drift import class_labels
    from flywheel.tasks.evaluation import primary_metric, score_predictions

    y, a, b = (pd.Series(np.asarray(v)) for v in (y_true, champion_pred, challenger_pred))
    point = score_predictions(y, b, spec) - score_predictions(y, a, spec)
    positive = None
    if spec.task != "regression":
        y, a, b = class_labels(y), class_labels(a), class_labels(b)
        positive = class_labels(pd.Series([spec.positive_class]))[0] if spec.task == "binary" else None
    sign = 1.0 if primary_metric(spec.task) in HIGHER_IS_BETTER else -1.0
    rng = np.random.default_rng(seed)
    y, a, b = y.to_numpy(), a.to_numpy(), b.to_numpy()
    gains = []
    for chunk in np.array_split(np.arange(samples), max(1, samples * len(y) // 4_000_000)):
        w = rng.poisson(1.0, size=(len(chunk), len(y))).astype(np.float32)
        gains.append(sign * (_metric_samples(y, b, w, spec.task, positive) - _metric_samples(y, a, w, spec.task,
                                                                                             positive)))  # fmt: skip
    lower = float(np.quantile(np.concatenate(gains), 1 - confidence))
    return GainEstimate(round(sign * point, 6), round(lower, 6), confidence, len(y))


@dataclass
class ShadowChallenger:
    """The candidate a retraining would make now, scored with the champion on its time-honest holdout."""

    champion: float
    challenger: float
    estimate: GainEstimate
    note: str
    model: Any = field(default=None, repr=False)

    def attach(self, ev: LabelEvidence) -> LabelEvidence:
        """The evidence with this comparison as its challenger (it replaces a registered challenger: this one is
        what a retraining would make of the latest data)."""
        ev.challenger_version, ev.challenger_live, ev.champion_same_rows = "shadow", self.challenger, self.champion
        ev.gain_lower, ev.confidence = self.estimate.lower, self.estimate.confidence
        ev.challenger_rows = self.estimate.rows
        ev.challenger_note = f"shadow candidate ({self.note})"
        return ev


def shadow_challenger(frame: pd.DataFrame, spec, champion_model, *, seed: int = 42, model_spec=None,
                      confidence: float = DEFAULT_CONFIDENCE, min_rows: int = 200,
                      max_null_share: float = 0.3) -> ShadowChallenger | None:  # fmt: skip
    """The train flow's candidate on `frame` (the retrain window ending now): its validation (a window the train
    flow would refuse raises its DataValidationError), its split (time-honest for event-time data: trained before
    the latest period, held out on it), its default model; then it and the champion scored on the holdout with the
    gain's bootstrap bound. None when the window gives no holdout to compare on."""
    from flywheel.tasks import model_specs, training
    from flywheel.tasks.evaluation import holdout_note, score_predictions
    from flywheel.tasks.validation import labelled_rows, validate_dataset

    validate_dataset(frame, spec, min_rows=min_rows, max_null_share=max_null_share)
    frame = labelled_rows(frame, spec)
    parts = getattr(training.split, "fn", training.split)(frame, spec, seed)
    if len(parts.X_test) == 0 or len(parts.X_train) == 0:
        return None
    model = training.train_model(parts, spec, model_spec or model_specs.default_model_spec(spec.task), seed)
    champ, chall = champion_model.predict(parts.X_test), model.predict(parts.X_test)
    est = paired_gain(parts.y_test, champ, chall, spec, confidence=confidence, seed=seed)
    note = holdout_note(parts.X_test)["note"].split(";")[0]
    return ShadowChallenger(score_predictions(parts.y_test, champ, spec), score_predictions(parts.y_test, chall, spec),
                            est, note, model)  # fmt: skip


def drift_triggers(result: DriftResult, max_quality_decay: float) -> list[str]:
    triggers: list[str] = []
    if result.dataset_drift:
        top = ", ".join(c.column for c in result.drifted_columns[:5])
        triggers.append(
            f"dataset drift: {result.n_drifted}/{result.n_columns} columns drifted "
            f"(share {result.drift_share:.2f} >= {result.drift_share_threshold:.2f}): {top}"
        )
    if result.quality_decay is not None and result.quality_decay > max_quality_decay:
        m = result.quality_metric
        ref = (result.quality or {}).get("reference", {}).get(m)
        cur = (result.quality or {}).get("current", {}).get(m)
        triggers.append(
            f"quality decay: {m} {ref:.3f} -> {cur:.3f} ({result.quality_decay:.0%} worse > {max_quality_decay:.0%})"
        )
    return triggers


def _no_drift(result: DriftResult) -> str:
    why = f"no dataset drift (share {result.drift_share:.2f} < {result.drift_share_threshold:.2f}"
    why += f", {result.n_drifted}/{result.n_columns} columns)"
    if result.quality_decay is not None:
        why += f" and no quality decay ({result.quality_metric} {result.quality_decay:+.0%})"
    return why


def should_retrain(
    result: DriftResult,
    *,
    now_event_time,
    last_retrain_event_time,
    cooldown: Period | Any,
    min_rows: int,
    in_flight: bool,
    max_quality_decay: float = DEFAULT_MAX_QUALITY_DECAY,
    labels: LabelEvidence | None = None,
    min_label_rows: int = DEFAULT_MIN_LABEL_ROWS,
    time_zone: str = "UTC",
) -> RetrainDecision:
    """Retrain when the deciding signal calls for it, with enough rows, outside the cooldown, none in flight.

    The deciding signal is the labels when at least `min_label_rows` labelled rows are given, data drift (and
    Evidently's quality decay) otherwise. Times are the data's own event times: `now_event_time` is the checked
    window's end, `last_retrain_event_time` the window end the last retraining was scheduled at. A bare number as
    `cooldown` is days; a Period ("1 month") counts on the calendar of `time_zone`.
    """
    drift_found = drift_triggers(result, max_quality_decay)
    if labels is not None and labels.rows >= min_label_rows:
        signal = SIGNAL_LABELS
        triggers, seen = label_triggers(labels)
        context = [f"data drift noted, labels decide: {t}" for t in drift_found] or [_no_drift(result)]
    else:
        signal = SIGNAL_DRIFT
        triggers, seen = drift_found, []
        context = []
        if labels is not None:
            context.append(f"labels: only {labels.rows} labelled rows (< {min_label_rows}): data drift decides")
    if not triggers:
        reasons = seen + context if signal == SIGNAL_LABELS else [_no_drift(result), *context]
        return RetrainDecision(False, reasons, signal)

    blockers: list[str] = []
    if result.rows_current < min_rows:
        blockers.append(f"too few current rows: {result.rows_current} < {min_rows}")
    if in_flight:
        blockers.append("a training run is already in flight")
    cool = check_cooldown(now_event_time, last_retrain_event_time, cooldown, time_zone)
    if cool.blocked:
        blockers.append(cool.reason)
    reasons = triggers + seen + context
    if blockers:
        return RetrainDecision(False, reasons + blockers, signal)
    return RetrainDecision(True, reasons + [cool.reason], signal)


@task(name="shadow-challenger", cache_policy=NO_CACHE)
def shadow_check(spec, model_name: str, champion_version: str, hi, evidence: LabelEvidence) -> LabelEvidence:
    """The label evidence with the shadow candidate of a retraining at `hi`: the spec's source over the retrain
    window before `hi` (what `train/on-drift` would pull), the champion loaded from the registry, the gate's
    uplift from the spec. A window it cannot compare on leaves the evidence as it was, with a note why."""
    from flywheel.core.settings import get_settings
    from flywheel.core.timeutil import utc_timestamp
    from flywheel.tasks import data, drift_windows, registry
    from flywheel.tasks.gate import thresholds_from_settings

    s = get_settings()
    plan = drift_windows.monitoring_plan(spec)
    lo, end = drift_windows.window_before(utc_timestamp(hi), plan.retrain_window, plan.time_zone)
    evidence.min_uplift = thresholds_from_settings(spec).min_uplift
    try:
        frame = data.pull_dataset(spec, lo.isoformat(), end.isoformat())
        champion = registry.load_sklearn_model(model_name, champion_version)
        shadow = shadow_challenger(frame, spec, champion, seed=s.seed, min_rows=s.min_rows,
                                   max_null_share=s.max_null_share)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - no comparison: the champion's holdout decides
        why = " ".join(str(exc).split())
        evidence.notes.append(f"no shadow candidate on [{lo.isoformat()}, {end.isoformat()}): "
                              f"{type(exc).__name__}: {why}"[:300])  # fmt: skip
        return evidence
    if shadow is None:
        evidence.notes.append(f"no shadow candidate: [{lo.isoformat()}, {end.isoformat()}) gives no holdout")
        return evidence
    return shadow.attach(evidence)
