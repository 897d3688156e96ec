"""Request decoding (the codecs): media types, JSON bodies, input format keys, batching keys, frames.

Scoring speaks MLflow's protocol (`mlflow models serve`): JSON (`dataframe_split`, `dataframe_records`,
`instances`, `inputs`, optional `params`), `text/csv` or Parquet. The bodies are parsed into frames by MLflow's own
`mlflow.pyfunc.scoring_server` functions later, in flywheel.serving.scoring; here a body becomes a job, and a
plain one-format tabular JSON body of simple values gets a batching key: requests merge only when they have the
same key. On a slot served by its compiled model, a plain body becomes the model's inputs here, straight from the
JSON lists (flywheel.serving.compiled). Free of HTTP types.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pandas as pd

from flywheel.serving.batching import BATCH_MAX_ROWS_PER_REQUEST, OFFLOAD_BYTES, _Job
from flywheel.serving.compiled import encode_job
from flywheel.serving.errors import ApiError

if TYPE_CHECKING:
    from flywheel.serving.slots import Slot

JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
INPUT_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# JSON value type → batching class: requests merge only when each column's values are of the same class, so each
# merged column holds exactly the values the request alone would give after the schema's cast. In float/double
# schema columns ints and nulls join the floats (the cast makes float64/NaN of them either way).
_VALUE_CLASS = {int: "i", float: "f", type(None): "n", str: "s", bool: "b"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------------------------------- bodies
def media_type(content_type: str | None) -> str:
    """The MIME type of a scoring request's Content-Type (lower case); 415 without one, for a charset other than
    UTF-8 or for other parameters."""
    if not content_type:
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", f"missing Content-Type header: use {JSON}, {CSV} or {PARQUET}")
    mime, *type_params = (p.strip() for p in content_type.split(";"))
    mime = mime.lower()
    options = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in type_params if p)}
    if options.get("charset", "utf-8").lower() != "utf-8":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "the scoring server only supports UTF-8")
    if set(options) - {"charset"}:
        raise ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"unrecognized Content-Type parameters: {', '.join(set(options) - {'charset'})}",
        )
    return mime


def decode_json(body: bytes) -> dict:
    """A JSON scoring body: an object with exactly one of the input fields (400 otherwise)."""
    try:
        decoded = _loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "MALFORMED_REQUEST", f"request body is not valid JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise ApiError(
            400, "BAD_REQUEST",
            "the input must be a JSON object with exactly one of the input fields "
            "'dataframe_split', 'dataframe_records', 'instances' or 'inputs'",
        )  # fmt: skip
    _check_format_keys(decoded)
    return decoded


def decode_csv(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "BAD_REQUEST", f"CSV body is not valid UTF-8: {exc}") from None


def valid_request_id(value: str) -> str | None:
    """`value` if it may be a request id (echoed in a header and stored in the request log), else None."""
    return value if _REQUEST_ID_RE.match(value) else None


def request_id_param(decoded: dict) -> str | None:
    """The caller's request id given as `params.request_id` in a JSON body, if it is a valid one."""
    params = decoded.get("params")
    given = params.get("request_id") if isinstance(params, dict) else None
    return valid_request_id(str(given)) if given is not None else None


def _check_format_keys(decoded: dict) -> None:
    """MLflow's own check, with a message that names the fields received (its own lists none of them)."""
    found = [k for k in decoded if k in INPUT_FORMATS]
    if len(found) == 1:
        return
    from mlflow.pyfunc.utils.serving_data_parser import is_unified_llm_input

    if not found and is_unified_llm_input(decoded):
        return
    other = [k for k in decoded if k not in INPUT_FORMATS and k != "params"]
    got = f"{len(found)} of them ({', '.join(found)})" if found else "none of them"
    raise ApiError(
        400, "BAD_REQUEST",
        f"the input must be a JSON object with exactly one of the fields {', '.join(INPUT_FORMATS)}: got {got}"
        + (f"; unknown field(s): {', '.join(map(str, other))}" if other else ""),
    )  # fmt: skip


def _loads(body: bytes) -> Any:
    """orjson (2-3x faster on big bodies: 10,000 rows 4.5 vs 11.7 ms); the standard parser for what orjson refuses
    but `mlflow models serve` accepts (NaN, Infinity, integers beyond 64 bits) and for the error message."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


# --------------------------------------------------------------------------------------------------- jobs
def json_job(slot: Slot, decoded: Any, rid: str, size: int = 0) -> _Job:
    """A job for a decoded JSON body; batchable when it is plain one-format tabular input of simple values. On a
    compiled slot a plain body (of under OFFLOAD_BYTES: bigger ones are encoded on the worker thread) becomes a
    compiled job, all of one batching key."""
    params = None
    if isinstance(decoded, dict):
        params = decoded.get("params")
        if isinstance(params, dict) and "request_id" in params:
            params = {k: v for k, v in params.items() if k != "request_id"}
            decoded = {**decoded, "params": params} if params else {k: v for k, v in decoded.items() if k != "params"}
            params = params or None
    job = _Job(slot=slot, kind="json", payload=decoded, rid=rid, params=params, size=size, decoded=decoded)
    plain = params is None and isinstance(decoded, dict) and len(decoded) == 1
    if slot.compiled is not None:
        if not plain:
            job.compiled_tried = True
        elif size < OFFLOAD_BYTES:
            ((fmt, value),) = decoded.items()
            job.compiled_tried = True
            if encode_job(job, fmt, value):
                if slot.batchable and job.n <= BATCH_MAX_ROWS_PER_REQUEST:
                    job.key = ("compiled",)
                return job
    if not slot.batchable or not plain:
        return job
    ((fmt, value),) = decoded.items()
    if fmt == "dataframe_records":
        sig = _records_signature(value, slot.float_cols)
        if sig is not None:
            job.kind, job.payload, job.key, job.n = "records", value, sig, len(value)
    elif fmt == "dataframe_split":
        sig = _split_signature(value, slot.float_cols)
        if sig is not None:
            job.kind, job.payload, job.key, job.n = "split", value, sig, len(value["data"])
    return job


def _records_signature(value: Any, float_cols: frozenset = frozenset()) -> tuple | None:
    """(keys, value types) shared by every record, or None when the records are not simple and uniform."""
    if not isinstance(value, list) or not value or len(value) > BATCH_MAX_ROWS_PER_REQUEST:
        return None
    first = value[0]
    if not isinstance(first, dict) or not first:
        return None
    sig = _row_signature(first.items(), float_cols)
    if sig is None:
        return None
    for rec in value[1:]:
        if not isinstance(rec, dict) or _row_signature(rec.items(), float_cols) != sig:
            return None
    return ("records", sig)


def _row_signature(items: Any, float_cols: frozenset) -> tuple | None:
    sig = []
    for k, v in items:
        cls = _VALUE_CLASS.get(type(v))
        if cls is None or (cls == "i" and not _INT64_MIN <= v <= _INT64_MAX):
            return None
        if k in float_cols and (cls == "i" or cls == "n"):
            cls = "f"
        sig.append((k, cls))
    return tuple(sig)


def _split_signature(value: Any, float_cols: frozenset = frozenset()) -> tuple | None:
    if not isinstance(value, dict) or set(value) != {"columns", "data"}:
        return None
    cols, data = value["columns"], value["data"]
    if (
        not isinstance(cols, list)
        or not cols
        or not all(isinstance(c, str) for c in cols)
        or len(set(cols)) != len(cols)
    ):
        return None
    if not isinstance(data, list) or not data or len(data) > BATCH_MAX_ROWS_PER_REQUEST:
        return None
    sig = None
    for row in data:
        if not isinstance(row, list) or len(row) != len(cols):
            return None
        row_sig = _row_signature(zip(cols, row, strict=True), float_cols)
        if row_sig is None or (sig is not None and row_sig != sig):
            return None
        sig = row_sig
    return ("split", sig)


# --------------------------------------------------------------------------------------------------- frames
def _rows(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 1


def _as_frame(data: Any) -> pd.DataFrame | None:
    if isinstance(data, pd.DataFrame):
        return data
    try:
        if isinstance(data, dict):
            return pd.DataFrame({k: np.asarray(v).tolist() if np.ndim(v) > 1 else v for k, v in data.items()})
        if isinstance(data, np.ndarray) and data.ndim <= 2:
            frame = pd.DataFrame(data)
            frame.columns = [str(c) for c in frame.columns]
            return frame
    except Exception:
        return None
    return None
