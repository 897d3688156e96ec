"""`python -m flywheel.serving.container`: the entrypoint of a version's image (the docker and kubernetes targets).

The image is MLflow's own serving image (the Dockerfile `mlflow models build-docker` writes, the model at
/opt/ml/model) with one layer more when the version's compiled form passed parity at packaging
(flywheel.tasks.serving_image): the compiled model and its verdict, the version's identity, and Flywheel's
model-server code, under /opt/flywheel. At start this entrypoint chooses:

- the compiled model checks out — the same checks a model server makes on one read from the registry
  (`load_compiled`: verdict passed, of this very model, this onnxruntime, its hash) — and `FLYWHEEL_COMPILE_MODELS`
  is not false: Flywheel's model server serves it on port 8080 (flywheel.serving.compiled: plain JSON scored
  compiled; everything else, and rows it is unsure of, through the version's pyfunc model, loaded when first
  needed, so the answers and the errors are MLflow's);
- otherwise: MLflow's scoring server, as the image without that layer runs it, and the reason on stderr.

Nothing comes from the registry: everything is in the image. `/version` says which engine serves (MLflow's scoring
server answers it with its version as text), so the model server in front can tell the ledger.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from flywheel.serving.compiled import OFF_REASON, LazyPyFunc, warm_up
from flywheel.serving.server import ModelServer
from flywheel.serving.slots import Slot, _batchable_schema, _float_columns
from flywheel.tasks.compiling import COMPILED_DIR, CompiledModel, load_compiled

MODEL_DIR = "/opt/ml/model"  # where MLflow's Dockerfile copies the model
HOME = "/opt/flywheel"  # the layer flywheel.tasks.serving_image adds
VERSION_FILE = "version.json"  # the version in the image: model_name, version, run_id, source, mlflow_entrypoint
PORT = 8080  # MLflow's serving image listens here


class _ImageArtifacts:
    """The run's `compiled/` folder as the image carries it, read through the two client calls `load_compiled`
    makes (so a container checks its compiled model exactly as a model server checks one from the registry)."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def list_artifacts(self, run_id: str, path: str) -> list[Any]:
        from types import SimpleNamespace

        folder = self.home / path
        return [SimpleNamespace(path=f"{path}/{p.name}") for p in folder.iterdir()] if folder.is_dir() else []

    def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
        return str(self.home / path)


def identity(home: Path) -> dict:
    return json.loads((home / VERSION_FILE).read_text())


def mlflow_entrypoint(home: Path) -> list[str]:
    """The entrypoint MLflow's Dockerfile gave the image (recorded by the layer)."""
    try:
        entry = identity(home).get("mlflow_entrypoint")
    except (OSError, ValueError):
        entry = None
    if entry:
        return list(entry)
    return [sys.executable, "-c", "from mlflow.models import container as C; C._serve('local')"]


def compiled_in_image(home: Path, enabled: bool) -> tuple[CompiledModel | None, str]:
    """(the compiled model the image carries, or None; why), never raising."""
    if not enabled:
        return None, OFF_REASON
    try:
        ident = identity(home)
        if not (home / COMPILED_DIR).is_dir():
            return None, "compiled: no (the image carries no compiled model)"
        return load_compiled(_ImageArtifacts(home), ident.get("run_id"), str(ident.get("source")), str(home))
    except Exception as exc:
        return None, f"compiled: no (could not load it from the image: {type(exc).__name__}: {str(exc)[:300]})"


def image_slot(home: Path, model_dir: str, compiled: CompiledModel, reason: str, batching: bool = True) -> Slot:
    """The version in the image as a compiled slot (its pyfunc model loaded when a request first needs it)."""
    ident = identity(home)
    t0 = time.perf_counter()
    model = LazyPyFunc(model_dir)
    slot = Slot(
        version=str(ident["version"]),
        model=model,
        input_schema=model.metadata.get_input_schema(),
        run_id=ident.get("run_id"),
        source=str(ident.get("source")),
        local_dir=None,  # the image's model directory: never removed
        loaded_at=time.time(),
        load_seconds=0.0,
        requested_as=f"models:/{ident['model_name']}/{ident['version']}",
        compiled=compiled,
        engine_reason=reason,
    )
    slot.batchable = batching and _batchable_schema(model)
    slot.float_cols = _float_columns(slot.input_schema)
    slot.warmup_error = warm_up(compiled, model_dir)
    slot.load_seconds = time.perf_counter() - t0
    return slot


class ImageServer(ModelServer):
    """A model server whose one version is the one in the image (no registry, no admin API)."""

    def __init__(self, home: Path, model_dir: str, compiled: CompiledModel, reason: str, **kwargs: Any) -> None:
        ident = identity(home)
        super().__init__(ident["model_name"], "file:" + model_dir, initial_version=str(ident["version"]), **kwargs)
        self._image = (home, model_dir, compiled, reason)

    def _load(self, version: str | None, alias: str | None, upstream: str | None = None) -> Slot:
        home, model_dir, compiled, reason = self._image
        return image_slot(home, model_dir, compiled, reason, batching=self.batching)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as flywheel.serving.__main__.run, before any model loads
    from flywheel.core.settings import get_settings

    home = Path(os.environ.get("FLYWHEEL_IMAGE_HOME", HOME))
    model_dir = os.environ.get("FLYWHEEL_IMAGE_MODEL_DIR", MODEL_DIR)
    compiled, reason = compiled_in_image(home, get_settings().compile_models)
    if compiled is None:
        print(f"flywheel: serving through MLflow's scoring server: {reason}", file=sys.stderr, flush=True)
        entry = mlflow_entrypoint(home)
        os.execvp(entry[0], entry)
    print(f"flywheel: serving the compiled model with Flywheel's model server: {reason}", file=sys.stderr, flush=True)
    from flywheel.serving.__main__ import run

    port = int(os.environ.get("FLYWHEEL_IMAGE_PORT", PORT))
    run("0.0.0.0", port, server=ImageServer(home, model_dir, compiled, reason, freeze_gc=True))  # noqa: S104


if __name__ == "__main__":
    main()
