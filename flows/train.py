"""The `train` flow: pull → validate → split → train → evaluate → register → gate → compile → promote.

The steps are composed once, in `run_train`, from a table of step callables: the flow's Prefect tasks
(`TrainSteps()`), or the same functions without Prefect (`TrainSteps().bare()`, the benchmark's bare script).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flywheel.core.settings import get_settings
from flywheel.tasks import candidates, data, packaging, registry, tracking, training, training_run, validation
from flywheel.tasks import gate as gating

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion

    from flywheel.core.spec import DatasetSpec
    from flywheel.tasks.model_specs import ModelSpec


@dataclass(frozen=True)
class TrainSteps:
    """The units the train flow composes, as its Prefect tasks (the defaults) or plain functions."""

    check_registry: Callable[[str], None] = registry.check_registry
    pull: Callable[[DatasetSpec, str | None, str | None], pd.DataFrame] = data.pull
    validate: Callable[[pd.DataFrame, DatasetSpec, int, float], validation.ValidationReport] = validation.validate
    hold_lineage: Callable[[str], AbstractContextManager[None]] = training_run.lineage_held
    find_existing: Callable[[str, str, str, str], ModelVersion | None] = registry.find_existing
    split: Callable[[pd.DataFrame, DatasetSpec, int], training.Split] = training.split
    open_parent_run: Callable[[str, str, dict[str, str], dict[str, Any]], tuple[str, str]] = tracking.open_parent_run
    close_run: Callable[..., None] = tracking.close_run
    compete: Callable[[list[ModelSpec], candidates.Contest, dict[str, str]], list[candidates.CandidateResult]] = (
        candidates.compete
    )
    log_and_register: Callable[..., ModelVersion] = registry.log_and_register
    gate: Callable[[dict[str, float], str, training.Split, DatasetSpec, gating.GateThresholds], gating.GateDecision] = (
        gating.gate
    )
    compile: Callable[[str, str], str] = packaging.compile_model
    promote: Callable[[str, str, gating.GateDecision], bool] = gating.promote

    def bare(self) -> TrainSteps:
        """The same steps without Prefect: each task's own function (`task.fn`), the candidates one after another
        in this thread, the promotion without its artifact (an artifact belongs to a run) and no lineage lock (a
        Prefect concurrency limit)."""
        plain = {f.name: getattr(getattr(self, f.name), "fn", getattr(self, f.name)) for f in fields(self)}
        bare = {"compete": candidates.compete_in_order, "promote": gating.promote_version,
                "hold_lineage": training_run.lineage_unlocked}  # fmt: skip
        return replace(self, **{**plain, **bare})


def run_train(steps: TrainSteps, logger, **params: Any) -> dict:
    """The train flow's body over `steps`, given the flow's parameters."""
    settings = get_settings()
    plan = training_run.plan_training(**params)
    spec, name = plan.spec, plan.model_name
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    steps.check_registry(tracking_uri)

    df = steps.pull(spec, plan.start, plan.end)
    report = steps.validate(df, spec, settings.min_rows, settings.max_null_share)
    for warning in report.warnings:
        logger.warning("%s", warning)
    df = validation.labelled_rows(df, spec)  # rows without a label are neither trained nor evaluated on
    dhash, code_ver = data.data_hash(df), registry.code_version(plan.model_specs)
    logger.info(
        "pulled %d rows from %s [%s, %s), %d without a label left out; data hash %s", report.rows, spec.source,
        plan.start, plan.end, report.rows_unlabeled, dhash,
    )  # fmt: skip
    with steps.hold_lineage(plan.lineage_lock(dhash, code_ver)):  # a twin run waits here, then finds this version
        existing = steps.find_existing(name, dhash, plan.params_hash, code_ver)
        if existing is not None:
            return already_registered(steps, logger, plan, df, existing, dhash, report)
        return train_and_register(steps, logger, plan, df, dhash, code_ver, report, tracking_uri)


def train_and_register(steps: TrainSteps, logger, plan: training_run.TrainingPlan, df, dhash: str, code_ver: str,
                       report: validation.ValidationReport, tracking_uri: str) -> dict:  # fmt: skip
    """Train the candidates under the flow's parent run, register the best, then gate and promote it."""
    settings, spec, name = get_settings(), plan.spec, plan.model_name
    parts = steps.split(df, spec, settings.seed)
    positive = training.positive_label(parts.y_test, spec) if spec.task == "binary" else None
    run_tags = {"flywheel.model_name": name, "flywheel.flow_run_id": str(flow_run.id or "")}
    parent = tracking.parent_run(
        settings.experiment_name, plan.run_name(dhash), run_tags,
        plan.parent_params(dhash, report.rows_labeled, report.rows_unlabeled),
        opener=steps.open_parent_run, closer=steps.close_run,
    )  # fmt: skip
    with parent as (experiment_id, parent_id, on_close, closing_metrics):
        where = candidates.CandidateTracking(tracking_uri or None, experiment_id, parent_id, run_tags)
        contest = candidates.Contest(parts, spec, settings.seed, dhash, positive, where)
        results = steps.compete(plan.model_specs, contest, on_close)
        best = candidates.best_candidate(results, plan.metric)
        for r in results:
            mark = "  ← best" if r is best else ""
            logger.info("candidate %s: %s %s%s", r.name, plan.metric, r.metrics.get(plan.metric), mark)
        version = steps.log_and_register(
            name, plan.version_tags(dhash, code_ver, str(flow_run.id or ""), best, results, report.rows_unlabeled),
            plan.description(best, results, report.rows_labeled, report.rows_unlabeled),
            **plan.log_kwargs(df, parts, best, dhash, run_tags, settings),
        )  # fmt: skip
        logger.info("registered %s v%s (%s)", name, version.version, best.model_spec.name)
        metrics, tags = tracking.parent_summary(
            name, version.version, best.model_spec.name, best.run_id, best.metrics, plan.window,
            report.rows_labeled, plan.metric,
        )  # fmt: skip
        closing_metrics.update(metrics)
        on_close.update(tags)
    summaries = [r.summary() for r in sorted(results, key=lambda r: r is not best)]
    return gate_and_promote(steps, logger, plan, parts, "registered", version.version, best.metrics, dhash,
                            report, summaries)  # fmt: skip


def already_registered(steps: TrainSteps, logger, plan: training_run.TrainingPlan, df, existing, dhash: str, report):
    """A version with this lineage exists: nothing new when it was gated; else registered by a run that stopped
    before the gate (e.g. MLflow went away), so finish that version's gate and promotion on the same holdout
    instead of registering the same model twice."""
    if registry.TAG_GATE_PASSED in existing.tags:
        logger.info("%s v%s was trained on this data, params and code: nothing new", plan.model_name, existing.version)
        metrics = registry.version_metrics(registry.client(), existing)
        return plan.result("unchanged", existing.version, False, dhash, report, metrics)
    logger.info("%s v%s was registered but never gated: resuming at the gate", plan.model_name, existing.version)
    parts = steps.split(df, plan.spec, get_settings().seed)
    metrics = registry.version_metrics(registry.client(), existing)
    return gate_and_promote(steps, logger, plan, parts, "resumed", existing.version, metrics, dhash, report)


def gate_and_promote(
    steps: TrainSteps,
    logger,
    plan: training_run.TrainingPlan,
    parts: training.Split,
    status: str,
    version: str,
    metrics: dict[str, float],
    dhash: str,
    report: validation.ValidationReport,
    summaries: list[dict] | None = None,
) -> dict:
    """Gate the version against the trivial baseline and the champion on this holdout, promote it as the gate
    decides, and say so."""
    thresholds = gating.thresholds_from_settings(plan.spec)
    decision = steps.gate(metrics, plan.model_name, parts, plan.spec, thresholds)
    if decision.passed:  # compiled before the alias moves, so its deployment does not wait for it
        steps.compile(plan.model_name, version)
    promoted = steps.promote(plan.model_name, version, decision)
    logger.info("gate %s: %s", "passed" if promoted else "failed", "; ".join(decision.reasons))
    return plan.result(status, version, promoted, dhash, report, metrics, decision.as_dict(), summaries)


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
    with the same lineage before training, and each candidate's training task is cached on the same key. Two such
    runs at once register one version: the lookup, training and registration hold the lineage's lock, so the second
    waits and then finds the first's version.
    """
    return run_train(
        TrainSteps(), get_run_logger(), spec_path=spec_path, data_uri=data_uri, params_path=params_path, start=start,
        end=end, model_name=model_name, candidates=candidates,
    )  # fmt: skip
