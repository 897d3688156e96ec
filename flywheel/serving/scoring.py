"""Scoring a job, or a group of jobs with one batching key, exactly as `mlflow models serve` does.

A job's payload is parsed by MLflow's own `mlflow.pyfunc.scoring_server` functions, predicted by
`PyFuncModel.predict` (schema enforcement included) and encoded by its `predictions_to_json`, so answers equal
`mlflow.pyfunc.load_model(uri).predict(df)`. A group is merged into one frame and predicted once; when that fails
(some request in it is bad) or the predictions cannot be split per request, its jobs are scored one at a time.
Scored rows are counted (slot counters, metrics) and appended to the request log. Jobs of a compiled slot that
became its model's inputs are predicted by onnxruntime (flywheel.serving.compiled); the others take the path above.
Runs on the scoring task or in a worker thread; no MLflow call and no disk I/O beyond the model's own.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING

from flywheel.serving.batching import _Job, _Outcome, _split_predictions
from flywheel.serving.compiled import encode_job, score_compiled
from flywheel.serving.errors import _error_body, _mlflow_message
from flywheel.serving.parsing import _as_frame, _rows
from flywheel.serving.upstream import UpstreamError

if TYPE_CHECKING:
    from flywheel.serving.metrics import _Metrics
    from flywheel.serving.request_log import RequestLogWriter


def score_group(
    group: list[_Job], metrics: _Metrics, request_log: RequestLogWriter | None, may_block: bool = True
) -> list[_Outcome | None]:
    """Outcomes in job order; None for a job that needs the pyfunc model of a compiled slot before it is loaded,
    when `may_block` is False (the event loop): the batcher then scores it on its worker thread."""
    if group[0].kind == "compiled":
        return score_compiled(group, metrics, request_log, lambda j: score_one(j, metrics, request_log), may_block)
    if len(group) == 1:
        return [score_one(group[0], metrics, request_log)]
    from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

    slot, first = group[0].slot, group[0]
    try:
        if first.kind == "records":
            merged = [r for j in group for r in j.payload]
            frame = dataframe_from_parsed_json(merged, "records", slot.input_schema)
        else:
            merged = {
                "columns": first.payload["columns"],
                "data": [row for j in group for row in j.payload["data"]],
            }
            frame = dataframe_from_parsed_json(merged, "split", slot.input_schema)
        preds = slot.model.predict(frame)
        parts = _split_predictions(preds, [j.n for j in group])
    except Exception:
        parts = None
    if parts is None:  # some request in the batch is bad (or the output cannot be split): one at a time
        return [score_one(j, metrics, request_log) for j in group]
    from mlflow.pyfunc.scoring_server import predictions_to_json

    total = sum(j.n for j in group)
    outcomes = []
    for part in parts:
        buf = io.StringIO()
        predictions_to_json(part, buf)
        outcomes.append(_Outcome(200, buf.getvalue().encode()))
    slot.requests += len(group)
    slot.rows += total
    metrics.batch_rows.observe(total)
    metrics.observe_predictions(slot.version, preds, total)
    if request_log is not None:
        request_log.append(merged, preds, slot.version, [j.rid for j in group for _ in range(j.n)], time.time())
    return outcomes


def score_one(job: _Job, metrics: _Metrics, request_log: RequestLogWriter | None) -> _Outcome:
    """Parse, predict and encode one request exactly as `mlflow models serve` does (a plain JSON request on a
    compiled slot: by its compiled model)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server as ss
    from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

    slot = job.slot
    if job.kind == "compiled" or _compiles(job):
        return score_compiled([job], metrics, request_log, lambda j: score_one(j, metrics, request_log), True)[0]
    if job.record:
        slot.requests += 1
    unwrap, params = False, job.params
    try:
        if job.kind in ("records", "split"):
            data = dataframe_from_parsed_json(job.payload, job.kind, slot.input_schema)
        elif job.kind == "json":
            parsed = ss._parse_json_data(job.payload, slot.model.metadata, slot.input_schema)
            data, unwrap, params = parsed.data, parsed.is_unified_llm_input, parsed.params
        elif job.kind == "csv":
            data = ss.parse_csv_input(io.StringIO(job.payload), schema=slot.input_schema)
        else:
            data = ss.parse_parquet_input(io.BytesIO(job.payload))
    except Exception as exc:
        if job.record:
            slot.rejected += 1
        code = getattr(exc, "error_code", None) or "BAD_REQUEST"
        if code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"):
            code = "BAD_REQUEST"
        return _Outcome(400, _error_body(code, f"Could not parse the input: {_mlflow_message(exc)}"))
    try:
        preds = slot.model.predict(data, params=params) if params else slot.model.predict(data)
    except MlflowException as exc:
        if job.record:
            slot.rejected += 1
        return _Outcome(400, _error_body(exc.error_code or "BAD_REQUEST", _mlflow_message(exc)))
    except UpstreamError as exc:
        if job.record:
            slot.errors += 1
        return _Outcome(502, _error_body("UPSTREAM_ERROR", f"v{slot.version} could not predict: {exc}"))
    except Exception as exc:
        if job.record:
            slot.errors += 1
        return _Outcome(
            400,
            _error_body(
                "PREDICTION_FAILED",
                f"The model failed on this input: {type(exc).__name__}: {exc}. Verify that the input is"
                " compatible with the model.",
            ),
        )
    buf = io.StringIO()
    try:
        (ss.unwrapped_predictions_to_json if unwrap else ss.predictions_to_json)(preds, buf)
    except Exception as exc:
        if job.record:
            slot.errors += 1
        return _Outcome(500, _error_body("INTERNAL_ERROR", f"could not encode the predictions: {exc}"))
    if job.record:
        n = _rows(data)
        slot.rows += n
        metrics.batch_rows.observe(n)
        metrics.observe_predictions(slot.version, preds, n)
        if request_log is not None:
            logged = job.payload if job.kind in ("records", "split") else _as_frame(data)
            if logged is not None:
                request_log.append(logged, preds, slot.version, job.rid, time.time())
    return _Outcome(200, buf.getvalue().encode())


def _compiles(job: _Job) -> bool:
    """A JSON job on a compiled slot not yet tried on the compiled path (a big body): encode it here."""
    if job.slot.compiled is None or job.kind != "json" or job.compiled_tried:
        return False
    job.compiled_tried = True
    decoded = job.payload
    if job.params is not None or not isinstance(decoded, dict) or len(decoded) != 1:
        return False
    ((fmt, value),) = decoded.items()
    return encode_job(job, fmt, value)


class _ExtraInputFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Found extra inputs in the model input")


def _quiet_mlflow_extra_input_warning() -> None:
    """pyfunc logs a warning per request with extra columns (they are ignored, as documented); drop it."""
    log = logging.getLogger("mlflow.models.utils")
    if not any(isinstance(f, _ExtraInputFilter) for f in log.filters):
        log.addFilter(_ExtraInputFilter())
