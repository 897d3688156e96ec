"""The request log's format and its reader: every row the model server scored, as Parquet files, for the drift check.

Layout: `<root>/<model>/date=YYYY-MM-DD/part-<utc timestamp>-<pid>-<n>.parquet`, one file per flush and day; the
root is a directory or an `s3://bucket/prefix`. A row holds the request's input columns as sent (extra columns
such as the event time included), the prediction (`prediction`, or `prediction_<k>` for multi-output models),
`timestamp` (UTC, when it was scored), `model_version` and `request_id`. An input column whose name clashes with
one of those is stored as `input_<name>`.

The writer (flywheel.serving.request_log) builds its tables with `build_table` and names its files with
`part_name`; the drift check reads them with `read_request_log`. This module imports no MLflow and nothing of the
model server, so the drift check can read the log cheaply.
"""

from __future__ import annotations

import logging
import os
import warnings
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


def part_name(seq: int) -> str:
    """The name of a new part file: `part-<utc timestamp>-<pid>-<seq>.parquet` (matches PART_GLOB)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"part-{stamp}-{os.getpid()}-{seq:06d}.parquet"


def split_s3_uri(uri: str) -> tuple[str, str] | None:
    """(bucket, key prefix) of an `s3://` root; None for a directory."""
    if not uri.startswith("s3://"):
        return None
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


def s3_key(*parts: str) -> str:
    """An S3 key of `parts` joined by "/" (empty parts and stray slashes dropped)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def s3_client():
    """boto3 itself reads AWS_ENDPOINT_URL_S3 (MinIO, moto) and the credential chain."""
    import boto3

    return boto3.client("s3")


# --------------------------------------------------------------------------------------------------- tables
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


def stringify_objects(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with object columns as text (None and NaN kept as null): how mixed-type columns are stored."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return out


# --------------------------------------------------------------------------------------------------- reader
def _read_s3_log(bucket: str, prefix: str, model_name: str, lo, hi) -> list[pd.DataFrame]:
    import io

    s3 = s3_client()
    base = s3_key(prefix, model_dir_name(model_name)) + "/"
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
    s3 = split_s3_uri(str(dir))
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
