"""The model server's request log: every scored row, kept as Parquet files for the drift check.

Layout: `<root>/<model>/date=YYYY-MM-DD/part-<utc timestamp>-<pid>-<n>.parquet`, one file per flush and day. A row
holds the request's input columns as sent (extra columns such as the event time included), the prediction
(`prediction`, or `prediction_<k>` for multi-output models), `timestamp` (UTC, when it was scored),
`model_version` and `request_id`. An input column whose name clashes with one of those is stored as
`input_<name>`.

The request path only appends a reference to the parsed frame and the predictions to an in-memory buffer (O(1));
a background thread builds the table and writes it every `flush_interval` seconds, when `flush_rows` rows are
waiting, and on close. Files are written under a temporary name and renamed, so a reader never sees half a file.
This module imports no MLflow, so the drift check can read the log cheaply.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import deque
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flywheel.core.names import slug
from flywheel.core.timeutil import utc_timestamp

logger = logging.getLogger("flywheel.request_log")

META_COLUMNS = ("timestamp", "model_version", "request_id")
PREDICTION_COLUMN = "prediction"
PART_GLOB = "part-*.parquet"


def model_dir_name(model_name: str) -> str:
    """A directory name for a registered-model name (path separators and odd characters replaced)."""
    return slug(model_name, keep="._-", fill="_", lower=False, default="_")


# --------------------------------------------------------------------------------------------------- writer
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
        self.s3 = _split_s3(str(root))  # (bucket, key prefix) for an s3:// root, else None
        self.root = Path(root) if self.s3 is None else None
        self.model_name = model_name
        self.dir = (
            self.root / model_dir_name(model_name)
            if self.s3 is None
            else f"s3://{self.s3[0]}/{_join(self.s3[1], model_dir_name(model_name))}"
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
                self.write_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
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
            self.write_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
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
            "last_flush_at": _iso(self.last_flush_at),
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
                table = build_table(entries)
            except Exception as exc:
                self.rows_dropped += rows
                self.write_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("could not build the request log table; %d rows dropped", rows)
                return 0
            written = 0
            days = table["timestamp"].dt.strftime("%Y-%m-%d")
            for day, part in table.groupby(days, sort=True):
                written += self._write_part(str(day), part.reset_index(drop=True))
            self.last_flush_at = time.time()
            return written

    def _write_part(self, day: str, frame: pd.DataFrame) -> int:
        if self.s3 is not None:
            return self._put_part(day, frame)
        folder = self.dir / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{os.getpid()}-{self._seq:06d}.parquet"
        tmp = folder / f".{name}.tmp"
        try:
            try:
                frame.to_parquet(tmp, index=False)
            except Exception:  # mixed-type object columns: store them as text
                _stringify_objects(frame).to_parquet(tmp, index=False)
            os.replace(tmp, folder / name)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            self.rows_dropped += len(frame)
            self.write_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.exception("could not write %s", folder / name)
            return 0
        self.rows_written += len(frame)
        self.files_written += 1
        return len(frame)

    def _put_part(self, day: str, frame: pd.DataFrame) -> int:
        """One object per flush and day under the s3:// root (a PUT is atomic: readers never see half a file)."""
        import io

        bucket, prefix = self.s3
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        key = _join(
            prefix,
            model_dir_name(self.model_name),
            f"date={day}",
            f"part-{stamp}-{os.getpid()}-{self._seq:06d}.parquet",
        )
        buf = io.BytesIO()
        try:
            try:
                frame.to_parquet(buf, index=False)
            except Exception:  # mixed-type object columns: store them as text
                buf = io.BytesIO()
                _stringify_objects(frame).to_parquet(buf, index=False)
            _s3_client().put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
        except Exception as exc:
            self.rows_dropped += len(frame)
            self.write_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.exception("could not write s3://%s/%s", bucket, key)
            return 0
        self.rows_written += len(frame)
        self.files_written += 1
        return len(frame)


def _split_s3(uri: str) -> tuple[str, str] | None:
    if not uri.startswith("s3://"):
        return None
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _s3_client():
    """boto3 itself reads AWS_ENDPOINT_URL_S3 (MinIO, moto) and the credential chain."""
    import boto3

    return boto3.client("s3")


def _read_s3_log(bucket: str, prefix: str, model_name: str, lo, hi) -> list[pd.DataFrame]:
    import io

    s3 = _s3_client()
    base = _join(prefix, model_dir_name(model_name)) + "/"
    frames = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(base) :]
            day_part, _, name = rel.partition("/")
            if not day_part.startswith("date=") or not (name.startswith("part-") and name.endswith(".parquet")):
                continue
            try:
                day = date.fromisoformat(day_part.split("=", 1)[1])
            except ValueError:
                continue
            if (lo is not None and day < lo.date()) or (hi is not None and day > hi.date()):
                continue
            try:
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                frames.append(pd.read_parquet(io.BytesIO(body)))
            except Exception as exc:
                logger.warning("skipping unreadable request log object s3://%s/%s: %s", bucket, obj["Key"], exc)
    return frames


def build_table(entries: list[tuple]) -> pd.DataFrame:
    """One frame from buffered (data, predictions, version, request_ids, ts, n) entries.

    Runs in the writer thread, so it keeps pandas calls per flush, not per request: runs of JSON records become
    one frame, predictions are concatenated as arrays."""
    input_parts: list[pd.DataFrame] = []
    records: list = []
    for data, _, _, _, _, _ in entries:
        if isinstance(data, list):
            records.extend(data)
        elif isinstance(data, dict):
            cols = data["columns"]
            records.extend(dict(zip(cols, row, strict=False)) for row in data["data"])
        else:
            if records:
                input_parts.append(pd.DataFrame.from_records(records))
                records = []
            frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
            input_parts.append(frame.reset_index(drop=True))
    if records:
        input_parts.append(pd.DataFrame.from_records(records))
    with warnings.catch_warnings():  # pandas' FutureWarning about all-NA columns in some parts
        warnings.simplefilter("ignore", FutureWarning)
        inputs = input_parts[0] if len(input_parts) == 1 else pd.concat(input_parts, ignore_index=True)
        preds = _predictions(entries)
    sizes = np.fromiter((e[5] for e in entries), dtype=np.int64, count=len(entries))
    ids: list = []
    for e in entries:
        ids.extend(e[3] if isinstance(e[3], list) else [e[3]] * e[5])
    meta = pd.DataFrame(
        {
            "timestamp": pd.to_datetime(np.repeat(np.array([e[4] for e in entries], dtype="float64"), sizes), unit="s",
                                        utc=True),
            "model_version": np.repeat(np.array([str(e[2]) for e in entries], dtype=object), sizes),
            "request_id": np.array(ids, dtype=object),
        }
    )  # fmt: skip
    clash = [c for c in inputs.columns if c in META_COLUMNS or c in preds.columns]
    if clash:
        inputs = inputs.rename(columns={c: f"input_{c}" for c in clash})
    return pd.concat([inputs, preds, meta], axis=1)


def _predictions(entries: list[tuple]) -> pd.DataFrame:
    arrays = []
    for _, p, _, _, _, n in entries:
        a = p.to_numpy() if isinstance(p, pd.Series) else (np.asarray(p) if isinstance(p, (list, np.ndarray)) else None)
        if a is None or a.ndim != 1 or len(a) != n:
            break
        arrays.append(a)
    else:
        return pd.DataFrame({PREDICTION_COLUMN: np.concatenate(arrays) if len(arrays) > 1 else arrays[0]})
    parts = [_prediction_frame(p, n) for _, p, _, _, _, n in entries]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def _prediction_frame(predictions: Any, n: int) -> pd.DataFrame:
    if isinstance(predictions, pd.DataFrame):
        preds = predictions.reset_index(drop=True)
        if preds.shape[1] == 1:
            return preds.set_axis([PREDICTION_COLUMN], axis=1)
        return preds.set_axis([f"{PREDICTION_COLUMN}_{c}" for c in preds.columns], axis=1)
    if isinstance(predictions, pd.Series):
        return pd.DataFrame({PREDICTION_COLUMN: predictions.reset_index(drop=True)})
    arr = np.asarray(predictions) if isinstance(predictions, (list, tuple, np.ndarray)) else None
    if arr is not None and arr.ndim == 1 and len(arr) == n:
        return pd.DataFrame({PREDICTION_COLUMN: arr})
    if arr is not None and arr.ndim == 2 and len(arr) == n:
        return pd.DataFrame({f"{PREDICTION_COLUMN}_{k}": arr[:, k] for k in range(arr.shape[1])})
    return pd.DataFrame({PREDICTION_COLUMN: [str(predictions)] * n})


def _stringify_objects(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return out


# --------------------------------------------------------------------------------------------------- reader
def read_request_log(
    dir: Path | str,
    model_name: str,
    start: Any = None,
    end: Any = None,
) -> pd.DataFrame:
    """Every logged row of `model_name` under `dir` scored in [start, end) (UTC; naive times are taken as UTC).

    Returns an empty frame (with the metadata columns) when nothing was logged. Sorted by `timestamp`.
    Unreadable files (e.g. a disk that filled up) are skipped with a warning.
    """
    lo, hi = utc_timestamp(start), utc_timestamp(end)
    empty = pd.DataFrame(
        {"timestamp": pd.Series([], dtype="datetime64[ns, UTC]"), "model_version": [], "request_id": []}
    )
    s3 = _split_s3(str(dir))
    folder = Path(dir) / model_dir_name(model_name) if s3 is None else None
    if s3 is None and not folder.is_dir():
        return empty
    frames = _read_s3_log(*s3, model_name, lo, hi) if s3 is not None else []
    for day_dir in sorted(folder.glob("date=*")) if folder is not None else []:
        try:
            day = date.fromisoformat(day_dir.name.split("=", 1)[1])
        except ValueError:
            continue
        if lo is not None and day < lo.date():
            continue
        if hi is not None and day > hi.date():
            continue
        for path in sorted(day_dir.glob(PART_GLOB)):
            try:
                frames.append(pd.read_parquet(path))
            except Exception as exc:
                logger.warning("skipping unreadable request log file %s: %s", path, exc)
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    ts = pd.to_datetime(table["timestamp"], utc=True)
    keep = pd.Series(True, index=table.index)
    if lo is not None:
        keep &= ts >= lo
    if hi is not None:
        keep &= ts < hi
    table = table.loc[keep]
    return table.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()
