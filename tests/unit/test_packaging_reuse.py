"""Packaging a version packaged before reuses its build context and compile verdict, against a real MLflow
registry (SQLite in tmp, no server): the second packaging neither regenerates the context nor compiles, and a
package (or a compiled artefact) whose files are gone or altered is built again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.tasks import compiling, packaging
from flywheel.tasks import registry as reg

MODEL = "packaging-reuse-test"


@pytest.fixture
def version(tmp_path, monkeypatch):
    """One registered version of a small classifier with its holdout sample, the registry as the default one."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(400, 3)), columns=["a", "b", "c"])
    y = (X["a"] + 0.5 * X["b"] > 0).astype(int)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    with _use_tracking_uri(uri):
        exp = mlflow.create_experiment("reuse", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            X.tail(100).to_parquet(tmp_path / "holdout_sample.parquet", index=False)
            mlflow.log_artifact(str(tmp_path / "holdout_sample.parquet"), artifact_path="reference")
            info = mlflow.sklearn.log_model(model, name="model", registered_model_name=MODEL,
                                            signature=infer_signature(X.head(50), model.predict(X.head(50))),
                                            pip_requirements=["scikit-learn"])  # fmt: skip
        yield {"client": reg.client(uri), "version": str(info.registered_model_version), "root": tmp_path}


@pytest.fixture
def calls(monkeypatch):
    """How often the context is generated and the version compiled (the real functions, counted)."""
    counts = {"build_context": 0, "compile_version": 0}

    def counted(name, module, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted("build_context", packaging, packaging.build_context)
    counted("compile_version", compiling, compiling.compile_version)
    return counts


def pack(version, work: Path) -> packaging.Package:
    return packaging.package_version(MODEL, version["version"], work, build=False, compile_model=True)


def test_a_version_packaged_before_is_reused_and_a_deleted_package_is_rebuilt(version, calls):
    work = version["root"] / "packages"
    first = pack(version, work)
    assert first.reused == "" and calls == {"build_context": 1, "compile_version": 1}
    assert first.compiled.startswith("compiled: yes")

    second = pack(version, work)
    assert second.reused == "reused: build context and compiled verdict of an earlier packaging"
    assert calls == {"build_context": 1, "compile_version": 1}
    assert (second.compiled, second.context_digest, second.context_dir) == (
        first.compiled, first.context_digest, first.context_dir)  # fmt: skip
    tags = version["client"].get_model_version(MODEL, version["version"]).tags
    assert tags[compiling.TAG_COMPILED] == first.compiled.removeprefix("compiled: ")

    shutil.rmtree(first.context_dir)  # the package is gone: built again, the verdict on the run still reused
    third = pack(version, work)
    assert third.reused == "reused: compiled verdict of an earlier packaging"
    assert calls == {"build_context": 2, "compile_version": 1}
    assert (Path(third.context_dir) / "Dockerfile").is_file() and third.context_digest == first.context_digest

    (Path(third.context_dir) / "Dockerfile").write_text("FROM scratch\n")  # altered: never trusted
    fourth = pack(version, work)
    assert "build context" not in fourth.reused and calls["build_context"] == 3
    assert (Path(fourth.context_dir) / "Dockerfile").read_text() != "FROM scratch\n"


def test_a_compiled_verdict_whose_files_are_gone_is_not_reused_by_packaging(version, calls):
    work = version["root"] / "packages"
    assert pack(version, work).compiled.startswith("compiled: yes")
    mv = version["client"].get_model_version(MODEL, version["version"])
    artifacts = Path(version["client"].get_run(mv.run_id).info.artifact_uri.removeprefix("file://"))
    (artifacts / compiling.ONNX_ARTIFACT).unlink()

    second = pack(version, work)
    assert second.reused == "reused: build context of an earlier packaging"
    assert calls["compile_version"] == 2  # compile_version decides, not the packaging's shortcut


def test_a_context_built_from_anything_else_is_not_reused(tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM python\n")
    key = {"model_name": MODEL, "version": "1", "run_id": "r", "source": "s", "versions": {"mlflow": "3"}}
    files = ["Dockerfile"]
    packaging.write_manifest(context, key, files, packaging.digest_files(context, files))
    assert packaging.reusable_context(context, key) == packaging.digest_files(context, files)
    assert packaging.reusable_context(context, {**key, "versions": {"mlflow": "4"}}) is None
    assert packaging.reusable_context(context, {**key, "run_id": "other"}) is None
    (context / packaging.MANIFEST_FILE).write_text(json.dumps({"key": key}))  # no file list
    assert packaging.reusable_context(context, key) is None
    (context / packaging.MANIFEST_FILE).write_text("{not json")
    assert packaging.reusable_context(context, key) is None
