"""Serving: Flywheel's model server against `mlflow models serve` on the same registered champion, and against
`pyfunc.predict` in this process (the limit).

Flywheel's default model (one-hot + HistGradientBoosting on January flights) is registered in a bench MLflow server
with its holdout sample as the champion, and packaged as deploy-model packages it: compiled to ONNX and checked for
parity (flywheel.tasks.packaging.compile_for_serving). The same model as the train flow logs it (raw-input step
first), a logistic regression and a pipeline skl2onnx cannot convert are registered and compiled too, for the
compiled-vs-pyfunc split. Both servers then load the champion; Flywheel's with request logging on.

One lean HTTP/1.1 client (keep-alive sockets; the same for both servers, so neither pays for a heavy client) sends
MLflow's scoring protocol (`dataframe_split` JSON) with a distinct held-out row in every request: single rows one
after another, then 8 and 32 concurrent connections (asyncio), then 10,000-row batches. Every phase runs in rounds
that alternate between the two servers, and the in-process limit is measured between the batch rounds. Memory
(PSS of each server's process tree) is read after the load. Server starts and compilation are fixed costs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
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
    server_env,
    start_mlflow,
    stopwatch,
    summarize,
)

TITLE = "Flywheel model server vs mlflow models serve vs in-process predict"
JSON_HEADERS = {"Content-Type": "application/json"}
SEQUENTIAL_GOAL = 10.0  # × mlflow serve req/s, single rows one after another
CONCURRENT_GOAL = 30.0  # × mlflow serve req/s, 32 clients
BATCH_GOAL = 1.5  # × in-process pyfunc.predict, 10,000 rows
MEMORY_GOAL = 0.7  # × mlflow serve PSS
TAIL_GOAL = 5.0  # p99 ≤ 5 × p50 under 32 clients
BATCH_ROWS = 10_000
LABELS = ("mlflow serve", "flywheel")


@dataclass
class Sizes:
    train_rows: int
    seconds: float  # per phase and server, split over `rounds`
    rounds: int
    clients: tuple[int, ...]
    batches: int
    inproc_rows: int

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(train_rows=5_000, seconds=3.0, rounds=2, clients=(8, 32), batches=3, inproc_rows=300)
        return cls(train_rows=20_000, seconds=9.0, rounds=3, clients=(8, 32), batches=6, inproc_rows=1_000)


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
    compile_seconds: float = 0.0
    verdicts: list[tuple[str, str, dict]] = field(default_factory=list)  # (version, what it is, compiled.json)
    champion: str = "1"
    champion_kind: str = ""

    def url(self, label: str) -> str:
        return self.servers[label].url


# --------------------------------------------------------------------------------------------------- the client
def _request(host: str, port: int, body: bytes) -> bytes:
    return (
        f"POST /invocations HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _status_and_length(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
        elif key.strip().lower() == b"transfer-encoding":
            raise RuntimeError("the bench client reads Content-Length responses only")
    return int(lines[0].split()[1]), length


class LeanClient:
    """One keep-alive HTTP/1.1 connection, blocking: a request costs this process ~20 µs (httpx's client: ~300)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.sock = socket.create_connection((self.host, self.port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(_request(self.host, self.port, body))
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status, length = _status_and_length(head)
        while len(rest) < length:
            rest += self._recv()
        self.buf = rest[length:]
        return status, rest[:length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


async def _apost(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status, length = _status_and_length(head[:-4])
    await reader.readexactly(length)
    return status


# --------------------------------------------------------------------------------------------------- set-up
def _log(model: Any, example: Any, holdout: Any, signature: Any, model_name: str, root: Path) -> str:
    import mlflow

    from flywheel.tasks import registry

    with mlflow.start_run() as run:
        path = root / "holdout_sample.parquet"
        holdout.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(registry.HOLDOUT_ARTIFACT).parent))
        info = mlflow.sklearn.log_model(
            model, name="model", signature=signature, input_example=example.head(3),
            pip_requirements=registry.pip_requirements(), serialization_format="cloudpickle",
        )  # fmt: skip
    logged = registry.LoggedCandidate(run.info.run_id, info.model_uri, getattr(info, "model_id", None))
    return str(registry.register_version(registry.client(), model_name, logged, {"bench": "serving"}).version)


def _log_distance(X: Any) -> Any:
    """A first step that is no plain cast: skl2onnx converts no FunctionTransformer with a function."""
    import numpy as np

    return X.assign(distance=np.log1p(X["distance"]))


def register_models(model_name: str, train_rows: int, root: Path) -> tuple[Any, list[tuple[str, str]], str]:
    """Register the champion (the first version) and three others: (held-out pool, [(version, what it is)], what
    the champion is)."""
    from mlflow.models import infer_signature
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from flywheel.core.spec import load_spec
    from flywheel.tasks import model_specs, registry, training

    spec = load_spec()
    df = flights()
    jan = df.loc[df["month"] == 1].sample(n=train_rows, random_state=42)
    parts = training.split_dataset(jan, spec, seed=42)
    model = training.train_model(parts, spec, model_specs.default_model_spec("binary"), 42)
    X = parts.X_test

    def sig(m: Any, frame: Any) -> Any:
        return infer_signature(frame.head(200), m.predict(frame.head(200)))

    # The champion: the pipeline the issue measured (one-hot of the categories + HistGradientBoosting), the fastest
    # pyfunc has, so the ratios are the least flattering ones. The train flow's logged form (its raw-input step
    # first, when it has one) is compiled and parity-checked beside it.
    versions = [(_log(model, X, X, sig(model, X), model_name, root), "one-hot + HistGradientBoosting")]
    kind = versions[0][1]
    if hasattr(training, "servable_model") and hasattr(registry, "raw_rows_signature"):
        logged = training.servable_model(model, jan, spec)
        raw = jan[spec.features]
        versions.append((_log(logged, raw, X, registry.raw_rows_signature(sig(logged, raw)), model_name, root),
                         "the same as the train flow logs it (raw-input step first)"))  # fmt: skip
    logistic = training.train_model(parts, spec, model_specs.ModelSpec(name="lr", estimator="logistic_regression",
                                                                    params={"max_iter": 500}), 42)  # fmt: skip
    versions.append((_log(logistic, X, X, sig(logistic, X), model_name, root), "one-hot + logistic regression"))
    steps = clone(model).steps  # unfitted copies: the champion object stays as it is
    refused = Pipeline([("log", FunctionTransformer(_log_distance)), *steps]).fit(parts.X_train, parts.y_train)
    versions.append((_log(refused, X, X, sig(refused, X), model_name, root), "a FunctionTransformer first"))
    held_out = df.loc[df["month"] != 1]
    pool = training.feature_frame(held_out, spec).dropna().sample(frac=1.0, random_state=7).reset_index(drop=True)
    return pool, versions, kind


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
        "--port", str(port), "--tracking-uri", served.tracking_uri, "--initial-version", served.champion,
        "--request-log-dir", str(root / "request-log"), "--log-level", "warning",
    ]  # fmt: skip
    with stopwatch() as t:
        mp = processes.spawn("flywheel", cmd, url=f"http://127.0.0.1:{port}", log_path=root / "flywheel.log",
                             health_path="/health",
                             env={"MLFLOW_TRACKING_URI": served.tracking_uri, **server_env()})  # fmt: skip
        served.servers["flywheel"] = mp
        wait_ready(mp, "/ping")
    served.start_seconds["flywheel"] = t["seconds"]


def start_mlflow_serve(served: Served, root: Path) -> None:
    from flywheel.stack import processes

    port = processes.free_port()
    cmd = [
        processes.bin_path("mlflow"), "models", "serve", "-m", f"models:/{served.model_name}/{served.champion}",
        "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "--workers", "1",
    ]  # fmt: skip
    # It execs `uvicorn` through bash: the environment's bin directory must be on PATH.
    env = {
        "MLFLOW_TRACKING_URI": served.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **server_env(),
    }
    with stopwatch() as t:
        mp = processes.spawn("mlflow-serve", cmd, url=f"http://127.0.0.1:{port}", log_path=root / "mlflow-serve.log",
                             health_path="/ping", env=env)  # fmt: skip
        served.servers["mlflow serve"] = mp
        wait_ready(mp, "/ping")
    served.start_seconds["mlflow serve"] = t["seconds"]


@contextmanager
def served_model(root: Path, quick: bool) -> Iterator[Served]:
    """An MLflow server with the registered (and compiled) versions, and both model servers serving the champion."""
    sizes = Sizes.for_mode(quick)
    mlflow_server, mlflow_start = start_mlflow(root / "mlflow")
    served = None
    try:
        with env_vars(MLFLOW_TRACKING_URI=mlflow_server.url):
            import mlflow

            from flywheel.tasks import compiling, registry
            from flywheel.tasks.packaging import compile_for_serving

            mlflow.set_tracking_uri(mlflow_server.url)
            mlflow.set_experiment("bench-serving")
            name = f"bench-serving-{uuid.uuid4().hex[:8]}"
            root.mkdir(parents=True, exist_ok=True)
            with stopwatch() as t:
                pool, versions, kind = register_models(name, sizes.train_rows, root)
            served = Served(name, mlflow_server.url, RowFeed(pool), mlflow_start=mlflow_start,
                            train_seconds=t["seconds"], champion=versions[0][0], champion_kind=kind)  # fmt: skip
            client = registry.client()
            registry.set_alias(client, name, registry.CHAMPION, served.champion)
            with stopwatch() as t:
                for version, what in versions:
                    compile_for_serving(name, version, enabled=True)  # what deploy-model's packaging does
                    mv = client.get_model_version(name, version)
                    served.verdicts.append((version, what, compiling.read_meta(client, mv.run_id) or {}))
            served.compile_seconds = t["seconds"]
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
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    rows: int = 1

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else float("nan")

    def add(self, other: Load) -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.errors += other.errors


def sequential(url: str, feed: RowFeed, seconds: float, warmup: int = 30) -> Load:
    """One client, one single-row request at a time, for `seconds`."""
    out = Load()
    client = LeanClient(url)
    try:
        for _ in range(warmup):
            client.post(feed.next_body())
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            body = feed.next_body()
            t0 = time.perf_counter()
            status, _ = client.post(body)
            out.latencies.append(time.perf_counter() - t0)
            out.errors += status != 200
        out.seconds = time.perf_counter() - began
    finally:
        client.close()
    return out


async def _concurrent(url: str, feed: RowFeed, clients: int, seconds: float) -> Load:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    out = Load()
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]
    try:
        for reader, writer in conns:  # warm-up: every connection once
            await _apost(reader, writer, _request(host, int(port), feed.next_body()))
        deadline = time.perf_counter() + seconds

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while time.perf_counter() < deadline:
                req = _request(host, int(port), feed.next_body())
                t0 = time.perf_counter()
                status = await _apost(reader, writer, req)
                out.latencies.append(time.perf_counter() - t0)
                out.errors += status != 200

        began = time.perf_counter()
        await asyncio.gather(*(worker(r, w) for r, w in conns))
        out.seconds = time.perf_counter() - began
    finally:
        for _, writer in conns:
            writer.close()
    return out


def concurrent(url: str, feed: RowFeed, clients: int, seconds: float) -> Load:
    """`clients` connections each sending single-row requests back to back, for `seconds`."""
    return asyncio.run(_concurrent(url, feed, clients, seconds))


def batch(url: str, feed: RowFeed, rows: int = BATCH_ROWS) -> tuple[Load, range]:
    """One request of `rows` distinct rows."""
    block = feed.take(rows)
    body = feed.body(block)
    client = LeanClient(url)
    try:
        t0 = time.perf_counter()
        status, _ = client.post(body)
        elapsed = time.perf_counter() - t0
    finally:
        client.close()
    return Load([elapsed], elapsed, int(status != 200), rows), block


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

    def run_batch(self, block: range) -> None:
        from mlflow.pyfunc import scoring_server
        from threadpoolctl import threadpool_limits

        part = self.feed.frame.iloc[block.start : block.stop]
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


def agree(served: Served, rows: int = 200) -> bool:
    """Both servers give the same answers on the same rows, alone and as a batch (a sanity check, not timed)."""
    block = served.feed.take(rows)
    answers = {}
    for label in LABELS:
        one_by_one = [
            httpx.post(served.url(label) + "/invocations", content=served.feed.body([i]), headers=JSON_HEADERS,
                       timeout=30).json()["predictions"][0]
            for i in block
        ]  # fmt: skip
        together = httpx.post(served.url(label) + "/invocations", content=served.feed.body(block),
                              headers=JSON_HEADERS, timeout=30).json()["predictions"]  # fmt: skip
        answers[label] = (one_by_one, together)
    return answers["mlflow serve"] == answers["flywheel"] and answers["flywheel"][0] == answers["flywheel"][1]


def memory(served: Served) -> dict[str, dict[str, float]]:
    from bench.memory import PROC, tree_memory_mb

    if not PROC.is_dir():
        return {}
    return {label: tree_memory_mb(served.servers[label].pid) for label in LABELS}


# --------------------------------------------------------------------------------------------------- report
def _load_rows(res: BenchResult, label: str, phase: str, load: Load) -> None:
    s = summarize(load.latencies)
    errs = f", {load.errors} errors" if load.errors else ""
    res.add(f"{label}: {phase} req/s", load.rps, "req/s", note=f"{s['n']} requests{errs}")
    res.add(f"{label}: {phase} p50", s["p50_ms"], "ms")
    res.add(f"{label}: {phase} p99", s["p99_ms"], "ms")


def _threads(threads: int) -> str:
    return f"{threads} OpenMP thread{'s' if threads > 1 else ''}"


def _compiled_rows(res: BenchResult, served: Served) -> None:
    compiled = sum(1 for _, _, meta in served.verdicts if meta.get("ok"))
    res.add("versions compiled (served by onnxruntime)", float(compiled), "", "info",
            f"of {len(served.verdicts)} packaged; the others serve through pyfunc")  # fmt: skip
    for version, what, meta in served.verdicts:
        parity = meta.get("parity") or {}
        value = float(parity.get("labels_differ", parity.get("values_differ", -1))) if parity else None
        reason = str(meta.get("reason") or "no compiled.json")
        res.add(f"v{version} ({what}): labels that differ from pyfunc", value, "", "info", reason)


def run(quick: bool, root: Path) -> BenchResult:
    res = BenchResult("serving", TITLE, quick)
    sizes = Sizes.for_mode(quick)
    per_round = sizes.seconds / sizes.rounds
    with served_model(root, quick) as served:
        res.fixed("MLflow tracking server start", served.mlflow_start)
        n = len(served.verdicts)
        res.fixed(f"train + register {n} versions ({sizes.train_rows:,} January rows)", served.train_seconds)
        res.fixed(f"compile + parity check of the {n} versions (packaging)", served.compile_seconds)
        for label, seconds in served.start_seconds.items():
            res.fixed(f"{label}: start until /ping is 200", seconds)
        version = httpx.get(served.url("flywheel") + "/version", timeout=10).json()
        res.add("flywheel serves the champion with onnxruntime", float(version.get("engine") == "onnxruntime"), "",
                "info", f"v{served.champion}, {served.champion_kind}: {version.get('compiled')}")  # fmt: skip
        _compiled_rows(res, served)
        res.add("answers agree on 200 rows, alone and as a batch", float(agree(served)), "", "info",
                "1 = identical predictions")  # fmt: skip
        idle_memory = memory(served)
        limit = InProcess(f"models:/{served.model_name}/{served.champion}", served.feed)

        seq = {label: Load() for label in LABELS}
        conc = {(label, c): Load() for c in sizes.clients for label in LABELS}
        for r in range(sizes.rounds):  # rounds alternate between the servers, in turns
            order = LABELS if r % 2 == 0 else LABELS[::-1]
            for label in order:
                seq[label].add(sequential(served.url(label), served.feed, per_round))
        limit.run_single(sizes.inproc_rows)
        for c in sizes.clients:
            for r in range(sizes.rounds):
                order = LABELS if r % 2 == 0 else LABELS[::-1]
                for label in order:
                    conc[(label, c)].add(concurrent(served.url(label), served.feed, c, per_round))
        bat = {label: Load(rows=BATCH_ROWS) for label in LABELS}
        for label in LABELS:  # one warm-up batch each
            batch(served.url(label), served.feed)
        for r in range(sizes.batches):
            order = LABELS if r % 2 == 0 else LABELS[::-1]
            for label in order:
                load, block = batch(served.url(label), served.feed)
                bat[label].add(load)
                limit.run_batch(block)
        loaded_memory = memory(served)
        res.add("held-out rows used (each request its own)", float(next(served.feed._next)), "rows", "info")

    for label in LABELS:
        _load_rows(res, label, "sequential single-row", seq[label])
    single, single_threads = limit.best("single")
    for threads, values in limit.single.items():
        s = summarize(values)
        res.add(f"in-process pyfunc.predict, single row p50, {_threads(threads)}", s["p50_ms"], "ms", "info",
                f"p99 {s['p99_ms']:.2f} ms")  # fmt: skip
    res.add("in-process pyfunc.predict: single rows/s (1 / mean)", 1000 / single["mean_ms"], "req/s",
            note=_threads(single_threads))  # fmt: skip
    for c in sizes.clients:
        for label in LABELS:
            _load_rows(res, label, f"{c} clients", conc[(label, c)])
    for label in LABELS:
        _load_rows(res, label, f"{BATCH_ROWS:,}-row batch", bat[label])
    batch_best, batch_threads = limit.best("batch")
    inproc_ms = batch_best["p50_ms"]
    for threads, values in limit.batch.items():
        s = summarize(values)
        res.add(f"in-process pyfunc.predict, {BATCH_ROWS:,} rows p50, {_threads(threads)}", s["p50_ms"], "ms",
                "info", f"p99 {s['p99_ms']:.1f} ms")  # fmt: skip
    res.add(f"in-process pyfunc.predict, {BATCH_ROWS:,} rows p50", inproc_ms, "ms",
            note=f"{_threads(batch_threads)}; p99 {batch_best['p99_ms']:.1f} ms")  # fmt: skip
    handler = summarize(limit.handler)
    res.add(f"in-process MLflow scoring handler, {BATCH_ROWS:,} rows p50", handler["p50_ms"], "ms",
            note=f"JSON in → JSON out; p99 {handler['p99_ms']:.1f} ms")  # fmt: skip
    for label in LABELS:
        for when, mem in (("after start", idle_memory), ("after the load", loaded_memory)):
            if label in mem:
                res.add(f"{label}: PSS {when}", mem[label]["pss"], "MB", note=f"{mem[label]['processes']} processes")
        if label in loaded_memory:
            res.add(f"{label}: RSS after the load", loaded_memory[label]["rss"], "MB", "info")

    fly_batch = percentile(bat["flywheel"].latencies, 50) * 1000
    mlf_batch = percentile(bat["mlflow serve"].latencies, 50) * 1000
    seq_ratio = ratio(seq["flywheel"].rps, seq["mlflow serve"].rps)
    res.add("sequential single rows: flywheel / mlflow serve", seq_ratio, "×")
    res.add("sequential single rows: flywheel / in-process pyfunc.predict", ratio(seq["flywheel"].rps,
            1000 / single["mean_ms"]), "×")  # fmt: skip
    for c in sizes.clients:
        res.add(f"{c} clients: flywheel / mlflow serve", ratio(conc[("flywheel", c)].rps,
                conc[("mlflow serve", c)].rps), "×")  # fmt: skip
    top = max(sizes.clients)
    top_load = conc[("flywheel", top)]
    tail = summarize(top_load.latencies)
    res.add(f"{top} clients: flywheel req/s / its sequential req/s", ratio(top_load.rps, seq["flywheel"].rps), "×")
    res.add(f"{top} clients: flywheel p99 / p50", ratio(tail["p99_ms"], tail["p50_ms"]), "×")
    res.add("batch: flywheel / in-process pyfunc.predict", ratio(fly_batch, inproc_ms), "×")
    res.add("batch: mlflow serve / in-process pyfunc.predict", ratio(mlf_batch, inproc_ms), "×")
    res.add("batch: flywheel / in-process MLflow scoring handler", ratio(fly_batch, handler["p50_ms"]), "×")
    mem_ratio = None
    if loaded_memory:
        mem_ratio = ratio(loaded_memory["flywheel"]["pss"], loaded_memory["mlflow serve"]["pss"])
        res.add("PSS after the load: flywheel / mlflow serve", mem_ratio, "×")

    res.goal("single rows, sequential: flywheel ≥ 10× mlflow serve req/s", seq_ratio, ">=", SEQUENTIAL_GOAL)
    res.goal(
        f"single rows, {top} clients: flywheel ≥ 30× mlflow serve req/s",
        ratio(top_load.rps, conc[("mlflow serve", top)].rps), ">=", CONCURRENT_GOAL,
    )  # fmt: skip
    errors = sum(x.errors for x in [*seq.values(), *conc.values(), *bat.values()])
    res.goal("requests that did not answer 200 (both servers, every phase)", float(errors), "<=", 0.0, unit="")
    res.goal(f"{top} clients: flywheel answers at least as fast as with one", ratio(top_load.rps,
             seq["flywheel"].rps), ">=", 1.0)  # fmt: skip
    res.goal(f"{top} clients: flywheel p99 ≤ 5× p50", ratio(tail["p99_ms"], tail["p50_ms"]), "<=", TAIL_GOAL)
    res.goal("10k-row batch: flywheel ≤ 1.5× in-process pyfunc.predict", ratio(fly_batch, inproc_ms), "<=",
             BATCH_GOAL)  # fmt: skip
    res.goal("model server memory (PSS): flywheel ≤ 0.7× mlflow serve", mem_ratio, "<=", MEMORY_GOAL)
    if errors:
        res.errors.append(f"{errors} requests did not answer 200")
    try:
        load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load_avg = "unknown"
    res.notes.append(
        "Client, both servers and this process share the machine's CPUs (and other jobs: load average at the end "
        f"{load_avg}); the lean client is the same for both servers. Phases alternate between the servers in "
        f"{sizes.rounds} rounds."
    )
    res.notes.append(
        f"The champion is {served.champion_kind}; Flywheel serves its compiled form (onnxruntime), `mlflow models "
        "serve` its pyfunc model. The in-process limit is pyfunc.predict on a DataFrame already built."
    )
    return res
