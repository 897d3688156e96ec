"""Micro-batching: requests are queued to one scoring task on the event loop, which takes everything queued at once.

Single-row JSON requests with the same columns and value types (the batching key, see flywheel.serving.parsing)
are predicted as one frame; the answer per row is the same, and a batch that fails falls back to one request at a
time (flywheel.serving.scoring). On a compiled slot every plain JSON request of up to BATCH_MAX_ROWS_PER_REQUEST rows
has one key: their ONNX inputs are concatenated and predicted in one run (a fraction of a millisecond for dozens of
rows). Big batches, big bodies, upstream slots and a compiled slot's first request for its pyfunc model are
predicted in a worker thread, so the event loop keeps reading requests meanwhile. Free of HTTP types.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flywheel.serving.errors import _error_body

if TYPE_CHECKING:
    from flywheel.serving.slots import Slot

logger = logging.getLogger("flywheel.serving")

MAX_BATCH_ROWS = 2_000  # rows merged into one predict call
BATCH_MAX_ROWS_PER_REQUEST = 64  # bigger requests are scored on their own
OFFLOAD_ROWS = 5_000  # batches at least this big are predicted in a worker thread, not on the event loop
OFFLOAD_BYTES = 256 * 1024  # so are requests with bodies at least this big
MAX_LINGER_SECONDS = 0.002  # longest wait for other clients' requests to join a batch
LINGER_FRACTION = 0.25  # … and at most this share of the recent predict time
CLIENT_WINDOW_SECONDS = 1.0  # connections seen this recently count as concurrent clients


@dataclass(eq=False)
class _Outcome:
    status: int
    body: bytes


@dataclass(eq=False)
class _Job:
    """One /invocations request waiting to be scored."""

    slot: Slot
    kind: str  # compiled, records | split (batchable), json, csv, parquet
    payload: Any
    rid: str
    params: dict | None = None
    key: Any = None  # batching key (None: score alone)
    n: int = 0
    size: int = 0  # request body bytes
    client: Any = None  # the connection (host, port) it came on
    future: asyncio.Future | None = None
    record: bool = True  # count in metrics/slot counters and write to the request log
    decoded: Any = None  # compiled jobs: the JSON body (without params.request_id), for a pyfunc fallback
    feeds: dict | None = None  # compiled jobs: the ONNX inputs
    log: Any = None  # compiled jobs: the rows as the request log keeps them
    compiled_tried: bool = False  # the compiled path was tried (or is not to be): score through pyfunc


class MicroBatcher:
    """The queue of jobs and the one task that scores them, group by group, with `score_group` (`offload`: the
    worker thread for big groups). With `linger`, it waits a moment under concurrent load for the other clients'
    next requests (see `_linger`)."""

    def __init__(
        self,
        score_group: Callable[[list[_Job], bool], list[_Outcome | None]],
        offload: Executor,
        *,
        linger: bool = True,
    ) -> None:
        self._score_group = score_group
        self._offload = offload
        self.linger = linger
        self._queue: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._worker_loop: asyncio.AbstractEventLoop | None = None
        self._clients: dict[Any, float] = {}  # connection → when it last sent a scoring request
        self._clients_pruned = 0.0
        self._compute_ewma = 0.005  # seconds per predict call, recent average
        self._busy = False  # the scoring task is scoring a group (inline scoring waits its turn then)

    async def submit(self, job: _Job) -> _Outcome:
        loop = asyncio.get_running_loop()
        if self._worker_loop is not loop or self._worker is None or self._worker.done():
            self._queue = deque()
            self._wake = asyncio.Event()
            self._worker_loop = loop
            self._worker = loop.create_task(self._score_loop())
        if job.client is not None:
            self._clients[job.client] = time.monotonic()
        if job.kind == "compiled" and not self._queue and not self._busy and self._expected_clients() <= 1:
            # Nothing to batch with (one client, nothing queued or being scored): a compiled job of a few rows
            # costs tens of microseconds, less than the hand-off to the scoring task.
            if job.n < OFFLOAD_ROWS and job.size < OFFLOAD_BYTES:
                out = self._score_group([job], False)[0]
                if out is not None:
                    return out
        job.future = loop.create_future()
        self._queue.append(job)
        self._wake.set()
        return await job.future

    def stop(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self._worker = None
        self._worker_loop = None

    async def _score_loop(self) -> None:
        queue, wake = self._queue, self._wake
        loop = asyncio.get_running_loop()
        while True:
            await wake.wait()
            wake.clear()
            while queue:
                await self._linger(queue)
                jobs, rows = [], 0
                while queue and (not jobs or rows + queue[0].n <= MAX_BATCH_ROWS):
                    job = queue.popleft()
                    jobs.append(job)
                    rows += max(job.n, 1)
                self._busy = True
                for group in _group(jobs):
                    group_rows = sum(j.n for j in group)
                    t0 = time.perf_counter()
                    try:
                        first = group[0]
                        if group_rows >= OFFLOAD_ROWS or first.size >= OFFLOAD_BYTES or first.slot.needs_thread(first):
                            outcomes = await loop.run_in_executor(self._offload, self._score_group, group, True)
                        else:
                            outcomes = self._score_group(group, False)
                            for i, out in enumerate(outcomes):
                                if out is None:  # it needs the pyfunc model, not loaded yet: on the worker thread
                                    redo = self._score_group, [group[i]], True
                                    outcomes[i] = (await loop.run_in_executor(self._offload, *redo))[0]
                    except Exception as exc:  # a bug of ours: answer, never hang
                        logger.exception("scoring failed")
                        err = _Outcome(500, _error_body("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"))
                        outcomes = [err] * len(group)
                    self._compute_ewma = 0.8 * self._compute_ewma + 0.2 * (time.perf_counter() - t0)
                    for job, out in zip(group, outcomes, strict=True):
                        if not job.future.done():
                            job.future.set_result(out)
                self._busy = False
                await asyncio.sleep(0)  # let requests read meanwhile join the next batch

    async def _linger(self, queue: deque) -> None:
        """Under concurrent load, wait a moment for the other clients' next requests so they share one predict.

        Clients in lock-step otherwise arrive one compute apart and never meet. The wait is skipped for a single
        client, ends as soon as every recently seen client has a request queued, and is capped at a fraction of
        the recent predict time (so it can cost at most LINGER_FRACTION of throughput, and gains a batch)."""
        if not self.linger:
            return
        expected = self._expected_clients()
        if expected <= 1 or len(queue) >= expected:
            return
        deadline = time.perf_counter() + min(MAX_LINGER_SECONDS, LINGER_FRACTION * self._compute_ewma)
        while len(queue) < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0)

    def _expected_clients(self) -> int:
        now = time.monotonic()
        if now - self._clients_pruned > CLIENT_WINDOW_SECONDS / 2:
            cutoff = now - CLIENT_WINDOW_SECONDS
            self._clients = {c: t for c, t in self._clients.items() if t >= cutoff}
            self._clients_pruned = now
        return len(self._clients)


def _group(jobs: list[_Job]) -> list[list[_Job]]:
    """Batchable jobs grouped by (slot, batching key), in arrival order; the others alone."""
    groups: dict[Any, list[_Job]] = {}
    out: list[list[_Job]] = []
    for job in jobs:
        if job.key is None:
            out.append([job])
            continue
        k = (id(job.slot), job.key)
        if k not in groups:
            groups[k] = []
            out.append(groups[k])
        groups[k].append(job)
    return out


def _split_predictions(preds: Any, sizes: list[int]) -> list | None:
    total = sum(sizes)
    if isinstance(preds, np.ndarray) and preds.ndim >= 1 and len(preds) == total:
        take = preds.__getitem__
    elif isinstance(preds, (pd.DataFrame, pd.Series)) and len(preds) == total:
        take = preds.iloc.__getitem__
    elif isinstance(preds, list) and len(preds) == total:
        take = preds.__getitem__
    else:
        return None
    parts, start = [], 0
    for n in sizes:
        parts.append(take(slice(start, start + n)))
        start += n
    return parts
