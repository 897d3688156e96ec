"""The quality gate: may a candidate replace the champion? A decision object with its reasons, and the promotion
(aliases and the verdict on the version) it decides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.names import slug
from flywheel.core.settings import get_settings
from flywheel.tasks.evaluation import HIGHER_IS_BETTER, primary_metric


@dataclass(frozen=True)
class GateThresholds:
    min_f1: float = 0.30
    min_roc_auc: float = 0.60
    max_rmse: float | None = None
    min_r2: float = 0.0
    min_uplift: float = 0.005

    def floors(self, task: str) -> dict[str, tuple[str, float]]:
        """metric → (comparison, bound) for the task's absolute floors."""
        if task == "binary":
            return {"f1": (">=", self.min_f1), "roc_auc": (">=", self.min_roc_auc)}
        floors: dict[str, tuple[str, float]] = {"r2": (">=", self.min_r2)}
        if self.max_rmse is not None:
            floors["rmse"] = ("<=", self.max_rmse)
        return floors


@dataclass
class GateDecision:
    passed: bool
    metric: str
    candidate: dict[str, float]
    champion: dict[str, float] | None
    champion_version: str | None
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def markdown(self, model_name: str, version: str) -> str:
        verdict = "PASSED — promoted to `champion`" if self.passed else "FAILED — stays `challenger`"
        lines = [f"# Gate for `{model_name}` v{version}: {verdict}", ""]
        lines += ["| metric | candidate | champion |", "|---|---|---|"]
        for key in sorted(self.candidate):
            champ = "" if not self.champion or key not in self.champion else f"{self.champion[key]:.4f}"
            lines.append(f"| {key} | {self.candidate[key]:.4f} | {champ} |")
        head = f"v{self.champion_version}" if self.champion_version else "none (first model: floors only)"
        lines += ["", f"Champion: {head}. Primary metric: `{self.metric}`.", "", "Reasons:"]
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)


def _meets(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def promotion_gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    *,
    task: str,
    thresholds: GateThresholds,
    champion_version: str | None = None,
) -> GateDecision:
    """Absolute floors for every model; a minimum uplift over the champion on the same holdout when one exists."""
    metric = primary_metric(task)
    reasons: list[str] = []
    passed = True
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
        reasons.append("no champion yet: floors only")
    return GateDecision(passed, metric, candidate, champion, champion_version, reasons)


# --------------------------------------------------------------------------------------------------- tasks
def champion_on_holdout(model_name: str, X, y, spec) -> tuple[str | None, dict[str, float] | None, str | None]:
    """The current champion's metrics on the candidate's holdout: (version, metrics, note).

    When the champion cannot score this holdout (e.g. trained on other features), its own logged holdout
    metrics are used instead and the note says so.
    """
    from flywheel.tasks import registry
    from flywheel.tasks.evaluation import evaluate_model
    from flywheel.tasks.training import positive_label

    mlflow_client = registry.client()
    champ = registry.get_alias_version(mlflow_client, model_name, registry.CHAMPION)
    if champ is None:
        return None, None, None
    try:
        model = registry.load_sklearn_model(model_name, champ.version)
        positive = positive_label(y, spec) if spec.task == "binary" else None
        return champ.version, evaluate_model(model, X, y, spec, positive), None
    except Exception as exc:  # a champion that cannot score this holdout is compared on its own metrics
        note = f"champion v{champ.version} could not score this holdout ({type(exc).__name__}); used its logged metrics"
        return champ.version, registry.version_metrics(mlflow_client, champ) or None, note


@task(name="promotion-gate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 5])
def gate(candidate: dict[str, float], model_name: str, X, y, spec, thresholds: GateThresholds) -> GateDecision:
    champ_version, champ_metrics, note = champion_on_holdout(model_name, X, y, spec)
    decision = promotion_gate(
        candidate, champ_metrics, task=spec.task, thresholds=thresholds, champion_version=champ_version
    )
    if note:
        decision.reasons.append(note)
    return decision


def thresholds_from_settings() -> GateThresholds:
    s = get_settings()
    return GateThresholds(s.gate_min_f1, s.gate_min_roc_auc, s.gate_max_rmse, s.gate_min_r2, s.gate_min_uplift)


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
