"""When to retrain: the decision a drift check takes from what it measured, with the signal that decided it.

With labels (late ground truth joined to served rows), the primary signal is the champion's quality on recent
labelled traffic: against its own holdout with a stated tolerance, and against the challenger scored on the same
rows where one exists. Data drift is then reported but does not decide: seasonal columns drift whether or not the
model decays. Without labels, data drift (or Evidently's quality decay, when it has labels of its own) is the only
signal. Enough rows, no training run in flight and the cooldown (tasks/drift_windows.py) then gate the trigger.
Plain functions: the bench (bench/replay.py) replays the same decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from flywheel.core.spec import Period
from flywheel.tasks.drift import DEFAULT_MAX_QUALITY_DECAY, DriftResult
from flywheel.tasks.drift_windows import check_cooldown
from flywheel.tasks.evaluation import HIGHER_IS_BETTER

DEFAULT_LABEL_TOLERANCE = 0.10  # relative fall of the primary metric against the champion's holdout
DEFAULT_MIN_LABEL_ROWS = 200  # fewer labelled rows: the label signal is noise, drift decides
DEFAULT_CHALLENGER_UPLIFT = 0.005  # the gate's default min uplift

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
    """(triggers, observations) of the label signal."""
    triggers, seen = [], []
    m = ev.metric
    if ev.holdout is not None:
        decay = ev.worse_by(ev.holdout, ev.live)
        text = (
            f"labels: champion v{ev.champion_version} {m} {ev.live:.3f} on {ev.rows:,} recent labelled rows vs "
            f"{ev.holdout:.3f} on its holdout ({abs(decay):.0%} {'worse' if decay > 0 else 'better'}; tolerance "
            f"{ev.tolerance:.0%} worse)"
        )
        (triggers if decay > ev.tolerance else seen).append(text)
    else:
        seen.append(f"labels: champion v{ev.champion_version} {m} {ev.live:.3f} on {ev.rows:,} rows (no holdout value)")
    if ev.challenger_version and ev.challenger_live is not None:
        base = ev.live if ev.champion_same_rows is None else ev.champion_same_rows
        gain = ev.gain(base, ev.challenger_live)
        text = (
            f"labels: challenger v{ev.challenger_version} {m} {ev.challenger_live:.3f} vs champion {base:.3f} on the "
            f"same {ev.rows:,} rows ({gain:+.3f}; needs >= {ev.min_uplift})"
        )
        (triggers if gain >= ev.min_uplift else seen).append(text)
    return triggers, seen


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
