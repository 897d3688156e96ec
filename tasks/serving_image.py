"""The layer a version's image gets when its compiled form passed parity, so the docker and kubernetes targets
serve what the local model server serves.

MLflow's generated build context stays as MLflow wrote it (and as the packaging manifest lists it). Beside it this
module writes `LAYER_DIR/` — the run's `compiled/` folder (the ONNX model and its verdict), `version.json` (the
version's name, number, run, source, and MLflow's own entrypoint) and `site/flywheel/…`, the model server's code —
and `DOCKERFILE`: MLflow's Dockerfile whose last line, its ENTRYPOINT, is replaced by the steps that install the
server's few runtime libraries (onnxruntime pinned to the version parity was checked with) and copy the layer in,
and the entrypoint `python -m flywheel.serving.container`. That entrypoint serves the compiled model with Flywheel's
model server, or — `FLYWHEEL_COMPILE_MODELS=false`, or the artefact not checking out — execs MLflow's entrypoint,
so the container is then exactly MLflow's. A version whose compiled form did not pass gets no layer: its image is
MLflow's as generated.

The layer is written again at every packaging (it is small); its digest joins the context's in the image's label,
so a change of the compiled model or of the server's code builds a new image.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

LAYER_DIR = "flywheel-serving"  # in the build context; /opt/flywheel in the image
DOCKERFILE = "Dockerfile.flywheel"
IMAGE_HOME = "/opt/flywheel"
ENTRYPOINT = ["python", "-m", "flywheel.serving.container"]
# The model server's code in the image: the modules `python -m flywheel.serving.container` imports (None: all of
# the package's modules).
CODE: dict[str, list[str] | None] = {
    "flywheel": ["__init__.py"],
    "flywheel.core": None,
    "flywheel.serving": None,
    "flywheel.tasks": ["__init__.py", "request_log.py"],
    "flywheel.tasks.compiling": None,
}
# What the model server needs beyond MLflow's image (MLflow brings pandas, numpy, pyarrow, starlette, scikit-learn).
RUNTIME_DISTS = ("orjson", "prometheus-client", "pydantic-settings", "uvicorn", "httptools")


def _package_dir(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} not found")
    return Path(list(spec.submodule_search_locations)[0])


def copy_code(site: Path) -> None:
    for package, modules in CODE.items():
        src, dst = _package_dir(package), site.joinpath(*package.split("."))
        dst.mkdir(parents=True, exist_ok=True)
        for path in sorted(src.glob("*.py")) if modules is None else [src / m for m in modules]:
            shutil.copyfile(path, dst / path.name)


def requirements(meta: dict) -> list[str]:
    """Pinned: onnxruntime as parity was checked with; the rest as this environment has them."""
    pins = [f"onnxruntime=={meta['versions']['onnxruntime']}"]
    for dist in RUNTIME_DISTS:
        try:
            pins.append(f"{dist}=={dist_version(dist)}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins


def mlflow_entrypoint(dockerfile: str) -> tuple[str, list[str]]:
    """(MLflow's Dockerfile without its ENTRYPOINT line, that entrypoint); ValueError when it does not end so."""
    lines = dockerfile.rstrip().splitlines()
    if not lines or not lines[-1].startswith("ENTRYPOINT "):
        raise ValueError("MLflow's Dockerfile does not end with its ENTRYPOINT")
    entry = json.loads(lines[-1].removeprefix("ENTRYPOINT "))
    if not (isinstance(entry, list) and entry and all(isinstance(a, str) for a in entry)):
        raise ValueError(f"MLflow's ENTRYPOINT is not an exec form: {lines[-1][:200]}")
    return "\n".join(lines[:-1]) + "\n", entry


def layer_dockerfile(base: str, pins: list[str]) -> str:
    return (
        base
        + "\n# Flywheel: the compiled model (parity passed at packaging) and the model server that serves it; the\n"
        + "# entrypoint runs MLflow's when the compiled model is off or does not check out.\n"
        + f"RUN pip install --no-cache-dir {' '.join(pins)}\n"
        + f"COPY {LAYER_DIR} {IMAGE_HOME}\n"
        + f"ENV PYTHONPATH={IMAGE_HOME}/site\n"
        + f"ENTRYPOINT {json.dumps(ENTRYPOINT)}\n"
    )


def remove_layer(context: Path) -> None:
    shutil.rmtree(context / LAYER_DIR, ignore_errors=True)
    (context / DOCKERFILE).unlink(missing_ok=True)


def write_layer(context: Path, mlflow_client: Any, model_name: str, mv: Any) -> str | None:
    """Write the layer for `mv` into `context` (replacing an earlier one); its digest, or None — and no layer —
    when the version has no compiled form that passed parity."""
    from flywheel.tasks import compiling

    remove_layer(context)
    meta = compiling.read_meta(mlflow_client, mv.run_id)
    if not meta or not meta.get("ok") or meta.get("source") != str(mv.source):
        return None
    base, entry = mlflow_entrypoint((context / "Dockerfile").read_text())
    layer = context / LAYER_DIR
    layer.mkdir()
    mlflow_client.download_artifacts(mv.run_id, compiling.COMPILED_DIR, str(layer))
    if not (layer / compiling.ONNX_ARTIFACT).is_file():
        remove_layer(context)
        return None
    ident = {"model_name": model_name, "version": str(mv.version), "run_id": mv.run_id, "source": str(mv.source),
             "mlflow_entrypoint": entry}  # fmt: skip
    (layer / "version.json").write_text(json.dumps(ident, indent=2))
    copy_code(layer / "site")
    (context / DOCKERFILE).write_text(layer_dockerfile(base, requirements(meta)))
    h = hashlib.sha256((context / DOCKERFILE).read_bytes())
    for path in sorted(p for p in layer.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(layer)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
