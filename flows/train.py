"""The `train` flow: pull → validate → split → train → evaluate → register → gate → promote."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from flywheel.tasks import data, registry, training, validation
from flywheel.tasks.evaluation import confusion_figure, evaluate
from flywheel.tasks.gate import GateDecision, GateThresholds, gate
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flywheel.settings import get_settings
from flywheel.spec import DatasetSpec, load_spec


@dataclass
class TrainResult:
    status: str  # "registered" | "unchanged"
    model_name: str
    version: str
    promoted: bool
    data_hash: str
    rows: int
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict | None = None
    window: tuple[str | None, str | None] = (None, None)

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_spec(spec_path: str | None, data_uri: str | None) -> DatasetSpec:
    settings = get_settings()
    spec = load_spec(spec_path or settings.spec)
    return spec.with_overrides(source=data_uri or settings.data)


def thresholds_from_settings() -> GateThresholds:
    s = get_settings()
    return GateThresholds(s.gate_min_f1, s.gate_min_roc_auc, s.gate_max_rmse, s.gate_min_r2, s.gate_min_uplift)


@task(name="promote", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 10])
def promote(model_name: str, version: str, decision: GateDecision) -> bool:
    """Record the gate's verdict on the version, then move aliases: `challenger` always, `champion` if passed."""
    mlflow_client = registry.client()
    registry.set_version_tags(
        mlflow_client,
        model_name,
        version,
        {registry.TAG_GATE_PASSED: str(decision.passed).lower(), registry.TAG_GATE_REASONS: registry.reasons_tag(decision.reasons)},
    )
    registry.set_alias(mlflow_client, model_name, registry.CHALLENGER, version)
    if decision.passed:
        registry.set_alias(mlflow_client, model_name, registry.CHAMPION, version)
    create_markdown_artifact(
        key=f"gate-{_artifact_key(model_name)}",
        markdown=decision.markdown(model_name, version),
        description=f"Promotion gate for {model_name} v{version}",
    )
    return decision.passed


def _artifact_key(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-") or "model"


@flow(name="train", log_prints=True)
def train(
    spec_path: str | None = None,
    data_uri: str | None = None,
    params_path: str | None = None,
    start: str | None = None,
    end: str | None = None,
    model_name: str | None = None,
) -> dict:
    """Train a candidate on the spec's data (optionally an event-time window), register it, and gate it.

    A re-run on unchanged data, params and code registers nothing new: the registry is checked for a version
    with the same lineage before training, and the training task itself is cached on the same key.
    """
    logger = get_run_logger()
    settings = get_settings()
    model_name = model_name or settings.model_name
    spec = resolve_spec(spec_path, data_uri)
    model_spec = training.load_model_specs(params_path, spec.task)[0]
    if start is None and end is None and spec.source.startswith(data.DEMO_SCHEME):
        start, end = spec.default_start, spec.default_end
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    registry.check_registry(tracking_uri)

    df = data.pull(spec, start, end)
    report = validation.validate(df, spec, settings.min_rows, settings.max_null_share)
    dhash = data.data_hash(df)
    code_ver = registry.code_version()
    logger.info("pulled %d rows from %s [%s, %s), data hash %s", report.rows, spec.source, start, end, dhash)

    existing = registry.find_existing(model_name, dhash, model_spec.params_hash(), code_ver)
    if existing is not None:
        logger.info("%s v%s was trained on this data, params and code: nothing new to register", model_name, existing.version)
        return TrainResult(
            "unchanged", model_name, existing.version, False, dhash, report.rows,
            registry.version_metrics(registry.client(), existing), None, (start, end),
        ).as_dict()

    parts = training.split(df, spec, settings.seed)
    model = training.fit(parts, spec, model_spec, settings.seed, dhash)
    positive = training.positive_label(parts.y_test, spec) if spec.task == "binary" else None
    metrics = evaluate(model, parts.X_test, parts.y_test, spec, positive)
    logger.info("holdout metrics: %s", metrics)

    sample_cols = [c for c in [*spec.features, spec.target, spec.event_time] if c]
    version_tags = {
        registry.TAG_DATA_HASH: dhash,
        registry.TAG_PARAMS_HASH: model_spec.params_hash(),
        registry.TAG_CODE_VERSION: code_ver,
        registry.TAG_FLOW_RUN: str(flow_run.id or ""),
        registry.TAG_SOURCE: spec.source,
        registry.TAG_WINDOW: f"{start or ''}..{end or ''}",
        registry.TAG_ESTIMATOR: model_spec.class_path,
        **{f"metric_{k}": f"{v:.6f}" for k, v in metrics.items()},
    }
    fig = confusion_figure(model, parts.X_test, parts.y_test) if spec.task == "binary" else None
    version = registry.log_and_register(
        model_name,
        version_tags,
        f"{model_spec.name} on {spec.name} [{start or '…'}, {end or '…'}), {report.rows} rows",
        model=model,
        model_spec=model_spec,
        metrics=metrics,
        X_example=parts.X_test.head(100),
        y_example=parts.y_test.head(100),
        training_frame=df[sample_cols],
        reference_sample=data.sample_rows(df[sample_cols], settings.reference_sample_rows, settings.seed),
        holdout_sample=parts.X_test.assign(**{spec.target: parts.y_test}).head(500),
        dataset_name=spec.name,
        dataset_source=spec.source,
        target=spec.target,
        data_hash=dhash,
        tags={"flywheel.model_name": model_name, "flywheel.flow_run_id": str(flow_run.id or "")},
        confusion_fig=fig,
        experiment=settings.experiment_name,
        run_name=f"{model_spec.name}-{dhash[:8]}",
    )
    logger.info("registered %s v%s", model_name, version.version)

    decision = gate(metrics, model_name, parts.X_test, parts.y_test, spec, thresholds_from_settings())
    promoted = promote(model_name, version.version, decision)
    logger.info("gate %s: %s", "passed" if promoted else "failed", "; ".join(decision.reasons))
    return TrainResult(
        "registered", model_name, version.version, promoted, dhash, report.rows, metrics, decision.as_dict(), (start, end)
    ).as_dict()
