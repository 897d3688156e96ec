"""MLflow I/O: the tracking-server check, logging a trained candidate, registering it with its lineage,
finding a version by lineage, and moving aliases.

Lineage tags are set in the same call that creates a version (`create_model_version(tags=...)`), so a
version never exists without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.errors import UserError

CHAMPION = "champion"
CHALLENGER = "challenger"
PRODUCTION_STAGE = "Production"

# Version tag keys (plain names so they are easy to filter on in the MLflow UI and search API).
TAG_DATA_HASH = "data_hash"
TAG_PARAMS_HASH = "params_hash"
TAG_CODE_VERSION = "code_version"
TAG_FLOW_RUN = "prefect_flow_run_id"
TAG_SOURCE = "data_source"
TAG_WINDOW = "data_window"
TAG_ESTIMATOR = "estimator"
TAG_GATE_PASSED = "gate_passed"
TAG_GATE_REASONS = "gate_reasons"
REFERENCE_ARTIFACT = "reference/train_sample.parquet"
HOLDOUT_ARTIFACT = "reference/holdout_sample.parquet"

_SOURCE_ROOTS = ("tasks", "flows")


class RegistryUnavailableError(UserError, RuntimeError):
    """The MLflow tracking server cannot be reached."""


def configure_client_retries() -> None:
    """Bound MLflow's HTTP retries (its default of 7 with backoff takes minutes against a dead server)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAXRETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    configure_client_retries()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_tracking_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Raise RegistryUnavailableError unless an http(s) tracking server answers its /health endpoint."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import httpx

    url = tracking_uri.rstrip("/") + "/health"
    try:
        resp = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RegistryUnavailableError(f"MLflow tracking server {tracking_uri} is unreachable: {exc}") from exc
    if resp.status_code != 200:
        raise RegistryUnavailableError(f"MLflow tracking server {tracking_uri} answered {resp.status_code} on /health")


def code_version(model_specs: Sequence[Any] = ()) -> str:
    """A hash of the pipeline's own source (tasks/ and flows/) and of the user's code the candidates `model_specs`
    run (a factory's module, an estimator class of their own: `ModelSpec.user_code`): same code → same version, git
    or not. Candidates of scikit-learn or installed libraries only add nothing to it."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in _SOURCE_ROOTS:
        for path in sorted((root / sub).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    for digest in sorted({d for d in (m.user_code().digest() for m in model_specs) if d}):
        h.update(digest.encode())
    return h.hexdigest()[:12]


def find_version_by_lineage(
    mlflow_client, model_name: str, data_hash: str, params_hash: str, code_ver: str
) -> Any | None:
    """The registered version trained on exactly this data, params and code, if any (the idempotency check)."""
    from mlflow.exceptions import MlflowException

    filt = (
        f"name = '{model_name}' and tags.{TAG_DATA_HASH} = '{data_hash}' "
        f"and tags.{TAG_PARAMS_HASH} = '{params_hash}' and tags.{TAG_CODE_VERSION} = '{code_ver}'"
    )
    try:
        found = mlflow_client.search_model_versions(filter_string=filt)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    live = [v for v in found if v.status == "READY"]
    return max(live, key=lambda v: int(v.version)) if live else None


def get_alias_version(mlflow_client, model_name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def ensure_registered_model(mlflow_client, model_name: str, description: str = "") -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(model_name, description=description or None)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise


def pip_requirements(model: Any = None, extra: Sequence[str] = ()) -> list[str]:
    """Explicit requirements (MLflow's inference of them costs ~9 s a model): Flywheel's base set, then `extra`
    and the installed distributions the model's parts come from (LightGBM, XGBoost), pinned."""
    from importlib.metadata import version

    from flywheel.tasks.user_code import requirements_of_modules

    base = [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "scikit-learn", "pandas", "numpy", "skops", "scipy")]
    found = [*extra, *(requirements_of_modules(_component_modules(model)) if model is not None else [])]
    names = {r.partition("==")[0].lower() for r in base}
    for req in found:
        if req.partition("==")[0].lower() not in names:
            names.add(req.partition("==")[0].lower())
            base.append(req)
    return base


def _component_modules(model: Any) -> set[str]:
    """The top-level modules of the classes and functions a (fitted) estimator is made of, through its
    parameters: a pipeline's steps, a column transformer's transformers, a FunctionTransformer's function."""
    import inspect

    tops: set[str] = set()
    seen: set[int] = set()
    stack = [model]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if inspect.isclass(obj) or inspect.isroutine(obj):
            tops.add((getattr(obj, "__module__", None) or "builtins").partition(".")[0])
            continue
        tops.add(type(obj).__module__.partition(".")[0])
        if isinstance(obj, list | tuple):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif callable(getattr(obj, "get_params", None)):
            try:
                stack.extend(obj.get_params(deep=False).values())
            except Exception:  # an estimator whose get_params fails tells us nothing more
                pass
    return tops


def model_storage(model: Any, model_spec: Any) -> dict[str, Any]:
    """The `log_model` arguments saying how a candidate is stored and what it needs to load: the user's code the
    spec runs as `code_paths` (MLflow puts them on sys.path when it loads the model, `mlflow models serve` too),
    its serialisation and its pinned pip requirements."""
    from flywheel.tasks.user_code import pinned

    code = model_spec.user_code()
    stored = serialization(model, code)
    pickler = [pinned("cloudpickle")] if stored["serialization_format"] == "cloudpickle" else []
    return {
        "pip_requirements": pip_requirements(model, [*code.requirements, *pickler]),
        "code_paths": [str(p) for p in code.paths] or None,
        **stored,
    }


def serialization(model: Any, code: Any) -> dict[str, Any]:
    """How `log_model` stores the model. With the user's own code (`code.paths`: a factory's functions, their own
    classes) cloudpickle, which stores those by reference to the modules logged beside the model as `code_paths`
    (skops cannot store a lambda or a closure, and would only be told to trust the user's types anyway); else skops
    (MLflow 3's default) with the model's types trusted, or cloudpickle for a model skops cannot store."""
    if not code.paths:
        try:
            return {"serialization_format": "skops", "skops_trusted_types": trusted_types(model)}
        except Exception:  # skops refuses some objects (a lambda, a closure): cloudpickle stores anything
            pass
    return {"serialization_format": "cloudpickle"}


def trusted_types(model: Any) -> list[str]:
    """The types skops must be told to trust for this pipeline (MLflow 3's default serialisation)."""
    import skops.io

    return skops.io.get_untrusted_types(data=skops.io.dumps(model))


def model_params(model_spec: Any) -> dict[str, Any]:
    """A candidate's MLflow run params: the estimator class path and its hyper-parameters as `model.<name>`."""
    return {"estimator": model_spec.class_path, **{f"model.{k}": v for k, v in model_spec.params.items()}}


def raw_rows_signature(inferred: Any) -> Any:
    """The logged model's signature, from the one MLflow infers on raw rows: every feature column by name and
    required (a missing value in it is fine; the column itself is needed), text columns `string` and every other
    column `Any`. MLflow's schema enforcement turns no int64 into double and no float (an integer column with a
    missing value) into long, so no numeric type takes a user's raw rows; the model's first step
    (`raw_input_step`) reads those columns as numbers itself. Extra columns are ignored, as MLflow ignores them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    inputs = [
        ColSpec(DataType.string if col.type == DataType.string else AnyType(), col.name, required=True)
        for col in inferred.inputs.inputs
    ]
    return ModelSignature(inputs=Schema(inputs), outputs=inferred.outputs, params=inferred.params)


@dataclass
class LoggedCandidate:
    run_id: str
    model_uri: str
    model_id: str | None


def log_candidate(
    *,
    model: Any,
    model_spec: Any,
    metrics: dict[str, float],
    X_example: pd.DataFrame,
    y_example: pd.Series,
    training_frame: pd.DataFrame,
    reference_sample: pd.DataFrame,
    holdout_sample: pd.DataFrame | None = None,
    dataset_name: str,
    dataset_source: str,
    target: str,
    data_hash: str,
    tags: dict[str, str],
    confusion_fig: Any | None = None,
    experiment: str = "flywheel",
    run_name: str | None = None,
    run_id: str | None = None,
) -> LoggedCandidate:
    """Log one trained candidate as an MLflow run: params, metrics, dataset input, plots, sample and model.

    With `run_id`, the candidate's existing run (a nested run that already holds its params and metrics) is
    resumed and completed instead of a new run being started.
    """
    import mlflow
    from mlflow.models import infer_signature

    configure_client_retries()
    storage = model_storage(model, model_spec)  # before the run: a model that cannot be stored opens none
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags) as run:
        if run_id is None:
            mlflow.log_params(model_params(model_spec))
            mlflow.log_metrics({f"holdout_{k}": v for k, v in metrics.items()})
        dataset = mlflow.data.from_pandas(training_frame, targets=target, name=dataset_name, digest=data_hash)
        mlflow.log_input(dataset, context="training", tags={"source": dataset_source})
        if confusion_fig is not None:
            mlflow.log_figure(confusion_fig, "confusion_matrix.png")
        with tempfile.TemporaryDirectory() as tmp:
            for frame, artifact in ((reference_sample, REFERENCE_ARTIFACT), (holdout_sample, HOLDOUT_ARTIFACT)):
                if frame is None:
                    continue
                path = Path(tmp) / Path(artifact).name
                frame.to_parquet(path, index=False)
                mlflow.log_artifact(str(path), artifact_path=str(Path(artifact).parent))
        signature = raw_rows_signature(infer_signature(X_example, model.predict(X_example)))
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=signature,
            input_example=X_example.head(3),
            **storage,
        )
        return LoggedCandidate(
            run_id=run.info.run_id, model_uri=info.model_uri, model_id=getattr(info, "model_id", None)
        )


def register_version(
    mlflow_client, model_name: str, logged: LoggedCandidate, tags: dict[str, str], description: str = ""
):
    """Create the registry version with its lineage tags in one call; wait until it is READY."""
    ensure_registered_model(mlflow_client, model_name, "Registered by Flywheel's train flow.")
    return mlflow_client.create_model_version(
        name=model_name,
        source=logged.model_uri,
        run_id=logged.run_id,
        tags={k: str(v) for k, v in tags.items()},
        description=description or None,
        model_id=logged.model_id,
    )


def set_version_tags(mlflow_client, model_name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, str(version), key, str(value))


def set_alias(mlflow_client, model_name: str, alias: str, version: str) -> None:
    mlflow_client.set_registered_model_alias(model_name, alias, str(version))


def version_metrics(mlflow_client, version: Any) -> dict[str, float]:
    """The holdout metrics logged with a version's training run (keys without the `holdout_` prefix)."""
    if not version.run_id:
        return {}
    run = mlflow_client.get_run(version.run_id)
    return {k.removeprefix("holdout_"): v for k, v in run.data.metrics.items() if k.startswith("holdout_")}


def load_sklearn_model(model_name: str, version: str):
    import mlflow.sklearn

    return mlflow.sklearn.load_model(f"models:/{model_name}/{version}")


def load_reference_sample(mlflow_client, version: Any, artifact: str = REFERENCE_ARTIFACT) -> pd.DataFrame:
    """A sample saved with a version's run: the training sample (the drift check's reference) by default, or
    the holdout sample (the deployment's smoke test)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow_client.download_artifacts(version.run_id, artifact, tmp)
        return pd.read_parquet(local)


def has_run_artifact(mlflow_client, run_id: str | None, artifact: str) -> bool:
    """Whether the run holds `artifact` (a file path inside its artifacts). A version logged outside Flywheel has
    no holdout or training sample, and one logged with no active run (a notebook's `log_model(...,
    registered_model_name=...)`) has no run at all."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    parent = str(Path(artifact).parent)
    try:
        listed = mlflow_client.list_artifacts(run_id, None if parent == "." else parent)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):  # the version's run was deleted
            return False
        raise
    return any(f.path == artifact for f in listed)


def find_sample(mlflow_client, version: Any, artifact: str = HOLDOUT_ARTIFACT) -> pd.DataFrame | None:
    """The sample Flywheel saved with a version's run, or None when the version has none (not an error: a version
    registered outside Flywheel carries none of its artefacts)."""
    if not has_run_artifact(mlflow_client, version.run_id, artifact):
        return None
    return load_reference_sample(mlflow_client, version, artifact)


@dataclass
class ModelInputs:
    """What a registered version says about its own input: the signature's column names (None without a
    column-based signature) and its saved input example as a frame (None without one)."""

    columns: list[str] | None
    example: pd.DataFrame | None


def model_inputs(model_name: str, version: str) -> ModelInputs:
    """The version's signature columns and input example, read from its MLmodel (no Flywheel tag needed)."""
    from mlflow.models import Model

    uri = f"models:/{model_name}/{version}"
    meta = Model.load(uri)
    schema = meta.signature.inputs if meta.signature is not None else None
    columns = schema.input_names() if schema is not None and schema.has_input_names() else None
    example = meta.load_input_example(uri) if meta.saved_input_example_info else None
    return ModelInputs(columns=columns, example=_as_frame(example, columns))


def _as_frame(example: Any, columns: list[str] | None) -> pd.DataFrame | None:
    """An input example as a frame: a DataFrame as is, a dict of columns or a list of records, a 2-D array with
    the signature's column names; None for anything else (tensors, text)."""
    import numpy as np

    if example is None or isinstance(example, pd.DataFrame):
        return example
    try:
        if isinstance(example, dict):
            scalar = all(np.ndim(v) == 0 for v in example.values())
            return pd.DataFrame([example] if scalar else example)
        if isinstance(example, list) and example and all(isinstance(r, dict) for r in example):
            return pd.DataFrame.from_records(example)
        arr = np.asarray(example)
        if arr.ndim == 2 and columns and arr.shape[1] == len(columns):
            return pd.DataFrame(arr, columns=columns)
    except (ValueError, TypeError):
        return None
    return None


def is_flywheel_version(version: Any) -> bool:
    """Whether a version was registered by Flywheel's train flow (it carries the lineage tags)."""
    tags = getattr(version, "tags", None) or {}
    return TAG_DATA_HASH in tags and TAG_CODE_VERSION in tags


def reasons_tag(reasons: list[str]) -> str:
    """The gate's reasons as the `gate_reasons` tag: a JSON list a person can read in the UI (≥ as ≥, not an ASCII
    escape), bounded by MLflow's tag value limit."""
    return json.dumps(reasons, ensure_ascii=False)[:5000]


# --------------------------------------------------------------------------------------------------- tasks
def _retry_unless_permanent(task, task_run, state) -> bool:
    """Retry on connection trouble; an MLflow error about the request itself will not go away by retrying."""
    from mlflow.exceptions import MlflowException

    try:
        state.result()
    except MlflowException as exc:
        return exc.get_http_status_code() >= 500
    except Exception:
        return True
    return False


RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=_retry_unless_permanent)


@task(name="check-registry", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 10])
def check_registry(tracking_uri: str) -> None:
    check_tracking_server(tracking_uri)


@task(name="find-registered-version", cache_policy=NO_CACHE, **RETRIES)
def find_existing(model_name: str, data_hash: str, params_hash: str, code_ver: str):
    return find_version_by_lineage(client(), model_name, data_hash, params_hash, code_ver)


@task(name="log-and-register", cache_policy=NO_CACHE, **RETRIES)
def log_and_register(model_name: str, version_tags: dict[str, str], description: str, **log_kwargs):
    """Log the candidate's run and create its registry version (with lineage tags) in one step."""
    logged = log_candidate(**log_kwargs)
    return register_version(client(), model_name, logged, version_tags, description)
