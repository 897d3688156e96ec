"""A slot: one loaded model version, and how a version is resolved, loaded, warmed up and released.

The server has two slots (active and standby, see flywheel.serving.server). Loading runs in a worker thread only:
it resolves a version or alias of the configured model in the configured registry, downloads the version and loads
it with `mlflow.pyfunc.load_model` (or, for an upstream slot, only its metadata: see flywheel.serving.upstream),
then predicts the saved input example once, so the first request is not the slow one. A version packaged by
deploy-model is served by its compiled form when that passed parity (flywheel.serving.compiled); its pyfunc model is
then loaded only when a request first needs it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from flywheel.core.timeutil import epoch_iso
from flywheel.serving.compiled import UPSTREAM_REASON, LazyPyFunc, engine_of, load_engine, warm_up
from flywheel.serving.errors import ApiError, _clip
from flywheel.serving.upstream import _Upstream, _upstream_model


@dataclass(eq=False)
class Slot:
    """One loaded model version."""

    version: str
    model: Any  # mlflow.pyfunc.PyFuncModel (or a LazyPyFunc beside a compiled model, or an _Upstream)
    input_schema: Any
    run_id: str | None
    source: str
    local_dir: str | None
    loaded_at: float
    load_seconds: float
    requested_as: str
    batchable: bool = True
    float_cols: frozenset = frozenset()  # input columns of float/double type (see parsing._VALUE_CLASS)
    warmup_error: str | None = None
    upstream: str | None = None  # base URL of the process that predicts for this slot; None: in this process
    compiled: Any = None  # flywheel.tasks.compiling.CompiledModel when the compiled form serves; None: pyfunc
    engine_reason: str = ""  # why it is (not) compiled, e.g. "compiled: no (2 of 5000 labels differ)"
    activated_at: float | None = None
    was_active: bool = False
    requests: int = 0  # requests this slot answered (any status)
    errors: int = 0  # requests whose prediction failed after the input passed the schema (model faults)
    rejected: int = 0  # requests refused as bad input (parse or schema errors)
    rows: int = 0  # rows predicted

    def info(self) -> dict:
        return {
            "version": self.version,
            "uri": self.requested_as,
            "run_id": self.run_id,
            "source": self.source,
            "loaded_at": epoch_iso(self.loaded_at),
            "load_seconds": round(self.load_seconds, 3),
            "activated_at": epoch_iso(self.activated_at),
            "has_served": self.was_active,
            "requests": self.requests,
            "errors": self.errors,
            "rejected": self.rejected,
            "rows": self.rows,
            "warmup_error": self.warmup_error,
            "upstream": self.upstream,
            "engine": self.engine,
            "compiled": self.engine_reason,
            "batching": self.batchable,  # requests to it may be merged (see batchable_schema)
        }

    @property
    def engine(self) -> str:
        """What predicts: `onnxruntime` (the compiled model) or `pyfunc`."""
        return engine_of(self)

    def needs_thread(self, job: Any) -> bool:
        """Whether `job` must be scored off the event loop: an upstream slot (network), or a request for the
        pyfunc model of a compiled slot before that model is loaded (the first one loads it)."""
        return self.upstream is not None or (job.kind != "compiled" and not getattr(self.model, "loaded", True))


def model_ref(model_name: str, version: str | None, alias: str | None) -> str:
    """The `models:/` URI of a version or alias of `model_name`."""
    return f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{version}"


def load_slot(
    model_name: str,
    version: str | None,
    alias: str | None,
    *,
    tracking_uri: str,
    registry_uri: str,
    upstream: str | None = None,
    batching: bool = True,
    compiled: bool = True,
) -> Slot:
    """Resolve a version or alias of `model_name` in the registry and load it (or, with `upstream`, its metadata,
    the predicting being done by the process at that URL); with `compiled`, its compiled form when it has one that
    passed parity. Raises ApiError: 404 when the registry has no such version or alias, 502 when the registry or
    the load fails; nothing is left on disk then."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    ref = model_ref(model_name, version, alias)
    t0 = time.perf_counter()
    dst = None
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        try:
            mv = (
                client.get_model_version_by_alias(model_name, alias)
                if alias
                else client.get_model_version(model_name, version)
            )
            download_uri = client.get_model_version_download_uri(model_name, mv.version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise ApiError(
                    404, "RESOURCE_DOES_NOT_EXIST", f"{ref} not found in the registry: {exc.message}"
                ) from exc
            raise ApiError(502, "REGISTRY_ERROR", f"registry error resolving {ref}: {exc.message}") from exc
        except Exception as exc:  # connection errors and the like
            raise ApiError(502, "REGISTRY_ERROR", f"registry unreachable resolving {ref}: {exc}") from exc
        dst = tempfile.mkdtemp(prefix=f"flywheel-serve-v{mv.version}-")
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, tracking_uri=tracking_uri, dst_path=dst
            )
            engine, reason = None, UPSTREAM_REASON
            if not upstream:
                engine, reason = load_engine(client, mv, tempfile.mkdtemp(dir=dst), enabled=compiled)
            if upstream:
                model = _upstream_model(upstream, local)
                reason = model.engine_reason or reason
            elif engine is not None:
                model = LazyPyFunc(local)
            else:
                model = mlflow.pyfunc.load_model(local)
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(
                502, "LOAD_FAILED", f"could not load {ref} (v{mv.version}): {type(exc).__name__}: {exc}"
            ) from exc
        slot = Slot(
            version=str(mv.version),
            model=model,
            input_schema=model.metadata.get_input_schema(),
            run_id=mv.run_id,
            source=str(mv.source),
            local_dir=dst,
            loaded_at=time.time(),
            load_seconds=0.0,
            requested_as=ref,
            upstream=upstream,
            compiled=engine,
            engine_reason=reason,
        )
        slot.batchable = batching and _batchable_schema(model)
        slot.float_cols = _float_columns(slot.input_schema)
        slot.warmup_error = warm_up(engine, local) if engine is not None else _warm_up(model, local)
        slot.load_seconds = time.perf_counter() - t0
        return slot
    except BaseException:
        _remove_dir(dst)
        raise


# What loading a first compiled version imports. Imported ahead (flywheel.core.imports) on the loader thread while
# the server is idle, so the first standby load (the first champion after `flywheel up`) does not pay seconds of cold
# imports on a busy machine. scikit-learn and skops are left out on purpose: a compiled version never imports them,
# and importing them ahead costs every model server ~105 MB of memory (measured), which only a version served
# through pyfunc needs; that load imports them itself.
LOAD_IMPORTS = ("mlflow.pyfunc", "mlflow.models", "mlflow.artifacts", "onnxruntime")


def _float_columns(schema: Any) -> frozenset:
    from mlflow.types.schema import DataType

    if schema is None or not schema.has_input_names():
        return frozenset()
    return frozenset(
        n
        for n, t in zip(schema.input_names(), schema.input_types(), strict=True)
        if t in (DataType.float, DataType.double)
    )


def _batchable_schema(model: Any) -> bool:
    """Whether requests to `model` may be merged: see `batchable_schema` (type-hint signatures never are)."""
    meta = model.metadata
    if hasattr(meta, "_is_signature_from_type_hint") and meta._is_signature_from_type_hint():
        return False
    return batchable_schema(meta.get_input_schema())


def batchable_schema(schema: Any) -> bool:
    """Merge requests only for plain column schemas of scalar or `Any` columns (no tensors, datetimes — parsed
    with a format inferred from the data —, binaries, arrays, objects or maps).

    MLflow's schema enforcement leaves an `Any` column as the request's values make it (no cast), so a merged
    frame gives each row what it gets alone only when the rows' Python value types agree per column: the batching
    key (flywheel.serving.parsing) keeps ints, floats, nulls, strings and bools of such a column apart (`Any`
    columns are never in `Slot.float_cols`), and every signature since issue 14 has them."""
    from mlflow.types.schema import AnyType, DataType

    if schema is None or not schema.has_input_names() or schema.is_tensor_spec():
        return False
    scalar = {DataType.boolean, DataType.integer, DataType.long, DataType.float, DataType.double, DataType.string}
    return all(isinstance(t, AnyType) or (isinstance(t, DataType) and t in scalar) for t in schema.input_types())


def _warm_up(model: Any, local_dir: str) -> str | None:
    """Predict the saved input example once (first calls are slow); the error text if that fails."""
    try:
        from mlflow.models import Model

        example = Model.load(local_dir).load_input_example(local_dir)
        if example is None:
            return None
        model.predict(example)
        return None
    except Exception as exc:
        return _clip(f"{type(exc).__name__}: {exc}", 500)


def _release(slot: Slot) -> None:
    _remove_dir(slot.local_dir)
    if isinstance(slot.model, _Upstream):
        slot.model.close()


def _remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
