"""Candidates: each trained and evaluated in its own nested MLflow run, side by side on a task runner (threads or
Dask), and the winner picked on one holdout metric."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from sklearn.pipeline import Pipeline

from flywheel.core.settings import get_settings
from flywheel.core.spec import DatasetSpec
from flywheel.tasks.evaluation import HIGHER_IS_BETTER, evaluate_model
from flywheel.tasks.model_specs import ModelSpec, ModelSpecError
from flywheel.tasks.training import Split, fit


@dataclass
class CandidateResult:
    """One trained-and-evaluated candidate: its nested MLflow run, where it ran, and the fitted model."""

    name: str
    model_spec: ModelSpec
    metrics: dict[str, float]
    run_id: str | None
    worker: dict[str, str] = field(default_factory=dict)
    model: Any = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        """What the flow's result and logs say about the candidate (no model object)."""
        return {
            "name": self.name,
            "estimator": self.model_spec.class_path,
            "params_hash": self.model_spec.params_hash(),
            "metrics": self.metrics,
            "run_id": self.run_id,
            "worker": self.worker,
            "error": self.error,
        }


def best_candidate(results: Sequence[CandidateResult], metric: str) -> CandidateResult:
    """The candidate with the best holdout `metric` (higher or lower is better by metric); on a tie, the one
    listed first. Failed candidates and those without the metric never win; if none can, ModelSpecError."""
    higher = metric in HIGHER_IS_BETTER
    ranked = [
        (i, r) for i, r in enumerate(results)
        if r.error is None and isinstance(r.metrics.get(metric), int | float) and r.metrics[metric] == r.metrics[metric]
    ]  # fmt: skip
    if not ranked:
        problems = "; ".join(f"{r.name}: {r.error or f'no {metric}'}" for r in results) or "no candidates"
        raise ModelSpecError(f"no candidate can be selected on '{metric}' ({problems})")
    _, best = max(ranked, key=lambda ir: (ir[1].metrics[metric] if higher else -ir[1].metrics[metric], -ir[0]))
    return best


def worker_identity() -> dict[str, str]:
    """Where this code runs: host, process, thread and, on a Dask worker, the worker's address."""
    ident = {"host": socket.gethostname(), "pid": str(os.getpid()), "thread": threading.current_thread().name}
    try:
        from distributed import get_worker

        ident["dask_worker"] = get_worker().address
    except (ImportError, ValueError):
        pass
    return ident


def openmp_limit(threads: int | None):
    """Cap the OpenMP threads of the calling thread only (libgomp keeps the limit per thread); None: no cap.

    Candidates training side by side on threads would each start one OpenMP thread per core; on 2 cores that
    oversubscription made HistGradientBoosting 2-3x slower (January flights: 29-35 s vs 12-18 s for all three).
    """
    if not threads:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="openmp")


def candidate_run_name(model: ModelSpec, data_key: str) -> str:
    return f"{model.name}-{data_key[:8]}"


@dataclass(frozen=True)
class CandidateTracking:
    """Where a candidate logs its nested run; passed explicitly so a Dask worker needs no MLflow environment."""

    tracking_uri: str | None
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str] = field(default_factory=dict)


def candidate_run(
    model: ModelSpec,
    split: Split,
    spec: DatasetSpec,
    seed: int,
    data_key: str,
    positive: Any,
    tracking: CandidateTracking,
    openmp_threads: int | None = None,
    fit_model: Callable[..., Pipeline] | None = None,
) -> CandidateResult:
    """Fit (through `fit_model`, the cached `train-model` task unless given) and evaluate one candidate in its own
    MLflow run, nested under the flow's parent run: params, holdout metrics and the worker it ran on (tags
    `flywheel.worker.*`)."""
    from flywheel.tasks import registry
    from flywheel.tasks import tracking as mlruns

    fit_model = fit_model or fit
    mlflow_client = registry.client(tracking.tracking_uri)
    worker = worker_identity()
    tags = {**tracking.tags, "flywheel.candidate": model.name, **{f"flywheel.worker.{k}": v for k, v in worker.items()}}
    run_id = mlruns.start_run(
        mlflow_client, tracking.experiment_id, candidate_run_name(model, data_key), tags, tracking.parent_run_id
    )
    try:
        mlruns.log_run_data(mlflow_client, run_id, params=registry.model_params(model))
        with openmp_limit(openmp_threads):
            fitted = fit_model(split, spec, model, seed, data_key)
            metrics = evaluate_model(fitted, split.X_test, split.y_test, spec, positive)
        mlruns.log_run_data(mlflow_client, run_id, metrics={f"holdout_{k}": v for k, v in metrics.items()})
    except BaseException:
        mlruns.end_run(mlflow_client, run_id, "FAILED")
        raise
    mlruns.end_run(mlflow_client, run_id, "FINISHED")
    return CandidateResult(model.name, model, metrics, run_id, worker, fitted)


# `candidate_run` as a task of the flow's candidate task runner (threads, or a Dask worker), so all it needs comes in
# as arguments; `openmp_threads` caps that thread's OpenMP pool (HistGradientBoosting) while candidates share cores.
train_candidate = task(name="train-candidate", cache_policy=NO_CACHE, task_run_name="train-candidate-{model.name}")(
    candidate_run
)


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


@dataclass(frozen=True)
class Contest:
    """What every candidate of one training run shares: the split, the spec, the seed, the data's key, the positive
    class and where the nested runs are logged."""

    parts: Split
    spec: DatasetSpec
    seed: int
    data_key: str
    positive: Any
    tracking: CandidateTracking


def compete(model_specs: list[ModelSpec], contest: Contest, on_close: dict[str, str]) -> list[CandidateResult]:
    """Train and evaluate every candidate in parallel (`train_candidate` mapped on the candidate task runner, which
    is noted in `on_close`, the parent run's closing tags).

    A candidate that fails is reported with its error and left out of the selection; the others carry on.
    """
    runner = candidate_task_runner(len(model_specs))
    on_close["flywheel.task_runner"] = runner_label(runner)
    logger = get_run_logger()
    with runner:
        logger.info("training %d candidate(s) on %s", len(model_specs), runner_label(runner))
        futures = runner.map(
            train_candidate,
            {
                "model": model_specs,
                "split": unmapped(contest.parts),
                "spec": unmapped(contest.spec),
                "seed": unmapped(contest.seed),
                "data_key": unmapped(contest.data_key),
                "positive": unmapped(contest.positive),
                "tracking": unmapped(contest.tracking),
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
                results.append(CandidateResult(model_spec.name, model_spec, {}, None, error=error))
    return results


def compete_in_order(model_specs: list[ModelSpec], contest: Contest, on_close: dict[str, str]) -> list[CandidateResult]:
    """`compete` without Prefect: the candidates one after another in this thread, each fitted by the plain
    function of the `train-model` task (no cache, no task runs). What the benchmark's bare script runs."""
    c = contest
    return [
        candidate_run(m, c.parts, c.spec, c.seed, c.data_key, c.positive, c.tracking, fit_model=fit.fn)
        for m in model_specs
    ]
