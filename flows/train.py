"""The `train` flow: pull → validate → split → train → evaluate → register → gate → promote."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from flywheel.tasks import data, registry, training, validation
from flywheel.tasks.evaluation import confusion_figure
from flywheel.tasks.gate import GateDecision, GateThresholds, gate
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flywheel.core.names import slug
from flywheel.core.sampling import sample_rows
from flywheel.core.settings import get_settings
from flywheel.core.spec import DatasetSpec, load_spec


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
    selection_metric: str | None = None
    candidates: list[dict] = field(default_factory=list)  # every candidate of the run, the winner first

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
        {
            registry.TAG_GATE_PASSED: str(decision.passed).lower(),
            registry.TAG_GATE_REASONS: registry.reasons_tag(decision.reasons),
        },
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
    return slug(name)


def candidate_task_runner(n_candidates: int) -> TaskRunner:
    """Where candidates train: on the Dask cluster at FLYWHEEL_DASK_ADDRESS when set, else on threads here.

    Threads, not processes: scikit-learn's fitting loops (trees, histogram boosting, lbfgs) release the GIL, while
    a process pool pays an interpreter start, imports and a copy of the data per worker; on the flights demo on 2
    cores, 3 candidates took 6.9 s on 2 threads, 8.1 s one after another and 51 s on 2 spawned processes. At most
    one thread per core: more only makes the candidates (and HistGradientBoosting's OpenMP threads) fight.
    """
    address = get_settings().dask_address
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=max(1, min(n_candidates, os.cpu_count() or 1)))


def openmp_threads_per_candidate(runner: TaskRunner) -> int | None:
    """Cores per candidate when candidates share this machine's cores on threads; None (no cap) for one thread at a
    time or on Dask (its workers set their own thread limits)."""
    workers = getattr(runner, "_max_workers", None)
    if not isinstance(runner, ThreadPoolTaskRunner) or not workers or workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def runner_label(runner: TaskRunner) -> str:
    address = getattr(runner, "address", None)
    return f"dask:{address}" if address else f"threads:{getattr(runner, '_max_workers', '?')}"


@contextmanager
def parent_run(experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any]):
    """The flow's parent MLflow run: (experiment id, run id, tags to set when it closes); it ends FAILED if the
    block raises, else FINISHED."""
    experiment_id, run_id = registry.open_parent_run(experiment, run_name, tags, params)
    on_close: dict[str, str] = {}
    try:
        yield experiment_id, run_id, on_close
    except BaseException:
        registry.close_run(run_id, "FAILED", on_close)
        raise
    registry.close_run(run_id, "FINISHED", on_close)


def compete(
    runner: TaskRunner,
    model_specs: list[training.ModelSpec],
    parts: training.Split,
    spec: DatasetSpec,
    seed: int,
    data_key: str,
    positive: Any,
    tracking: training.CandidateTracking,
) -> list[training.CandidateResult]:
    """Train and evaluate every candidate in parallel (`train_candidate` mapped on the candidate task runner).

    A candidate that fails is reported with its error and left out of the selection; the others carry on.
    """
    logger = get_run_logger()
    with runner:
        logger.info("training %d candidate(s) on %s", len(model_specs), runner_label(runner))
        futures = runner.map(
            training.train_candidate,
            {
                "model": model_specs,
                "split": unmapped(parts),
                "spec": unmapped(spec),
                "seed": unmapped(seed),
                "data_key": unmapped(data_key),
                "positive": unmapped(positive),
                "tracking": unmapped(tracking),
                "openmp_threads": unmapped(openmp_threads_per_candidate(runner)),
            },
        )
        futures.wait()
        results = []
        for model_spec, future in zip(model_specs, futures, strict=True):
            try:
                results.append(future.result())
            except Exception as exc:  # one bad candidate does not sink the others
                logger.warning("candidate %s failed: %s: %s", model_spec.name, type(exc).__name__, exc)
                error = f"{type(exc).__name__}: {exc}"
                results.append(training.CandidateResult(model_spec.name, model_spec, {}, None, error=error))
    return results


@flow(name="train", log_prints=True)
def train(
    spec_path: str | None = None,
    data_uri: str | None = None,
    params_path: str | None = None,
    start: str | None = None,
    end: str | None = None,
    model_name: str | None = None,
    candidates: list[dict[str, Any]] | None = None,
) -> dict:
    """Train competing candidates on the spec's data (optionally an event-time window), register the best, gate it.

    Candidates come from `candidates` (a list of `{name, estimator, params}`), else the params file (one model or
    `candidates: [...]`), else the task's default model. Each trains in parallel as a nested MLflow run under the
    flow's parent run; the best on FLYWHEEL_CANDIDATE_METRIC is registered and gated, the others are only logged.
    A re-run on unchanged data, candidates and code registers nothing new: the registry is checked for a version
    with the same lineage before training, and each candidate's training task is cached on the same key.
    """
    logger = get_run_logger()
    settings = get_settings()
    model_name = model_name or settings.model_name
    spec = resolve_spec(spec_path, data_uri)
    model_specs = training.resolve_model_specs(params_path, candidates, spec.task)
    metric = training.selection_metric(spec.task, settings.candidate_metric)
    params_hash = training.candidate_set_hash(model_specs, metric)
    if start is None and end is None and spec.source.startswith(data.DEMO_SCHEME):
        start, end = spec.default_start, spec.default_end
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    registry.check_registry(tracking_uri)

    df = data.pull(spec, start, end)
    report = validation.validate(df, spec, settings.min_rows, settings.max_null_share)
    dhash = data.data_hash(df)
    code_ver = registry.code_version()
    logger.info("pulled %d rows from %s [%s, %s), data hash %s", report.rows, spec.source, start, end, dhash)

    existing = registry.find_existing(model_name, dhash, params_hash, code_ver)
    if existing is not None and registry.TAG_GATE_PASSED in existing.tags:
        logger.info("%s v%s was trained on this data, params and code: nothing new", model_name, existing.version)
        return TrainResult(
            "unchanged", model_name, existing.version, False, dhash, report.rows,
            registry.version_metrics(registry.client(), existing), None, (start, end), metric,
        ).as_dict()  # fmt: skip
    if existing is not None:
        # Registered by a run that stopped before the gate (e.g. MLflow went away): finish that version's gate and
        # promotion on the same holdout instead of registering the same model twice.
        logger.info("%s v%s was registered but never gated: resuming at the gate", model_name, existing.version)
        parts = training.split(df, spec, settings.seed)
        metrics = registry.version_metrics(registry.client(), existing)
        decision = gate(metrics, model_name, parts.X_test, parts.y_test, spec, thresholds_from_settings())
        promoted = promote(model_name, existing.version, decision)
        logger.info("gate %s: %s", "passed" if promoted else "failed", "; ".join(decision.reasons))
        return TrainResult(
            "resumed", model_name, existing.version, promoted, dhash, report.rows, metrics, decision.as_dict(),
            (start, end), metric,
        ).as_dict()  # fmt: skip

    parts = training.split(df, spec, settings.seed)
    positive = training.positive_label(parts.y_test, spec) if spec.task == "binary" else None
    run_tags = {"flywheel.model_name": model_name, "flywheel.flow_run_id": str(flow_run.id or "")}
    parent_params = {
        "candidates": ",".join(m.name for m in model_specs), "selection_metric": metric, "params_hash": params_hash,
        "data_hash": dhash, "data_window": f"{start or ''}..{end or ''}", "rows": report.rows,
    }  # fmt: skip
    run_name = f"{model_name}-{dhash[:8]}"
    with parent_run(settings.experiment_name, run_name, run_tags, parent_params) as (exp_id, parent_id, on_close):
        tracking = training.CandidateTracking(tracking_uri or None, exp_id, parent_id, run_tags)
        runner = candidate_task_runner(len(model_specs))
        on_close["flywheel.task_runner"] = runner_label(runner)
        results = compete(runner, model_specs, parts, spec, settings.seed, dhash, positive, tracking)
        best = training.best_candidate(results, metric)
        for r in results:
            logger.info("candidate %s: %s %s%s", r.name, metric, r.metrics.get(metric), "  ← best" if r is best else "")
        model, model_spec, metrics = best.model, best.model_spec, best.metrics

        sample_cols = [c for c in [*spec.features, spec.target, spec.event_time] if c]
        version_tags = {
            registry.TAG_DATA_HASH: dhash,
            registry.TAG_PARAMS_HASH: params_hash,
            registry.TAG_CODE_VERSION: code_ver,
            registry.TAG_FLOW_RUN: str(flow_run.id or ""),
            registry.TAG_SOURCE: spec.source,
            registry.TAG_WINDOW: f"{start or ''}..{end or ''}",
            registry.TAG_ESTIMATOR: model_spec.class_path,
            "candidate": model_spec.name,
            "candidates": ",".join(r.name for r in results),
            "selection_metric": metric,
            **{f"metric_{k}": f"{v:.6f}" for k, v in metrics.items()},
        }
        fig = confusion_figure(model, parts.X_test, parts.y_test) if spec.task == "binary" else None
        version = registry.log_and_register(
            model_name,
            version_tags,
            f"{model_spec.name} (best of {len(results)} on {metric}) on {spec.name} "
            f"[{start or '…'}, {end or '…'}), {report.rows} rows",
            model=model,
            model_spec=model_spec,
            metrics=metrics,
            X_example=parts.X_test.head(100),
            y_example=parts.y_test.head(100),
            training_frame=df[sample_cols],
            reference_sample=sample_rows(df[sample_cols], settings.reference_sample_rows, settings.seed),
            holdout_sample=parts.X_test.assign(**{spec.target: parts.y_test}).head(500),
            dataset_name=spec.name,
            dataset_source=spec.source,
            target=spec.target,
            data_hash=dhash,
            tags={**run_tags, "flywheel.selected": "true"},
            confusion_fig=fig,
            experiment=settings.experiment_name,
            run_name=training.candidate_run_name(model_spec, dhash),
            run_id=best.run_id,
        )
        logger.info("registered %s v%s (%s)", model_name, version.version, model_spec.name)
        on_close.update({"flywheel.best_candidate": model_spec.name, "flywheel.best_run_id": best.run_id or "",
                         "flywheel.registered_version": version.version})  # fmt: skip
    decision = gate(metrics, model_name, parts.X_test, parts.y_test, spec, thresholds_from_settings())
    promoted = promote(model_name, version.version, decision)
    logger.info("gate %s: %s", "passed" if promoted else "failed", "; ".join(decision.reasons))
    summaries = [r.summary() for r in sorted(results, key=lambda r: r is not best)]
    return TrainResult(
        "registered", model_name, version.version, promoted, dhash, report.rows, metrics, decision.as_dict(),
        (start, end), metric, summaries,
    ).as_dict()  # fmt: skip
