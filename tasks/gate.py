"""The quality gate: may a candidate replace the champion? A decision object with its reasons, and the promotion
(aliases and the verdict on the version) it decides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.names import slug
from flywheel.core.settings import get_settings
from flywheel.core.spec import DatasetSpec
from flywheel.tasks.evaluation import HIGHER_IS_BETTER, primary_metric

# Absolute floors: threshold field → (metric, comparison). A floor applies to the tasks whose metrics include its
# metric (min_accuracy to both classification tasks).
FLOORS = {
    "min_f1": ("f1", ">="),
    "min_roc_auc": ("roc_auc", ">="),
    "min_f1_macro": ("f1_macro", ">="),
    "min_accuracy": ("accuracy", ">="),
    "max_rmse": ("rmse", "<="),
    "max_mae": ("mae", "<="),
    "min_r2": ("r2", ">="),
}
TASK_METRICS = {
    "binary": {"f1", "roc_auc", "accuracy"},
    "multiclass": {"f1_macro", "accuracy"},
    "regression": {"rmse", "mae", "r2"},
}
# The metrics on which a candidate must beat the trivial baseline: the primary one, and for binary tasks the
# threshold-free ROC-AUC too (F1 against the majority class is 0 when positives are the minority).
BASELINE_METRICS = {"binary": ("f1", "roc_auc"), "multiclass": ("f1_macro",), "regression": ("rmse",)}


@dataclass(frozen=True)
class GateThresholds:
    """What the gate asks of a candidate. Absolute floors are off (None) unless set."""

    min_f1: float | None = None
    min_roc_auc: float | None = None
    max_rmse: float | None = None
    min_r2: float | None = None
    min_uplift: float = 0.005
    min_f1_macro: float | None = None
    min_accuracy: float | None = None
    max_mae: float | None = None
    baseline_margin: float = 0.02

    def floors(self, task: str) -> dict[str, tuple[str, float]]:
        """metric → (comparison, bound) for the task's absolute floors that are set."""
        out = {}
        for name, (metric, op) in FLOORS.items():
            bound = getattr(self, name)
            if bound is not None and metric in TASK_METRICS[task]:
                out[metric] = (op, bound)
        return out


@dataclass
class GateDecision:
    passed: bool
    metric: str
    candidate: dict[str, float]
    champion: dict[str, float] | None
    champion_version: str | None
    reasons: list[str] = field(default_factory=list)
    baseline: dict[str, float] | None = None  # the trivial model's metrics on the same holdout
    baseline_model: str | None = None  # what that model is: "majority class", "mean"

    def as_dict(self) -> dict:
        return asdict(self)

    def markdown(self, model_name: str, version: str) -> str:
        verdict = "PASSED — promoted to `champion`" if self.passed else "FAILED — stays `challenger`"
        lines = [f"# Gate for `{model_name}` v{version}: {verdict}", ""]
        base = f" baseline ({self.baseline_model}) |" if self.baseline is not None else ""
        lines += [f"| metric | candidate | champion |{base}", "|---|---|---|" + ("---|" if base else "")]
        for key in sorted(self.candidate):
            champ = "" if not self.champion or key not in self.champion else f"{self.champion[key]:.4f}"
            row = f"| {key} | {self.candidate[key]:.4f} | {champ} |"
            if self.baseline is not None:
                row += f" {self.baseline[key]:.4f} |" if key in self.baseline else "  |"
            lines.append(row)
        first = "baseline and floors" if self.baseline is not None else "floors only"
        head = f"v{self.champion_version}" if self.champion_version else f"none (first model: {first})"
        lines += ["", f"Champion: {head}. Primary metric: `{self.metric}`.", "", "Reasons:"]
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)


def _meets(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def _beats_baseline(metric: str, value: float, base: float, margin: float, what: str) -> tuple[bool, str]:
    """Scores (F1, ROC-AUC) must exceed the baseline's by `margin`; errors (RMSE) be below it by that share."""
    if metric in HIGHER_IS_BETTER:
        need, op, by = base + margin, "≥", f"+{margin}"
    else:
        need, op, by = base * (1 - margin), "≤", f"−{margin:.0%}"
    ok = value >= need if op == "≥" else value <= need
    verdict = "ok" if ok else "FAILED (baseline)"
    return ok, f"{metric} {value:.4f} vs {what} baseline {base:.4f}: needs {op} {need:.4f} (margin {by}) {verdict}"


def promotion_gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    *,
    task: str,
    thresholds: GateThresholds,
    champion_version: str | None = None,
    baseline: dict[str, float] | None = None,
    baseline_model: str | None = None,
) -> GateDecision:
    """Every model: beat the trivial baseline on the same holdout (when its metrics are given) by the margin, and
    clear the absolute floors that are set; a challenger also the champion by the minimum uplift."""
    metric = primary_metric(task)
    reasons: list[str] = []
    passed = True
    if baseline is not None:
        for name in BASELINE_METRICS[task]:
            if name not in candidate or name not in baseline:
                continue
            ok, text = _beats_baseline(
                name, candidate[name], baseline[name], thresholds.baseline_margin, baseline_model or "trivial"
            )
            passed &= ok
            reasons.append(text)
    for name, (op, bound) in thresholds.floors(task).items():
        if name not in candidate:
            continue
        ok = _meets(candidate[name], op, bound)
        passed &= ok
        reasons.append(f"{name} {candidate[name]:.4f} {op} {bound} {'ok' if ok else 'FAILED (floor)'}")
    if champion is not None and metric in champion:
        higher = metric in HIGHER_IS_BETTER
        uplift = candidate[metric] - champion[metric] if higher else champion[metric] - candidate[metric]
        ok = uplift >= thresholds.min_uplift
        passed &= ok
        reasons.append(
            f"{metric} uplift over champion v{champion_version}: {uplift:+.4f} "
            f"(candidate {candidate[metric]:.4f} vs champion {champion[metric]:.4f}; needs ≥ {thresholds.min_uplift}) "
            f"{'ok' if ok else 'FAILED (uplift)'}"
        )
    elif champion is None:
        reasons.append(f"no champion yet: {'baseline and floors' if baseline is not None else 'floors'} only")
    return GateDecision(passed, metric, candidate, champion, champion_version, reasons, baseline, baseline_model)


# --------------------------------------------------------------------------------------------------- tasks
def champion_overlap(window_tag: str | None, holdout: dict[str, str], version: str) -> str | None:
    """Whether the champion's training window (its `data_window` tag, "start..end") reaches into a time-honest
    holdout: then the comparison favours the champion, and the reasons say so."""
    import pandas as pd

    from flywheel.core.timeutil import utc_timestamp

    if not window_tag or "start" not in holdout or ".." not in window_tag:
        return None
    end = window_tag.split("..", 1)[1].strip()
    if not end:
        return f"champion v{version} was trained on an open-ended window ({window_tag}): it may have seen the holdout"
    try:
        champ_end, hold_start = utc_timestamp(end), utc_timestamp(holdout["start"])
    except (ValueError, TypeError):
        return None
    if pd.isna(champ_end) or champ_end <= hold_start:
        return f"champion v{version} was trained before the holdout (window {window_tag}): neither saw it"
    return (
        f"champion v{version} was trained up to {end}, into the holdout (from {holdout['start']}): the comparison "
        "favours the champion"
    )


def champion_on_holdout(model_name: str, X, y, spec) -> tuple[str | None, dict[str, float] | None, str | None]:
    """The current champion's metrics on the candidate's holdout: (version, metrics, note).

    When the champion cannot score this holdout (e.g. trained on other features), its own logged holdout
    metrics are used instead and the note says so.
    """
    from flywheel.tasks import registry
    from flywheel.tasks.evaluation import evaluate_model, holdout_note
    from flywheel.tasks.training import positive_label

    mlflow_client = registry.client()
    champ = registry.get_alias_version(mlflow_client, model_name, registry.CHAMPION)
    if champ is None:
        return None, None, None
    seen = champion_overlap((champ.tags or {}).get(registry.TAG_WINDOW), holdout_note(X), champ.version)
    try:
        model = registry.load_sklearn_model(model_name, champ.version)
        positive = positive_label(y, spec) if spec.task == "binary" else None
        return champ.version, evaluate_model(model, X, y, spec, positive), seen
    except Exception as exc:  # a champion that cannot score this holdout is compared on its own metrics
        note = f"champion v{champ.version} could not score this holdout ({type(exc).__name__}); used its logged metrics"
        return champ.version, registry.version_metrics(mlflow_client, champ) or None, note


@task(name="promotion-gate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 5])
def gate(candidate: dict[str, float], model_name: str, parts, spec, thresholds: GateThresholds) -> GateDecision:
    """The candidate against the trivial baseline and the current champion, both on the candidate's holdout: for
    data with an event time the most recent period, which neither was trained on (tasks/evaluation.py); the split
    is the first of the reasons."""
    from flywheel.tasks.evaluation import BASELINE_NAMES, baseline_metrics, holdout_note
    from flywheel.tasks.training import positive_label

    X, y = parts.X_test, parts.y_test
    positive = positive_label(y, spec) if spec.task == "binary" else None
    baseline = baseline_metrics(parts.X_train, parts.y_train, X, y, spec, positive)
    champ_version, champ_metrics, note = champion_on_holdout(model_name, X, y, spec)
    decision = promotion_gate(
        candidate, champ_metrics, task=spec.task, thresholds=thresholds, champion_version=champ_version,
        baseline=baseline, baseline_model=BASELINE_NAMES[spec.task],
    )  # fmt: skip
    decision.reasons.insert(0, holdout_note(X)["note"])
    if note:
        decision.reasons.append(note)
    return decision


def thresholds_from_settings(spec: DatasetSpec | None = None) -> GateThresholds:
    """The gate's thresholds: FLYWHEEL_GATE_* settings, each overridden by the dataset spec's `gate:` section
    where that sets it (the spec wins for the model trained on it)."""
    s = get_settings()
    names = [f.name for f in fields(GateThresholds)]
    values = {name: getattr(s, f"gate_{name}") for name in names}
    if spec is not None:
        values.update(spec.gate.overrides())
    return GateThresholds(**values)


def promote_version(model_name: str, version: str, decision: GateDecision) -> bool:
    """Record the gate's verdict on the version, then move aliases: `challenger` always, `champion` if passed."""
    from flywheel.tasks import registry

    mlflow_client = registry.client()
    registry.set_version_tags(
        mlflow_client,
        model_name,
        version,
        {
            registry.TAG_GATE_PASSED: str(decision.passed).lower(),
            registry.TAG_GATE_REASONS: registry.reasons_tag(decision.reasons),
        },
    )
    registry.set_alias(mlflow_client, model_name, registry.CHALLENGER, version)
    if decision.passed:
        registry.set_alias(mlflow_client, model_name, registry.CHAMPION, version)
    return decision.passed


@task(name="promote", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 10])
def promote(model_name: str, version: str, decision: GateDecision) -> bool:
    """`promote_version`, and the verdict as a Prefect markdown artifact of the run."""
    from prefect.artifacts import create_markdown_artifact

    passed = promote_version(model_name, version, decision)
    create_markdown_artifact(
        key=f"gate-{slug(model_name)}",
        markdown=decision.markdown(model_name, version),
        description=f"Promotion gate for {model_name} v{version}",
    )
    return passed
