"""Orchestration: what Prefect costs on top of the same work.

- the `train` flow (real Prefect server, real MLflow server) against a bare script running the flow's own
  composition over the same plain task functions in one process, on the flights data of the whole year (January
  in --quick); runs alternate bare, flow, flow, bare so drift in the machine's load hits both sides alike;
- a cached re-run (unchanged data, params and code: nothing to train or register) against the first run;
- per-task cost of a flow of no-op tasks (10 and 100) against a plain loop calling the same function.

Server starts and imports are fixed costs, reported apart. The flow's training task is cached by Prefect, so the
timed flow runs refresh that cache (`PREFECT_TASKS_REFRESH_CACHE`): each one trains, as the bare script does.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from bench.common import BenchResult, env_vars, median, ratio, stopwatch
from bench.fixtures import import_seconds, prefect_settings, start_mlflow, start_prefect

FULL_WINDOW = ("2013-01-01", "2014-01-01")
QUICK_WINDOW = ("2013-01-01", "2013-02-01")
WARMUP_WINDOW = ("2013-01-01", "2013-01-08")
FLOW_GOAL = 1.10
CACHED_GOAL = 0.05
TITLE = "Prefect train flow vs the same steps in a bare script"


@task(name="bench-noop", cache_policy=NO_CACHE, persist_result=False)
def noop(i: int) -> int:
    return i


@flow(name="bench-noop-flow", persist_result=False)
def noop_flow(n: int) -> float:
    """Seconds the flow spends in its loop of `n` no-op tasks (its own start and finish not included)."""
    began = time.perf_counter()
    for i in range(n):
        noop(i)
    return time.perf_counter() - began


@task(name="bench-openmp-threads", cache_policy=NO_CACHE, persist_result=False)
def openmp_threads() -> int:
    from threadpoolctl import threadpool_info

    return max((p["num_threads"] for p in threadpool_info() if p.get("user_api") == "openmp"), default=0)


@flow(name="bench-openmp-threads", persist_result=False)
def openmp_threads_in_flow() -> int:
    """OpenMP's thread count as a task in a flow sees it (the limit must reach the flow's tasks too)."""
    return openmp_threads()


def plain_loop(n: int) -> int:
    total = 0
    for i in range(n):
        total += noop.fn(i)
    return total


def bare_train(start: str, end: str, model_name: str, tracking_uri: str) -> dict:
    """The train flow's body as a plain script: the flow's own composition (`run_train`) over the same task
    functions without Prefect (`TrainSteps().bare()`: each task's `.fn`, candidates one after another in this
    thread): no Prefect run, no task runs, no artifact, and a change to the flow's steps is measured on both sides.
    The composition reads the tracking server from MLFLOW_TRACKING_URI, as the flow does."""
    import logging

    from flywheel.flows.train import TrainSteps, run_train

    logger = logging.getLogger("bench.orchestration")
    with env_vars(MLFLOW_TRACKING_URI=tracking_uri):
        return run_train(TrainSteps().bare(), logger, start=start, end=end, model_name=model_name)


def _settle(seconds: float = 2.0) -> None:
    """Let the Prefect server finish the previous run's events before the next timing starts."""
    time.sleep(seconds)


def _name(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


def _noop_costs(res: BenchResult, quick: bool) -> None:
    """Per-task cost measured inside the flow (its loop), the flow's own start and finish apart."""
    reps = 2 if quick else 3
    noop_flow(1)  # warm-up: the first flow run of a process also builds clients
    _settle()
    total0: list[float] = []
    per_task: dict[int, list[float]] = {10: [], 100: []}
    for _ in range(reps):
        with stopwatch() as t:
            noop_flow(0)
        total0.append(t["seconds"])
        _settle()
        for n in per_task:
            per_task[n].append(noop_flow(n) / n)
            _settle()
    loops = 100_000
    with stopwatch() as t:
        plain_loop(loops)
    plain = t["seconds"] / loops
    for n, values in per_task.items():
        res.add(f"per task, flow of {n} no-op tasks", median(values) * 1000, "ms", note=f"median of {reps} flows")
    res.add("per call, plain loop of the same function", plain * 1e6, "µs")
    res.add("per-task cost: flow task / plain call (100 tasks)", ratio(median(per_task[100]), plain), "×")
    res.fixed("flow run with 0 tasks (start + finish, client side)", median(total0))


def _train_comparison(res: BenchResult, quick: bool, tracking_uri: str) -> None:
    """The code version is taken once, from the code this process imported: `registry.code_version()` hashes the
    files on disk, and an edit to tasks/ or flows/ during the run (others work in the same checkout) would make
    the unchanged re-run look like new code, though the code that runs has not changed."""
    from unittest import mock

    from flywheel.tasks import registry

    pinned = registry.code_version()
    with mock.patch.object(registry, "code_version", return_value=pinned):
        _train_runs(res, quick, tracking_uri)
    seen = openmp_threads_in_flow()
    res.add("OpenMP threads in a flow task", seen, "", "info", "the bench runs OpenMP with one thread, bare and flow")


def _train_runs(res: BenchResult, quick: bool, tracking_uri: str) -> None:
    from flywheel.flows.train import train

    start, end = QUICK_WINDOW if quick else FULL_WINDOW
    # Warm-up on one week: imports, the flights table, matplotlib, MLflow's client and the experiment.
    with stopwatch() as t:
        bare_train(*WARMUP_WINDOW, _name("warmup"), tracking_uri)
    res.fixed("warm-up bare run on one week (imports, flights table)", t["seconds"])
    bare: list[float] = []
    flows: list[float] = []
    last_flow_name = ""
    for kind in ("bare", "flow", "flow", "bare"):
        _settle()
        name = _name(kind)
        if kind == "bare":
            with stopwatch() as t:
                out = bare_train(start, end, name, tracking_uri)
            bare.append(t["seconds"])
        else:
            with prefect_settings(PREFECT_TASKS_REFRESH_CACHE=True), stopwatch() as t:
                out = train(start=start, end=end, model_name=name)
            flows.append(t["seconds"])
            last_flow_name = name
        if out["status"] != "registered":
            raise RuntimeError(f"{kind} run on {name} did not register a version (status {out['status']!r})")
    _settle()
    with stopwatch() as t:
        again = train(start=start, end=end, model_name=last_flow_name)
    cached = t["seconds"]
    if again["status"] != "unchanged":
        res.errors.append(f"the re-run on unchanged data registered version {again['version']}")
        cached = None

    # Noise on a shared machine only ever adds time: the fastest of each side is its best estimate.
    flow_t, bare_t = min(flows), min(bare)
    label = f"[{start}, {end})"
    res.add(
        f"bare script, train on {label} (fastest)", bare_t, "s", note="runs: " + ", ".join(f"{x:.1f}" for x in bare)
    )
    res.add(
        f"train flow, train on {label} (fastest)", flow_t, "s", note="runs: " + ", ".join(f"{x:.1f}" for x in flows)
    )
    res.add("train flow / bare script", ratio(flow_t, bare_t), "×")
    res.add("train flow / bare script, medians", ratio(median(flows), median(bare)), "×", "info")
    cached_share = None if cached is None else ratio(cached, flow_t) * 100
    res.add("train flow re-run, unchanged data (cached)", cached, "s")
    res.add("cached re-run / first run", cached_share, "%")
    res.goal("train flow ≤ 1.10× bare script", ratio(flow_t, bare_t), "<=", FLOW_GOAL)
    res.goal("cached re-run ≤ 5 % of first run", cached_share, "<=", CACHED_GOAL * 100, unit="%")


def run(quick: bool, root: Path) -> BenchResult:
    res = BenchResult("orchestration", TITLE, quick)
    for module in ("prefect", "mlflow", "flywheel.flows.train"):
        res.fixed(f"import {module} (fresh interpreter)", import_seconds(module))
    prefect_server, seconds = start_prefect(root / "prefect-server")
    res.fixed("Prefect server start (to healthy)", seconds)
    mlflow_server = None
    try:
        mlflow_server, seconds = start_mlflow(root / "mlflow")
        res.fixed("MLflow server start (to healthy)", seconds)
        api = prefect_server.url + "/api"
        with (
            env_vars(PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_server.url),
            prefect_settings(PREFECT_API_URL=api),
        ):
            import mlflow

            mlflow.set_tracking_uri(mlflow_server.url)
            _noop_costs(res, quick)
            _train_comparison(res, quick, mlflow_server.url)
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
        prefect_server.stop()
    res.notes.append(
        "The code version (a lineage key) is hashed once from the code this process imported, not re-read from "
        "disk: edits by others in the same checkout during the run must not make the re-run look like new code."
    )
    res.notes.append(
        "The Prefect server runs on the same cores and spends CPU on each task's events while the flow runs; "
        "that cost is in the flow's time, as it would be on a laptop."
    )
    if os.cpu_count() and os.cpu_count() <= 2:
        res.notes.append("2 CPUs shared with other work: ratios are from one run and noisy.")
    return res
