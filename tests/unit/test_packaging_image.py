"""A version whose compiled form passed parity is packaged with the layer that serves it compiled in its image
(flywheel.tasks.serving_image), and that image's entrypoint (flywheel.serving.container) serves it with pyfunc's
answers and MLflow's errors — or hands over to MLflow's scoring server. Against a real MLflow registry (SQLite in
tmp); the entrypoint's app is driven in-process through Starlette's TestClient, no server and no image build (the
image itself: tests/integration/test_docker_target.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serving_models import log_version, sqlite_experiment, wait_until
from starlette.testclient import TestClient

from flywheel.serving import container
from flywheel.serving.app import create_app
from flywheel.tasks import compiling, packaging, serving_image
from flywheel.tasks import registry as reg

MODEL = "packaging-image-test"


@pytest.fixture(scope="module")
def version(tmp_path_factory, january_split, flights_model):
    """v1: the flights model with its holdout sample (it compiles); the registry as the default one."""
    root = tmp_path_factory.mktemp("image")
    X, holdout = january_split.X_train, january_split.X_test
    with sqlite_experiment(root, "image") as (uri, exp):
        v = log_version(root, exp, flights_model, X, holdout, MODEL)
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
    try:
        yield {"uri": uri, "version": v, "root": root, "holdout": holdout}
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def packaged(version):
    pkg = packaging.package_version(MODEL, version["version"], version["root"] / "packages", build=False,
                                    compile_model=True)  # fmt: skip
    assert pkg.compiled.startswith("compiled: yes"), pkg.compiled
    return pkg


def started(app) -> TestClient:
    client = TestClient(app)
    client.__enter__()
    wait_until(lambda: client.get("/ping").status_code == 200)
    return client


def test_a_compiled_version_gets_a_dockerfile_that_adds_the_layer_to_mlflows(packaged):
    context = Path(packaged.context_dir)
    mlflow_dockerfile = (context / "Dockerfile").read_text()
    ours = (context / serving_image.DOCKERFILE).read_text()
    base, entry = serving_image.mlflow_entrypoint(mlflow_dockerfile)
    assert ours.startswith(base)  # MLflow's steps, unchanged, then ours
    assert ours.rstrip().splitlines()[-1] == 'ENTRYPOINT ["python", "-m", "flywheel.serving.container"]'
    assert f"onnxruntime=={compiling.versions()['onnxruntime']}" in ours  # as parity was checked with
    layer = context / serving_image.LAYER_DIR
    meta = json.loads((layer / compiling.META_ARTIFACT).read_text())
    assert meta["ok"] and (layer / compiling.ONNX_ARTIFACT).is_file()
    ident = json.loads((layer / container.VERSION_FILE).read_text())
    assert ident["version"] == packaged.version and ident["mlflow_entrypoint"] == entry
    assert entry[:2] == ["python", "-c"] and "_serve" in entry[2]  # MLflow's own, run when not compiled
    assert (layer / "site/flywheel/serving/container.py").is_file()
    # The manifest of the context MLflow generated is untouched by the layer: the context is still reusable.
    again = packaging.package_version(MODEL, packaged.version, Path(packaged.context_dir).parent, build=False,
                                      compile_model=True)  # fmt: skip
    assert "build context" in again.reused and again.context_digest == packaged.context_digest


def test_the_image_digest_follows_the_layer(version, packaged):
    client = reg.client(version["uri"])
    mv = client.get_model_version(MODEL, packaged.version)
    context = Path(packaged.context_dir)
    args = (client, MODEL, mv, context, packaged.context_digest)
    dockerfile, digest = packaging.image_recipe(*args, packaged.compiled)
    assert dockerfile == serving_image.DOCKERFILE and digest != packaged.context_digest
    assert packaging.image_recipe(*args, packaged.compiled) == (dockerfile, digest)  # the same layer, same image
    off = packaging.image_recipe(*args, "compiled: off (FLYWHEEL_COMPILE_MODELS=false)")
    assert off == ("Dockerfile", packaged.context_digest)  # MLflow's image as generated
    assert not (context / serving_image.LAYER_DIR).exists() and not (context / serving_image.DOCKERFILE).exists()
    assert packaging.image_recipe(*args, packaged.compiled) == (dockerfile, digest)  # written back


def test_the_entrypoint_serves_the_compiled_model_with_pyfunc_answers_and_errors(version, packaged):
    import mlflow

    layer = Path(packaged.context_dir) / serving_image.LAYER_DIR
    model_dir = str(Path(packaged.context_dir) / "model_dir")
    compiled, reason = container.compiled_in_image(layer, True)
    assert compiled is not None and reason.startswith("compiled: yes")
    image = started(create_app(container.ImageServer(layer, model_dir, compiled, reason)))
    front = started(create_app(MODEL, version["uri"], initial_version=packaged.version, compiled=False))  # pyfunc
    try:
        info = image.get("/version").json()
        assert info["engine"] == compiling.ENGINE_COMPILED and info["model_version"] == packaged.version
        rows = version["holdout"].head(200)
        want = mlflow.pyfunc.load_model(model_dir).predict(rows).tolist()
        body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
        got = image.post("/invocations", json=body)
        assert got.status_code == 200 and got.json()["predictions"] == want
        assert image.app.server.active.compiled is not None
        wrong = [
            {"dataframe_records": [{"nope": 1}]},  # missing columns
            {"dataframe_split": {"columns": list(rows.columns), "data": [["x"] * len(rows.columns)]}},  # types
            {"instances": "not rows"},
            {"something": []},  # no input format
        ]
        for bad in wrong:
            ours, theirs = image.post("/invocations", json=bad), front.post("/invocations", json=bad)
            assert ours.status_code == theirs.status_code and ours.status_code in (400, 422), ours.text
            assert ours.json() == theirs.json()
    finally:
        image.__exit__(None, None, None)
        front.__exit__(None, None, None)


def test_the_entrypoint_hands_over_to_mlflow_when_off_or_the_artefact_does_not_check_out(packaged, tmp_path):
    import shutil

    layer = tmp_path / "layer"
    shutil.copytree(Path(packaged.context_dir) / serving_image.LAYER_DIR, layer)
    assert container.compiled_in_image(layer, False) == (None, "compiled: off (FLYWHEEL_COMPILE_MODELS=false)")
    onnx = layer / compiling.ONNX_ARTIFACT
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    compiled, reason = container.compiled_in_image(layer, True)
    assert compiled is None and "does not match its recorded hash" in reason
    ident = json.loads((layer / container.VERSION_FILE).read_text())
    assert container.mlflow_entrypoint(layer) == ident["mlflow_entrypoint"]
    shutil.rmtree(layer / compiling.COMPILED_DIR)
    assert container.compiled_in_image(layer, True) == (None, "compiled: no (the image carries no compiled model)")


def test_the_layer_carries_every_module_the_entrypoint_imports(packaged):
    site = Path(packaged.context_dir) / serving_image.LAYER_DIR / "site"
    code = (
        "import sys, flywheel.serving.container, flywheel.serving.__main__, flywheel.serving.app\n"
        "bad = [m for m, mod in sys.modules.items() if m.startswith('flywheel') and getattr(mod, '__file__', None)"
        f" and not mod.__file__.startswith({str(site)!r})]\n"
        "print(bad)"
    )
    # cwd: the layer, not the repo's checkout (`-c` puts the working directory first on sys.path)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, cwd=site,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_a_version_not_compiled_gets_mlflows_image_as_generated(version, tmp_path):
    pkg = packaging.package_version(MODEL, version["version"], tmp_path, build=False, compile_model=False)
    assert pkg.compiled.startswith("compiled: off")
    context = Path(pkg.context_dir)
    assert not (context / serving_image.DOCKERFILE).exists() and not (context / serving_image.LAYER_DIR).exists()
    # the verdict on the run is the version's for every server: compile it back for the other tests
    assert packaging.compile_for_serving(MODEL, version["version"], True).startswith("compiled: yes")


def test_a_dockerfile_that_does_not_end_with_mlflows_entrypoint_is_refused():
    with pytest.raises(ValueError):
        serving_image.mlflow_entrypoint("FROM python\nRUN true\n")
    with pytest.raises(ValueError):
        serving_image.mlflow_entrypoint("FROM python\nENTRYPOINT python -c 'x'\n")
