"""Registry I/O: compiling a registered version, its verdict and artefacts on its run, and loading them."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from flywheel.tasks.compiling.compile import compile_model
from flywheel.tasks.compiling.plan import (
    COMPILED_DIR,
    FORMAT_VERSION,
    META_ARTIFACT,
    META_FILE,
    ONNX_ARTIFACT,
    ONNX_FILE,
    TAG_COMPILED,
    Plan,
    Verdict,
    first_line,
)
from flywheel.tasks.compiling.runtime import CompiledModel


# --------------------------------------------------------------------------------------------------- registry I/O
def versions() -> dict[str, str]:
    """The library versions a compiled artefact depends on (a different set recompiles)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("skl2onnx", "onnxruntime", "onnx", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = ""
    return out


def fingerprint(source: str, sample_source: str) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "versions": versions(), "source": source, "sample": sample_source},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_has(mlflow_client: Any, run_id: str | None, artifact: str) -> bool:
    """Whether the run holds `artifact` (as flywheel.tasks.registry.has_run_artifact, without importing the
    registry module and Prefect with it: the model server calls this)."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    try:
        listed = mlflow_client.list_artifacts(run_id, str(Path(artifact).parent))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return False
        raise
    return any(f.path == artifact for f in listed)


def read_meta(mlflow_client: Any, run_id: str | None, dst: str | None = None) -> dict | None:
    """The `compiled/compiled.json` of a run, or None when it has none."""
    if not _run_has(mlflow_client, run_id, META_ARTIFACT):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow_client.download_artifacts(run_id, META_ARTIFACT, dst or tmp)
        return json.loads(Path(local).read_text())


def parity_sample(mlflow_client: Any, model_name: str, mv: Any) -> tuple[Any | None, str]:
    """(the held-out sample parity runs on, where it comes from): the version's own, else the champion's."""
    from flywheel.tasks import registry

    own = registry.find_sample(mlflow_client, mv, registry.HOLDOUT_ARTIFACT)
    if own is not None:
        return own, f"v{mv.version}'s holdout sample"
    champion = registry.get_alias_version(mlflow_client, model_name, registry.CHAMPION)
    if champion is not None and champion.version != mv.version:
        theirs = registry.find_sample(mlflow_client, champion, registry.HOLDOUT_ARTIFACT)
        if theirs is not None:
            return theirs, f"the champion v{champion.version}'s holdout sample"
    return None, ""


def compile_version(mlflow_client: Any, model_name: str, version: str, *, enabled: bool = True) -> Verdict:
    """Compile `model_name` v`version` and keep the result with its run (see the module docstring). An artefact
    already there for the same model, libraries and sample is reused. Registry errors propagate (the caller's
    retries); everything about the model itself ends in a verdict."""
    import mlflow.artifacts
    import mlflow.pyfunc

    from flywheel.tasks import registry

    mv = mlflow_client.get_model_version(model_name, str(version))

    def tagged(verdict: Verdict) -> Verdict:
        tag = verdict.reason.removeprefix("compiled: ")[:5000]
        registry.set_version_tags(mlflow_client, model_name, mv.version, {TAG_COMPILED: tag})
        return verdict

    if not enabled:
        return tagged(Verdict(False, "compiled: off (FLYWHEEL_COMPILE_MODELS=false)"))
    if not mv.run_id:
        return tagged(Verdict.refused("the version has no run to keep a compiled model with"))
    sample, sample_source = parity_sample(mlflow_client, model_name, mv)
    existing = read_meta(mlflow_client, mv.run_id)
    # A passing verdict is reused only while its ONNX file is still on the run (else it is compiled again).
    if (existing and existing.get("fingerprint") == fingerprint(str(mv.source), sample_source)
            and (not existing.get("ok") or _run_has(mlflow_client, mv.run_id, ONNX_ARTIFACT))):  # fmt: skip
        return tagged(Verdict(bool(existing.get("ok")), str(existing.get("reason")),
                              parity=existing.get("parity") or {}, meta=existing))  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if sample is None:
            verdict = Verdict.refused("no held-out sample to check parity on (the version's or the champion's)")
        else:
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=mlflow_client.get_model_version_download_uri(model_name, mv.version),
                    tracking_uri=mlflow_client._tracking_client.tracking_uri, dst_path=tmp,
                )  # fmt: skip
                pyfunc_model = mlflow.pyfunc.load_model(local)
            except Exception as exc:
                verdict = Verdict.refused(f"pyfunc cannot load it: {first_line(exc)}")
            else:
                verdict = compile_model(pyfunc_model, sample, sample_source=sample_source)
    meta = {
        "format": FORMAT_VERSION,
        "ok": verdict.ok,
        "reason": verdict.reason,
        "engine": verdict.engine,
        "model_name": model_name,
        "version": str(mv.version),
        "source": str(mv.source),
        "fingerprint": fingerprint(str(mv.source), sample_source),
        "versions": versions(),
        "parity": verdict.parity,
        "plan": verdict.plan.as_dict() if verdict.plan else None,
        "onnx_sha256": hashlib.sha256(verdict.onnx).hexdigest() if verdict.onnx else None,
        "compile_seconds": round(time.perf_counter() - started, 3),
    }
    verdict.meta = meta
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / COMPILED_DIR
        folder.mkdir()
        if verdict.onnx:
            (folder / ONNX_FILE).write_bytes(verdict.onnx)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        mlflow_client.log_artifacts(mv.run_id, str(folder), COMPILED_DIR)
    return tagged(verdict)


def load_compiled(mlflow_client: Any, run_id: str | None, source: str, dst: str) -> tuple[CompiledModel | None, str]:
    """(the compiled model of a version, or None, and the reason) for a model server: only an artefact that
    passed parity, was made from this very model and checks out (hash, onnxruntime version) is used."""
    if not run_id:
        return None, "compiled: no (the version has no run, so no compiled model)"
    meta = read_meta(mlflow_client, run_id, dst)
    if meta is None:
        return None, "compiled: no (no compiled model with the version: it was not packaged by deploy-model)"
    if meta.get("format") != FORMAT_VERSION:
        return None, f"compiled: no (compiled artefact format {meta.get('format')}, this server reads {FORMAT_VERSION})"
    if meta.get("source") != source:
        return None, "compiled: no (the run's compiled model is of another model than this version's)"
    if not meta.get("ok"):
        return None, str(meta.get("reason") or "compiled: no")
    here = versions().get("onnxruntime")
    if meta.get("versions", {}).get("onnxruntime") != here:
        return None, (f"compiled: no (parity was checked with onnxruntime {meta['versions'].get('onnxruntime')}, "
                      f"this server has {here})")  # fmt: skip
    local = Path(mlflow_client.download_artifacts(run_id, ONNX_ARTIFACT, dst))
    data = local.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("onnx_sha256"):
        return None, "compiled: no (the compiled model does not match its recorded hash)"
    return CompiledModel(data, Plan.from_dict(meta["plan"])), str(meta["reason"])
