"""Serving's load: the held-out rows every request takes its own from, one lean HTTP/1.1 client for both servers
(keep-alive sockets, MLflow's `dataframe_split` JSON), and the phases it drives: single rows one after another,
concurrent connections (asyncio), and batches.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

BATCH_ROWS = 10_000


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
