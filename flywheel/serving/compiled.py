"""Compiled inference: a slot's version predicted by onnxruntime, from the parsed JSON body, without a DataFrame.

A version that deploy-model packaged carries its compiled form with its run (flywheel.tasks.compiling: the ONNX
model, its plan and the parity result). A slot serves it only when parity passed, the artefact is of this very model
and checks out; otherwise — or with `FLYWHEEL_COMPILE_MODELS=false` — it serves through pyfunc as before, and the
reason is in /version, /admin/state and the ledger ("compiled: no (2 of 5000 labels differ)").

On a compiled slot a plain JSON request (`dataframe_split`, `dataframe_records`, `instances`, `inputs`; every
column there, each value of its signature's type) becomes the ONNX inputs straight from the lists (`CompiledModel
.encode`); everything else — CSV, Parquet, `params`, nulls where the pipeline refuses them, a value of another type,
a missing column — takes MLflow's own path and gets its answers and errors. The pyfunc model behind that path is
loaded only when a request first needs it (`LazyPyFunc`): its schema errors need no model, and a server whose
traffic is all plain holds no scikit-learn model at all. Rows the compiled model is unsure of (top-two
probabilities within its margin) are answered by pyfunc. Free of HTTP types.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from flywheel.serving.batching import _Job, _Outcome
from flywheel.serving.errors import _clip
from flywheel.tasks.compiling import ENGINE_COMPILED, ENGINE_PYFUNC, CompiledModel, load_compiled

if TYPE_CHECKING:
    from flywheel.serving.metrics import _Metrics
    from flywheel.serving.request_log import RequestLogWriter
    from flywheel.serving.slots import Slot

logger = logging.getLogger("flywheel.serving")

OFF_REASON = "compiled: off (FLYWHEEL_COMPILE_MODELS=false)"
UPSTREAM_REASON = "pyfunc in the version's own container (MLflow's scoring server)"


class LazyPyFunc:
    """A version's `mlflow.pyfunc` model, loaded on the first prediction that needs it.

    `metadata` is the version's MLmodel (signature, input example) from the start. Before the model is loaded, a
    prediction first runs MLflow's own input validation (`_validate_prediction_input`, what `PyFuncModel.predict`
    runs first), so a request that fails the schema is refused with MLflow's error and loads nothing."""

    def __init__(self, local_dir: str) -> None:
        from mlflow.models import Model

        self.local_dir = local_dir
        self.metadata = Model.load(local_dir)
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                import mlflow.pyfunc

                t0 = time.perf_counter()
                self._model = mlflow.pyfunc.load_model(self.local_dir)
                logger.info("loaded the pyfunc model of %s in %.2fs", self.local_dir, time.perf_counter() - t0)
        return self._model

    def predict(self, data: Any, params: dict | None = None) -> Any:
        if self._model is None:
            from mlflow.pyfunc import _validate_prediction_input

            meta = self.metadata
            loader = meta.flavors.get("python_function", {}).get("loader_module")
            _validate_prediction_input(data, params, meta.get_input_schema(), meta.get_params_schema(), loader)
        model = self.load()
        return model.predict(data, params=params) if params else model.predict(data)


def load_engine(client: Any, mv: Any, dst: str, *, enabled: bool) -> tuple[CompiledModel | None, str]:
    """(the compiled model the slot serves, or None for pyfunc; why). Never raises: a compiled model that cannot be
    read or loaded means pyfunc, with the reason."""
    if not enabled:
        return None, OFF_REASON
    try:
        return load_compiled(client, mv.run_id, str(mv.source), dst)
    except Exception as exc:
        logger.warning("v%s: compiled model not used: %s: %s", mv.version, type(exc).__name__, exc)
        return None, _clip(f"compiled: no (could not load it: {type(exc).__name__}: {exc})", 500)


def engine_of(slot: Slot) -> str:
    if slot.upstream is not None:  # what its container said predicts there (flywheel.serving.upstream)
        return getattr(slot.model, "engine", ENGINE_PYFUNC)
    return ENGINE_COMPILED if slot.compiled is not None else ENGINE_PYFUNC


def warm_up(compiled: CompiledModel, local_dir: str) -> str | None:
    """Predict the saved input example once through the compiled path (first runs are slow)."""
    try:
        from mlflow.models import Model

        from flywheel.tasks.compiling import json_records

        example = Model.load(local_dir).load_input_example(local_dir)
        if example is None or not hasattr(example, "columns"):
            return None
        enc = compiled.encode("dataframe_records", json_records(example))
        if enc is not None:
            compiled.predict(enc.feeds, enc.n)
        return None
    except Exception as exc:
        return _clip(f"{type(exc).__name__}: {exc}", 500)


# --------------------------------------------------------------------------------------------------- scoring
def encode_job(job: _Job, fmt: str, value: Any) -> bool:
    """Turn `job` into a compiled job when its one input-format value is plain (see the module docstring)."""
    enc = job.slot.compiled.encode(fmt, value)
    if enc is None:
        return False
    job.kind, job.feeds, job.n, job.log = "compiled", enc.feeds, enc.n, enc.log
    return True


def fallback_job(job: _Job) -> _Job:
    """The same request, to be scored through MLflow's parsing and pyfunc."""
    return _Job(slot=job.slot, kind="json", payload=job.decoded, rid=job.rid, size=job.size, client=job.client,
                record=job.record, compiled_tried=True)  # fmt: skip


def score_compiled(
    group: list[_Job], metrics: _Metrics, request_log: RequestLogWriter | None, score_one: Any, may_block: bool
) -> list[_Outcome | None]:
    """Predict a group of compiled jobs as one batch. A job with rows the compiled model is unsure of (or a batch
    onnxruntime fails on) is scored by pyfunc instead; None asks the caller to do that on a worker thread when the
    pyfunc model is not loaded yet and this is the event loop (`may_block` False)."""
    slot = group[0].slot
    total = sum(j.n for j in group)
    try:
        preds, unsure = slot.compiled.predict(slot.compiled.merge([j.feeds for j in group]), total)
    except Exception as exc:  # never seen; pyfunc answers as it would have
        logger.warning("onnxruntime failed on a batch of %d rows (%s): pyfunc scores it", total, exc)
        preds, unsure = None, None
    outcomes: list[_Outcome | None] = []
    served_parts, start, now = [], 0, time.time()
    for job in group:
        if preds is None or (unsure is not None and unsure[start : start + job.n].any()):
            start += job.n
            if not may_block and not slot.model.loaded:
                outcomes.append(None)
            else:
                outcomes.append(score_one(fallback_job(job)))
            continue
        part = preds[start : start + job.n]
        start += job.n
        outcomes.append(_Outcome(200, _predictions_json(part)))
        if job.record:
            slot.requests += 1
            slot.rows += job.n
            served_parts.append(part)
            if request_log is not None:
                request_log.append(job.log, part, slot.version, job.rid, now)
    if served_parts:
        served = served_parts[0] if len(served_parts) == 1 else np.concatenate(served_parts)
        metrics.batch_rows.observe(total)
        metrics.observe_predictions(slot.version, served, len(served))
    return outcomes


_ENCODER: Any = None


def _predictions_json(preds: np.ndarray) -> bytes:
    """`{"predictions": [...]}` byte for byte as MLflow's `predictions_to_json` writes an array (its json.dump of
    `tolist()` with NumpyEncoder), through json's C encoder."""
    global _ENCODER
    if _ENCODER is None:
        from mlflow.utils.proto_json_utils import NumpyEncoder

        _ENCODER = NumpyEncoder()
    return _ENCODER.encode({"predictions": preds.tolist()}).encode()
