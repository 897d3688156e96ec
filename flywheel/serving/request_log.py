"""The model server's request log writer: every scored row, written as Parquet files for the drift check.

The format (layout, columns, file names) and the reader are flywheel.tasks.request_log's. The request path only
appends a reference to the parsed frame and the predictions to an in-memory buffer (O(1)); a background thread
builds the table and writes it every `flush_interval` seconds, when `flush_rows` rows are waiting, and on close.
Files are written under a temporary name and renamed (an S3 PUT is atomic), so a reader never sees half a file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pandas as pd

from flywheel.core.timeutil import epoch_iso
from flywheel.tasks.request_log import (
    build_table,
    model_dir_name,
    part_name,
    s3_client,
    s3_key,
    split_s3_uri,
    stringify_objects,
)

logger = logging.getLogger("flywheel.request_log")

BUILD_PART_ENTRIES = 500  # the table is built this many entries at a time, the GIL handed back in between


def _build_in_parts(entries: list[tuple]) -> pd.DataFrame:
    """`build_table` a part at a time: each part holds the GIL a few milliseconds, and between parts the request
    path gets it back (one build of a 2-second flush at 2,000 requests/s held it ~40 ms, a p99 spike)."""
    if len(entries) <= BUILD_PART_ENTRIES:
        return build_table(entries)
    parts = []
    for i in range(0, len(entries), BUILD_PART_ENTRIES):
        parts.append(build_table(entries[i : i + BUILD_PART_ENTRIES]))
        time.sleep(0)
    return pd.concat(parts, ignore_index=True)


class RequestLogWriter:
    """Buffers scored rows in memory and writes them as Parquet from a background thread."""

    def __init__(
        self,
        root: Path | str,
        model_name: str,
        *,
        flush_interval: float = 2.0,
        flush_rows: int = 20_000,
        max_buffered_rows: int = 1_000_000,
    ) -> None:
        self.s3 = split_s3_uri(str(root))  # (bucket, key prefix) for an s3:// root, else None
        self.root = Path(root) if self.s3 is None else None
        self.model_name = model_name
        self.dir = (
            self.root / model_dir_name(model_name)
            if self.s3 is None
            else f"s3://{self.s3[0]}/{s3_key(self.s3[1], model_dir_name(model_name))}"
        )
        self.flush_interval = flush_interval
        self.flush_rows = flush_rows
        self.max_buffered_rows = max_buffered_rows
        self._buffer: deque = deque()
        self._buffered_rows = 0
        self._lock = threading.Lock()  # guards the buffer swap and the row count
        self._flush_lock = threading.Lock()  # one writer at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self.rows_written = 0
        self.files_written = 0
        self.rows_dropped = 0
        self.write_errors = 0
        self.last_error: str | None = None
        self.last_flush_at: float | None = None

    # ------------------------------------------------------------------ request path (must stay cheap)
    def append(self, data: Any, predictions: Any, version: str, request_ids: list[str] | str, ts: float) -> None:
        """Queue the rows of one scored request or batch: `data` is the decoded JSON records (a list of dicts), a
        `{"columns", "data"}` split dict, or a DataFrame. `request_ids` is one id for all rows or one per row."""
        if isinstance(data, dict):
            rows = data.get("data")
            n = len(rows) if isinstance(rows, list) else 0
        else:
            try:
                n = len(data)
            except TypeError:
                return
        if n == 0:
            return
        with self._lock:
            if self._buffered_rows + n > self.max_buffered_rows:
                self.rows_dropped += n
                return
            self._buffer.append((data, predictions, version, request_ids, ts, n))
            self._buffered_rows += n
            full = self._buffered_rows >= self.flush_rows
        if full:
            self._wake.set()

    @property
    def buffered_rows(self) -> int:
        return self._buffered_rows

    # ------------------------------------------------------------------ background thread
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"flywheel-request-log-{self.model_name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception as exc:  # never let the thread die; count and carry on
                self._failed(exc)
                logger.exception("request log flush failed")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and write whatever is buffered."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self.flush()
        except Exception as exc:
            self._failed(exc)
            logger.exception("final request log flush failed")

    def stats(self) -> dict:
        return {
            "dir": str(self.dir),
            "buffered_rows": self._buffered_rows,
            "rows_written": self.rows_written,
            "files_written": self.files_written,
            "rows_dropped": self.rows_dropped,
            "write_errors": self.write_errors,
            "last_error": self.last_error,
            "last_flush_at": epoch_iso(self.last_flush_at),
        }

    # ------------------------------------------------------------------ flushing
    def flush(self) -> int:
        """Write everything buffered now; returns the number of rows written."""
        with self._flush_lock:
            with self._lock:
                if not self._buffer:
                    return 0
                entries = list(self._buffer)
                self._buffer.clear()
                self._buffered_rows = 0
            rows = sum(e[5] for e in entries)
            try:
                table = _build_in_parts(entries)
            except Exception as exc:
                self._failed(exc, dropped=rows)
                logger.exception("could not build the request log table; %d rows dropped", rows)
                return 0
            written = 0
            if len({int(e[4] // 86_400) for e in entries}) == 1:  # the usual case: one UTC day, no split
                written += self._write_part(time.strftime("%Y-%m-%d", time.gmtime(entries[0][4])), table)
            else:
                for day, part in table.groupby(table["timestamp"].dt.floor("D"), sort=True):
                    written += self._write_part(day.strftime("%Y-%m-%d"), part.reset_index(drop=True))
            self.last_flush_at = time.time()
            return written

    def _write_part(self, day: str, frame: pd.DataFrame) -> int:
        if self.s3 is not None:
            return self._put_part(day, frame)
        folder = self.dir / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = part_name(self._seq)
        tmp = folder / f".{name}.tmp"
        try:
            try:
                frame.to_parquet(tmp, index=False)
            except Exception:  # mixed-type object columns: store them as text
                stringify_objects(frame).to_parquet(tmp, index=False)
            os.replace(tmp, folder / name)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            self._failed(exc, dropped=len(frame))
            logger.exception("could not write %s", folder / name)
            return 0
        return self._written(len(frame))

    def _put_part(self, day: str, frame: pd.DataFrame) -> int:
        """One object per flush and day under the s3:// root (a PUT is atomic: readers never see half a file)."""
        import io

        bucket, prefix = self.s3
        self._seq += 1
        key = s3_key(prefix, model_dir_name(self.model_name), f"date={day}", part_name(self._seq))
        buf = io.BytesIO()
        try:
            try:
                frame.to_parquet(buf, index=False)
            except Exception:  # mixed-type object columns: store them as text
                buf = io.BytesIO()
                stringify_objects(frame).to_parquet(buf, index=False)
            s3_client().put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
        except Exception as exc:
            self._failed(exc, dropped=len(frame))
            logger.exception("could not write s3://%s/%s", bucket, key)
            return 0
        return self._written(len(frame))

    def _failed(self, exc: Exception, dropped: int = 0) -> None:
        """Count a failed flush or write (and the rows it dropped); its message shows in `stats()`."""
        self.rows_dropped += dropped
        self.write_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _written(self, rows: int) -> int:
        self.rows_written += rows
        self.files_written += 1
        return rows
