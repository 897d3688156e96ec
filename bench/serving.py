"""Serving: Flywheel's model server against `mlflow models serve` on the same registered model, and against
`pyfunc.predict` in this process (the limit).

One small scikit-learn pipeline (Flywheel's default estimator on January flights) is registered in a bench MLflow
server; both servers load version 1 from it, Flywheel's with request logging on. The same httpx client sends
MLflow's scoring protocol (`dataframe_split` JSON) with a distinct held-out row in every request (no caching can
help): sequential single rows, then 8 and 32 concurrent clients (asyncio), then 10,000-row batches. Phases
alternate between the two servers. Server starts are fixed costs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchResult,
    env_vars,
    flights,
    percentile,
    ratio,
    start_mlflow,
    stopwatch,
    summarize,
)

TITLE = "Flywheel model server vs mlflow models serve vs in-process predict"
JSON_HEADERS = {"Content-Type": "application/json"}
SINGLE_ROW_GOAL = 10.0
BATCH_GOAL = 1.5
BATCH_ROWS = 10_000


@dataclass
class Sizes:
    train_rows: int
    seconds: float  # per load phase and server
    clients: tuple[int, ...]
    batches: int
    inproc_rows: int

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(train_rows=5_000, seconds=3.0, clients=(8, 32), batches=3, inproc_rows=300)
        return cls(train_rows=20_000, seconds=8.0, clients=(8, 32), batches=5, inproc_rows=1_000)


class RowFeed:
    """Held-out rows as ready request bodies; every call of `next_body` returns a row no request had before."""

    def __init__(self, frame: Any) -> None:
        self.columns = list(frame.columns)
        self.values = frame.to_numpy(dtype=object).tolist()
        self.frame = frame
        self._next = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.values)

    def take(self, n: int) -> range:
        """n fresh row positions (a block, for batches)."""
        with self._lock:
            start = next(self._next)
            for _ in range(n - 1):
                next(self._next)
        if start + n > len(self.values):
            raise RuntimeError(f"the held-out pool of {len(self.values):,} rows is used up")
        return range(start, start + n)

    def next_index(self) -> int:
        i = next(self._next)
        if i >= len(self.values):
            raise RuntimeError(f"the held-out pool of {len(self.values):,} rows is used up")
        return i

    def body(self, rows: range | list[int]) -> bytes:
        return json.dumps(
            {"dataframe_split": {"columns": self.columns, "data": [self.values[i] for i in rows]}}
        ).encode()

    def next_body(self) -> bytes:
        return self.body([self.next_index()])


@dataclass
class Served:
    model_name: str
    tracking_uri: str
    feed: RowFeed
    servers: dict[str, Any] = field(default_factory=dict)  # label → ManagedProcess
    start_seconds: dict[str, float] = field(default_factory=dict)
    mlflow_start: float = 0.0
    train_seconds: float = 0.0

    def url(self, label: str) -> str:
        return self.servers[label].url


# --------------------------------------------------------------------------------------------------- set-up
def register_model(model_name: str, train_rows: int) -> tuple[Any, Any]:
    """Train Flywheel's default pipeline on January flights and register it as version 1: (model, held-out X)."""
    import mlflow
    from mlflow.models import infer_signature

    from flywheel.core.spec import load_spec
    from flywheel.tasks import registry, training

    spec = load_spec()
    df = flights()
    jan = df.loc[df["month"] == 1].sample(n=train_rows, random_state=42)
    parts = training.split_dataset(jan, spec, seed=42)
    model = training.train_model(parts, spec, training.default_model_spec("binary"), 42)
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(parts.X_test.head(100), model.predict(parts.X_test.head(100))),
            input_example=parts.X_test.head(3),
            pip_requirements=registry.pip_requirements(),
            skops_trusted_types=registry.trusted_types(model),
        )
    logged = registry.LoggedCandidate(run.info.run_id, info.model_uri, getattr(info, "model_id", None))
    registry.register_version(registry.client(), model_name, logged, {"bench": "serving"})
    held_out = df.loc[df["month"] != 1]
    pool = training.feature_frame(held_out, spec).dropna().sample(frac=1.0, random_state=7).reset_index(drop=True)
    return model, pool


def wait_ready(mp: Any, path: str, timeout: float = 180.0) -> None:
    from flywheel.stack.processes import ServerStartError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not mp.alive():
            raise ServerStartError(f"{mp.name} exited with code {mp.proc.returncode}:\n{mp.log_tail()}")
        try:
            if httpx.get(mp.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerStartError(f"{mp.name} not ready at {mp.url}{path} after {timeout:.0f}s:\n{mp.log_tail()}")


def start_flywheel_server(served: Served, root: Path) -> None:
    from flywheel.stack import processes

    port = processes.free_port()
    cmd = [
        sys.executable, "-m", "flywheel.serving", "--model", served.model_name, "--host", "127.0.0.1",
        "--port", str(port), "--tracking-uri", served.tracking_uri, "--initial-version", "1",
        "--request-log-dir", str(root / "request-log"), "--log-level", "warning",
    ]  # fmt: skip
    with stopwatch() as t:
        mp = processes.spawn("flywheel", cmd, url=f"http://127.0.0.1:{port}", log_path=root / "flywheel.log",
                             health_path="/health", env={"MLFLOW_TRACKING_URI": served.tracking_uri})  # fmt: skip
        served.servers["flywheel"] = mp
        wait_ready(mp, "/ping")
    served.start_seconds["flywheel"] = t["seconds"]


def start_mlflow_serve(served: Served, root: Path) -> None:
    from flywheel.stack import processes

    port = processes.free_port()
    cmd = [
        processes.bin_path("mlflow"), "models", "serve", "-m", f"models:/{served.model_name}/1", "--env-manager",
        "local", "-p", str(port), "-h", "127.0.0.1", "--workers", "1",
    ]  # fmt: skip
    # It execs `uvicorn` through bash: the environment's bin directory must be on PATH.
    env = {
        "MLFLOW_TRACKING_URI": served.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with stopwatch() as t:
        mp = processes.spawn("mlflow-serve", cmd, url=f"http://127.0.0.1:{port}", log_path=root / "mlflow-serve.log",
                             health_path="/ping", env=env)  # fmt: skip
        served.servers["mlflow serve"] = mp
        wait_ready(mp, "/ping")
    served.start_seconds["mlflow serve"] = t["seconds"]


@contextmanager
def served_model(root: Path, quick: bool) -> Iterator[Served]:
    """An MLflow server with one registered model, and both model servers serving its version 1."""
    sizes = Sizes.for_mode(quick)
    mlflow_server, mlflow_start = start_mlflow(root / "mlflow")
    served = None
    try:
        with env_vars(MLFLOW_TRACKING_URI=mlflow_server.url):
            import mlflow

            mlflow.set_tracking_uri(mlflow_server.url)
            name = f"bench-serving-{uuid.uuid4().hex[:8]}"
            with stopwatch() as t:
                _, pool = register_model(name, sizes.train_rows)
            served = Served(
                name, mlflow_server.url, RowFeed(pool), mlflow_start=mlflow_start, train_seconds=t["seconds"]
            )
            start_mlflow_serve(served, root)
            start_flywheel_server(served, root)
            yield served
    finally:
        if served is not None:
            for mp in served.servers.values():
                mp.stop()
        mlflow_server.stop()


# --------------------------------------------------------------------------------------------------- load
@dataclass
class Load:
    latencies: list[float]
    seconds: float
    errors: int
    rows: int = 1

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else float("nan")


def sequential(url: str, feed: RowFeed, seconds: float, warmup: int = 30) -> Load:
    """One client, one single-row request at a time, for `seconds`."""
    latencies: list[float] = []
    errors = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(warmup):
            client.post("/invocations", content=feed.next_body(), headers=JSON_HEADERS)
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            body = feed.next_body()
            t0 = time.perf_counter()
            resp = client.post("/invocations", content=body, headers=JSON_HEADERS)
            latencies.append(time.perf_counter() - t0)
            errors += resp.status_code != 200
        elapsed = time.perf_counter() - began
    return Load(latencies, elapsed, errors)


async def _concurrent(url: str, feed: RowFeed, clients: int, seconds: float) -> Load:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def warm() -> None:
            for _ in range(3):
                await client.post("/invocations", content=feed.next_body(), headers=JSON_HEADERS)

        await asyncio.gather(*(warm() for _ in range(clients)))
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                body = feed.next_body()
                t0 = time.perf_counter()
                resp = await client.post("/invocations", content=body, headers=JSON_HEADERS)
                latencies.append(time.perf_counter() - t0)
                errors += resp.status_code != 200

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return Load(latencies, elapsed, errors)


def concurrent(url: str, feed: RowFeed, clients: int, seconds: float) -> Load:
    """`clients` connections each sending single-row requests back to back, for `seconds`."""
    return asyncio.run(_concurrent(url, feed, clients, seconds))


def batches(url: str, feed: RowFeed, count: int, rows: int = BATCH_ROWS) -> tuple[Load, list[range]]:
    """`count` requests of `rows` distinct rows each (after one warm-up batch)."""
    used: list[range] = []
    latencies: list[float] = []
    errors = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/invocations", content=feed.body(feed.take(rows)), headers=JSON_HEADERS)
        began = time.perf_counter()
        for _ in range(count):
            block = feed.take(rows)
            body = feed.body(block)
            t0 = time.perf_counter()
            resp = client.post("/invocations", content=body, headers=JSON_HEADERS)
            latencies.append(time.perf_counter() - t0)
            errors += resp.status_code != 200
            used.append(block)
        elapsed = time.perf_counter() - began
    return Load(latencies, elapsed, errors, rows), used


# --------------------------------------------------------------------------------------------------- in-process
class InProcess:
    """The limit: `PyFuncModel.predict` in this process on the rows the servers got; also MLflow's own scoring
    handler (JSON parse + schema + predict + JSON out) in-process. Measured with the default BLAS/OpenMP threads
    and with one thread (on a busy machine OpenMP's threads can make a predict 10× slower); the faster is the limit.
    """

    THREADS = (os.cpu_count() or 1, 1)

    def __init__(self, model_uri: str, feed: RowFeed) -> None:
        import mlflow.pyfunc

        self.model = mlflow.pyfunc.load_model(model_uri)
        self.schema = self.model.metadata.get_input_schema()
        self.feed = feed
        self.model.predict(feed.frame.iloc[:50])  # warm-up
        self.single: dict[int, list[float]] = {t: [] for t in self.THREADS}
        self.batch: dict[int, list[float]] = {t: [] for t in self.THREADS}
        self.handler: list[float] = []

    def run_single(self, rows: int) -> None:
        from threadpoolctl import threadpool_limits

        frame = self.feed.frame
        for threads in self.THREADS:
            with threadpool_limits(limits=threads):
                for i in self.feed.take(rows):
                    row = frame.iloc[i : i + 1]
                    t0 = time.perf_counter()
                    self.model.predict(row)
                    self.single[threads].append(time.perf_counter() - t0)

    def run_batches(self, blocks: list[range]) -> None:
        from mlflow.pyfunc import scoring_server
        from threadpoolctl import threadpool_limits

        frame = self.feed.frame
        for block in blocks:
            part = frame.iloc[block.start : block.stop]
            for threads in self.THREADS:
                with threadpool_limits(limits=threads):
                    t0 = time.perf_counter()
                    self.model.predict(part)
                    self.batch[threads].append(time.perf_counter() - t0)
            body = self.feed.body(block).decode()
            t0 = time.perf_counter()
            out = scoring_server.invocations(body, "application/json", self.model, self.schema)
            self.handler.append(time.perf_counter() - t0)
            if out.status != 200:
                raise RuntimeError(f"MLflow's scoring handler answered {out.status}: {str(out.response)[:300]}")

    def best(self, which: str) -> tuple[dict[str, float], int | None]:
        """The summary of the faster thread setting (by p50) and that setting."""
        samples = self.single if which == "single" else self.batch
        summaries = {t: summarize(v) for t, v in samples.items() if v}
        threads = min(summaries, key=lambda t: summaries[t]["p50_ms"])
        return summaries[threads], threads


def agree(served: Served, rows: int = 50) -> bool:
    """Both servers give the same answers on the same rows (a sanity check, not timed)."""
    body = served.feed.body(served.feed.take(rows))
    answers = [
        httpx.post(served.url(label) + "/invocations", content=body, headers=JSON_HEADERS, timeout=30).json()
        for label in ("mlflow serve", "flywheel")
    ]
    return answers[0].get("predictions") == answers[1].get("predictions")


# --------------------------------------------------------------------------------------------------- report
def _load_rows(res: BenchResult, label: str, phase: str, load: Load) -> None:
    s = summarize(load.latencies)
    errs = f", {load.errors} errors" if load.errors else ""
    res.add(f"{label}: {phase} req/s", load.rps, "req/s", note=f"{s['n']} requests{errs}")
    res.add(f"{label}: {phase} p50", s["p50_ms"], "ms")
    res.add(f"{label}: {phase} p99", s["p99_ms"], "ms")


def _threads(threads: int) -> str:
    return f"{threads} OpenMP thread{'s' if threads > 1 else ''}"


def run(quick: bool, root: Path) -> BenchResult:
    res = BenchResult("serving", TITLE, quick)
    sizes = Sizes.for_mode(quick)
    with served_model(root, quick) as served:
        res.fixed("MLflow tracking server start", served.mlflow_start)
        res.fixed(f"train + register the model ({sizes.train_rows:,} January rows)", served.train_seconds)
        for label, seconds in served.start_seconds.items():
            res.fixed(f"{label}: start until /ping is 200", seconds)
        res.add("answers agree on 50 rows", float(agree(served)), "", "info", "1 = identical predictions")
        labels = ("mlflow serve", "flywheel")
        limit = InProcess(f"models:/{served.model_name}/1", served.feed)
        # Phases alternate between the servers, the in-process limit measured right after each.
        seq = {label: sequential(served.url(label), served.feed, sizes.seconds) for label in labels}
        limit.run_single(sizes.inproc_rows)
        conc = {
            (label, c): concurrent(served.url(label), served.feed, c, sizes.seconds)
            for c in sizes.clients
            for label in labels
        }
        bat = {}
        for label in labels:
            bat[label], used = batches(served.url(label), served.feed, sizes.batches)
            limit.run_batches(used)
        res.add("held-out rows used (each request its own)", float(next(served.feed._next)), "rows", "info")

    for label in labels:
        _load_rows(res, label, "sequential single-row", seq[label])
    single, single_threads = limit.best("single")
    for threads, values in limit.single.items():
        res.add(f"in-process predict, single row p50, {_threads(threads)}", summarize(values)["p50_ms"], "ms", "info")
    res.add(
        "in-process predict: single rows/s (1 / mean)", 1000 / single["mean_ms"], "req/s", note=_threads(single_threads)
    )
    for c in sizes.clients:
        for label in labels:
            _load_rows(res, label, f"{c} clients", conc[(label, c)])
    batch_ms = {label: percentile(bat[label].latencies, 50) * 1000 for label in labels}
    batch_best, batch_threads = limit.best("batch")
    inproc_ms = batch_best["p50_ms"]
    handler_ms = percentile(limit.handler, 50) * 1000
    for threads, values in limit.batch.items():
        res.add(
            f"in-process predict, {BATCH_ROWS:,} rows p50, {_threads(threads)}",
            summarize(values)["p50_ms"],
            "ms",
            "info",
        )
    for label in labels:
        res.add(
            f"{label}: {BATCH_ROWS:,}-row batch p50", batch_ms[label], "ms", note=f"{len(bat[label].latencies)} batches"
        )
    res.add(f"in-process pyfunc.predict, {BATCH_ROWS:,} rows p50", inproc_ms, "ms", note=_threads(batch_threads))
    res.add(f"in-process MLflow scoring handler, {BATCH_ROWS:,} rows p50", handler_ms, "ms", note="JSON in → JSON out")

    seq_ratio = ratio(seq["flywheel"].rps, seq["mlflow serve"].rps)
    res.add("sequential single rows: flywheel / mlflow serve", seq_ratio, "×")
    res.add(
        "sequential single rows: flywheel / in-process predict",
        ratio(seq["flywheel"].rps, 1000 / single["mean_ms"]),
        "×",
    )
    for c in sizes.clients:
        res.add(
            f"{c} clients: flywheel / mlflow serve",
            ratio(conc[("flywheel", c)].rps, conc[("mlflow serve", c)].rps),
            "×",
        )
    res.add("batch: flywheel / in-process predict", ratio(batch_ms["flywheel"], inproc_ms), "×")
    res.add("batch: mlflow serve / in-process predict", ratio(batch_ms["mlflow serve"], inproc_ms), "×")
    res.add("batch: flywheel / in-process scoring handler", ratio(batch_ms["flywheel"], handler_ms), "×")

    res.goal("single rows, sequential: flywheel ≥ 10× mlflow serve req/s", seq_ratio, ">=", SINGLE_ROW_GOAL)
    top = max(sizes.clients)
    res.goal(
        f"single rows, {top} clients: flywheel ≥ 10× mlflow serve req/s",
        ratio(conc[("flywheel", top)].rps, conc[("mlflow serve", top)].rps), ">=", SINGLE_ROW_GOAL,
    )  # fmt: skip
    res.goal(
        "10k-row batch: flywheel ≤ 1.5× in-process predict", ratio(batch_ms["flywheel"], inproc_ms), "<=", BATCH_GOAL
    )
    errors = sum(x.errors for x in [*seq.values(), *conc.values(), *bat.values()])
    if errors:
        res.errors.append(f"{errors} requests did not answer 200")
    res.notes.append(
        "Client, both servers and this process share the machine's CPUs; the asyncio client is part of every "
        "concurrent figure (it is the same for both servers)."
    )
    return res
