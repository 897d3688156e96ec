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

The rows and the client are in bench/serving_load.py, the registered models and the servers in
bench/serving_setup.py; this module measures the in-process limit, runs the phases and builds the figures and goals.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from bench.common import BenchResult, percentile, ratio, summarize
from bench.serving_load import BATCH_ROWS, Load, RowFeed, batch, concurrent, sequential
from bench.serving_setup import Served, Sizes, served_model

TITLE = "Flywheel model server vs mlflow models serve vs in-process predict"
JSON_HEADERS = {"Content-Type": "application/json"}
SEQUENTIAL_GOAL = 10.0  # × mlflow serve req/s, single rows one after another
CONCURRENT_GOAL = 30.0  # × mlflow serve req/s, 32 clients
BATCH_GOAL = 1.5  # × in-process pyfunc.predict, 10,000 rows
MEMORY_GOAL = 0.7  # × mlflow serve PSS
TAIL_GOAL = 5.0  # p99 ≤ 5 × p50 under 32 clients
LABELS = ("mlflow serve", "flywheel")


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
