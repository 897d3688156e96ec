"""Request decoding (the codecs): media types, JSON bodies, input format keys, batching keys, frames.

Scoring speaks MLflow's protocol (`mlflow models serve`): JSON (`dataframe_split`, `dataframe_records`,
`instances`, `inputs`, optional `params`), `text/csv` or Parquet. The bodies are parsed into frames by MLflow's own
`mlflow.pyfunc.scoring_server` functions later, in flywheel.serving.scoring; here a body becomes a job, and a
plain one-format tabular JSON body of simple values gets a batching key: requests merge only when they have the
same key. On a slot served by its compiled model, a plain body becomes the model's inputs here, straight from the
JSON lists (flywheel.serving.compiled). Before any of that, a JSON body nested deeper than MAX_JSON_DEPTH and a
ragged request (a row of the wrong length, in every shape above) are refused with a 400 naming the problem.
Free of HTTP types.
"""

from __future__ import annotations

import csv
import io
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
# schema columns ints and nulls join the floats (the cast makes float64/NaN of them either way); `Any` columns get
# no cast, so there every class stays apart.
_VALUE_CLASS = {int: "i", float: "f", type(None): "n", str: "s", bool: "b"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Deepest nesting of arrays/objects a JSON body may have. numpy arrays have at most 64 dimensions, so no tensor
# input needs more; the rest leaves room for the wrapping objects. Checked on the bytes before parsing: a body of
# 100,000 `[` made the fallback parser raise RecursionError (a 500) — issue 15, item 7.
MAX_JSON_DEPTH = 100
_DEPTH_PREFIX_BYTES = 65_536  # scanned first: a nesting attack is refused without reading the rest of the body
_NOT_STRUCTURAL = bytes(c for c in range(256) if c not in b'"[]{}')
_JSON_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')


# --------------------------------------------------------------------------------------------------- bodies
def bad_request(message: str, code: str = "BAD_REQUEST") -> ApiError:
    """The 400 for a request body the server cannot score: one it cannot read at all is MALFORMED_REQUEST, one
    whose content is wrong (a missing field, a ragged row) BAD_REQUEST."""
    return ApiError(400, code, message)


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
    check_json_depth(body)
    try:
        decoded = _loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "MALFORMED_REQUEST") from None
    if not isinstance(decoded, dict):
        raise bad_request(
            "the input must be a JSON object with exactly one of the input fields "
            "'dataframe_split', 'dataframe_records', 'instances' or 'inputs'",
        )  # fmt: skip
    _check_format_keys(decoded)
    return decoded


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted on its bytes (brackets inside strings do
    not count), without parsing it: numpy over the structural characters only (780 kB of records: ~6 ms). A text
    with at most MAX_JSON_DEPTH brackets is not scanned: their count (an upper bound) is returned."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return min(body.count(b"[") + body.count(b"{"), MAX_JSON_DEPTH)  # cannot be deeper than that
    if b"\\" in body:  # escaped quotes: drop the strings exactly first (slower, rare)
        body = _JSON_STRING_RE.sub(b'""', body)
    a = np.frombuffer(body.translate(None, _NOT_STRUCTURAL), np.uint8)
    if a.size == 0:
        return 0
    inside = np.bitwise_xor.accumulate((a == 34).view(np.uint8)).view(bool)  # after an odd number of quotes
    step = ((a == 91) | (a == 123)).view(np.int8) - ((a == 93) | (a == 125)).view(np.int8)
    step *= ~inside
    return int(np.cumsum(step, dtype=np.int64).max())


def check_json_depth(body: bytes) -> None:
    """400 for a JSON body nested deeper than MAX_JSON_DEPTH, before any parser sees it."""
    depth = json_depth(body[:_DEPTH_PREFIX_BYTES])
    if depth <= MAX_JSON_DEPTH and len(body) > _DEPTH_PREFIX_BYTES:
        depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        too_deep = f"more than {MAX_JSON_DEPTH} levels of arrays/objects (the limit is {MAX_JSON_DEPTH})"
        raise bad_request(f"request body is nested too deeply: {too_deep}", "MALFORMED_REQUEST")


def decode_csv(body: bytes) -> str:
    """A CSV scoring body as text; 400 for one that is not UTF-8 or has a ragged row (`check_csv_rows`)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"CSV body is not valid UTF-8: {exc}") from None
    check_csv_rows(text)
    return text


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
    raise bad_request(
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


# --------------------------------------------------------------------------------------------------- row shapes
def check_rows(decoded: Any, schema: Any = None) -> None:
    """400 naming the row for a ragged request, in every tabular shape of the scoring protocol, before MLflow's
    parsing (which pads a short `dataframe_split` row with NaN, so an imputing model scored 3 of 14 values — issue
    15, item 8a): a `dataframe_split` row (or `instances`/`inputs` list row) with another number of values than the
    columns (or than row 0); columnar `instances`/`inputs` of unequal lengths (column-based or no signature);
    records (`dataframe_records`, `instances`/`inputs` lists of objects) of which some lack a column of the
    signature that the others carry (it would arrive as a null). Records lacking it in every row, or one of its
    optional columns, are MLflow's to judge."""
    if not isinstance(decoded, dict):
        return
    for fmt in INPUT_FORMATS:
        if fmt in decoded:
            value = decoded[fmt]
            break
    else:
        return
    if fmt == "dataframe_split":
        if isinstance(value, dict):
            _check_split(value)
    elif isinstance(value, list) and value:
        if all(isinstance(r, dict) for r in value):
            _check_records(fmt, value, schema)
        elif isinstance(value[0], list):
            _check_lengths(fmt, value, len(value[0]), "as row 0")
    elif isinstance(value, dict) and fmt != "dataframe_records" and not _tensor_schema(schema):
        lengths = [(k, len(v)) for k, v in value.items() if isinstance(v, list)]
        for k, n in lengths[1:]:
            if n != lengths[0][1]:
                raise bad_request(
                    f"{fmt}: column {k!r} has {n} values, expected {lengths[0][1]} (as column {lengths[0][0]!r})",
                )  # fmt: skip


def _check_split(value: dict) -> None:
    columns, data = value.get("columns"), value.get("data")
    if not isinstance(data, list) or not data:
        return
    if isinstance(columns, list):
        _check_lengths("dataframe_split", data, len(columns), "one per column")
    elif isinstance(data[0], list):
        _check_lengths("dataframe_split", data, len(data[0]), "as row 0")
    index = value.get("index")
    if isinstance(index, list) and len(index) != len(data):
        raise bad_request(f"dataframe_split: 'index' has {len(index)} entries for {len(data)} rows of 'data'")


def _check_lengths(fmt: str, rows: list, width: int, why: str) -> None:
    for i, row in enumerate(rows):
        n = len(row) if isinstance(row, list) else 1
        if n != width:
            raise bad_request(f"{fmt}: row {i} has {n} values, expected {width} ({why})")


def _check_records(fmt: str, records: list, schema: Any) -> None:
    keys = records[0].keys()
    if all(r.keys() == keys for r in records):  # the common case: one key set
        return
    required = _required_columns(schema)
    if not required:
        return
    carried = sorted(c for c in required if any(c in r for r in records))
    for i, r in enumerate(records):
        missing = [c for c in carried if c not in r]
        if missing:
            raise bad_request(
                f"{fmt}: row {i} lacks {', '.join(map(repr, missing))}, which other rows carry "
                f"(it has {len(carried) - len(missing)} of the {len(carried)} signature columns the request sends)",
            )  # fmt: skip


def _tensor_schema(schema: Any) -> bool:
    try:
        return schema is not None and schema.is_tensor_spec()
    except Exception:
        return False


def _required_columns(schema: Any) -> set[str]:
    """The signature's required input column names (none for a tensor signature or none at all)."""
    if schema is None or _tensor_schema(schema) or not schema.has_input_names():
        return set()
    return {c.name for c in schema.inputs if getattr(c, "required", True)}


def check_csv_rows(text: str) -> None:
    """400 naming the row for a CSV body whose row has another number of fields than the header (pandas pads a
    short row with NaN). Blank lines are skipped, as pandas does."""
    reader = csv.reader(io.StringIO(text))
    width = None
    row_no = -1
    try:
        for fields in reader:
            if not fields:
                continue
            if width is None:
                width = len(fields)
                continue
            row_no += 1
            if len(fields) != width:
                raise bad_request(
                    f"CSV row {row_no} (line {reader.line_num}) has {len(fields)} fields, expected {width} "
                    "(as the header)",
                )  # fmt: skip
    except csv.Error:
        return  # not CSV the csv module reads: MLflow's parser gives its own error


# --------------------------------------------------------------------------------------------------- jobs
def json_job(slot: Slot, decoded: Any, rid: str, size: int = 0) -> _Job:
    """A job for a decoded JSON body; batchable when it is plain one-format tabular input of simple values. On a
    compiled slot a plain body (of under OFFLOAD_BYTES: bigger ones are encoded on the worker thread) becomes a
    compiled job, all of one batching key. A ragged request is refused here (`check_rows`)."""
    check_rows(decoded, slot.input_schema)
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
