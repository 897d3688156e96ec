"""Compiled serving end to end on real processes: an MLflow server (SQLite, proxied artefacts), packaging as
deploy-model runs it (build context + compile + parity), and the real model server (`python -m flywheel.serving`)
answering MLflow's scoring protocol from the compiled model — the same answers and the same errors as the same
version served through pyfunc — then a version skl2onnx cannot convert loaded beside it and swapped in, which
serves through pyfunc with its reason.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from stacks import start_model_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "flights-compiled-it"
ADMIN = "compiled-it-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def flights():
    from flywheel.tasks.data import load_flights

    return load_flights()


@pytest.fixture(scope="module")
def january_split(flights):
    from flywheel.core.spec import load_spec
    from flywheel.tasks import training

    january = flights.loc[flights["month"] == 1].sample(n=4000, random_state=42).reset_index(drop=True)
    return training.split_dataset(january, load_spec(), seed=42)


@pytest.fixture(scope="module")
def flights_model(january_split):
    from flywheel.core.spec import load_spec
    from flywheel.tasks import model_specs, training

    return training.train_model(january_split, load_spec(), model_specs.default_model_spec("binary"), 42)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from flywheel.stack import processes

    server = processes.start_mlflow_in(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def versions(mlflow_server, tmp_path_factory, january_split, flights_model, monkeypatch_module):
    """v1 the flights model, v2 a FunctionTransformer-first pipeline; both packaged (compiled) as deploy-model does."""
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from flywheel.tasks import registry
    from flywheel.tasks.packaging import package_version

    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment("compiled-it")
    root = tmp_path_factory.mktemp("work")
    X, holdout = january_split.X_train, january_split.X_test
    # not a cast (and a lambda, so cloudpickle keeps it by value: the model server process can load it)
    log_distance = FunctionTransformer(lambda frame: frame.assign(distance=np.log1p(frame["distance"])))
    refused = Pipeline([("log", log_distance), *clone(flights_model).steps]).fit(X, january_split.y_train)
    out = {}
    for name, model in (("flights", flights_model), ("refused", refused)):
        with mlflow.start_run():
            path = root / "holdout_sample.parquet"
            holdout.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), artifact_path="reference")
            info = mlflow.sklearn.log_model(
                model, name="model", registered_model_name=MODEL, input_example=X.head(3),
                signature=infer_signature(X.head(200), model.predict(X.head(200))),
                pip_requirements=registry.pip_requirements(), serialization_format="cloudpickle",
            )  # fmt: skip
        version = str(info.registered_model_version)
        pkg = package_version(MODEL, version, root / "packages", build=False, compile_model=True)
        out[name] = {
            "version": version,
            "package": pkg,
            "pyfunc": mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}"),
        }
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def servers(mlflow_server, versions, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servers")
    version = versions["flights"]["version"]
    compiled = start_model_server(mlflow_server.url, MODEL, version, tmp, admin_token=ADMIN, compiled=True)
    plain = start_model_server(mlflow_server.url, MODEL, version, tmp, admin_token=ADMIN, compiled=False)
    try:
        yield compiled, plain
    finally:
        compiled.stop()
        plain.stop()


def post(url: str, body) -> httpx.Response:
    return httpx.post(url + "/invocations", json=body, timeout=60)


def test_packaging_compiles_the_version_or_says_why_not(versions):
    assert versions["flights"]["package"].compiled.startswith("compiled: yes (onnxruntime; labels identical on ")
    refused = versions["refused"]["package"].compiled
    assert refused.startswith("compiled: no (") and "FunctionTransformer" in refused


def test_the_model_server_process_answers_from_the_compiled_model_as_pyfunc_does(servers, versions, flights):
    compiled, plain = servers
    info = httpx.get(compiled.url + "/version", timeout=10).json()
    assert info["engine"] == "onnxruntime" and info["compiled"] == versions["flights"]["package"].compiled
    assert httpx.get(plain.url + "/version", timeout=10).json()["engine"] == "pyfunc"

    from flywheel.core.spec import load_spec
    from flywheel.tasks import compiling, training

    rows = training.feature_frame(flights.loc[flights["month"] == 3], load_spec()).sample(n=300, random_state=4)
    want = versions["flights"]["pyfunc"].predict(rows).tolist()
    recs = compiling.json_records(rows)
    split = {"columns": list(rows.columns), "data": [list(r.values()) for r in recs]}
    for body in ({"dataframe_split": split}, {"dataframe_records": recs}, {"instances": recs}, {"inputs": recs}):
        resp = post(compiled.url, body)
        assert resp.status_code == 200 and resp.json() == {"predictions": want}, list(body)
    csv = httpx.post(compiled.url + "/invocations", content=rows.to_csv(index=False),
                     headers={"Content-Type": "text/csv"}, timeout=60)  # fmt: skip
    assert csv.json() == {"predictions": want}

    # 32 clients at once, a row each: merged into compiled batches, every answer its own row's
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda r: post(compiled.url, {"dataframe_records": [r]}).json(), recs))
    assert [a["predictions"][0] for a in answers] == want


BAD = {
    "missing column": {"dataframe_records": [{"hour": 5.0, "distance": 100.0}]},
    "text in a number column": "hour:noon",
    "records not a list": {"dataframe_records": {"hour": 5}},
    "two format keys": {"dataframe_records": [], "instances": []},
    "null label": "carrier:None",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_the_same_error_from_both_engines(servers, versions, january_split, case):
    compiled, plain = servers
    body = BAD[case]
    if isinstance(body, str):  # column:value on a real row
        from flywheel.tasks import compiling

        col, value = body.split(":")
        row = compiling.json_records(january_split.X_test.head(1))[0]
        body = {"dataframe_records": [{**row, col: None if value == "None" else value}]}
    got, want = post(compiled.url, body), post(plain.url, body)
    assert (got.status_code, got.json()) == (want.status_code, want.json())
    assert got.headers["X-Request-Id"] and got.headers["X-Flywheel-Model-Version"] == versions["flights"]["version"]


def test_a_version_that_cannot_be_compiled_is_loaded_beside_it_and_serves_through_pyfunc(
    servers, versions, january_split
):
    compiled, _ = servers
    refused = versions["refused"]
    loaded = httpx.post(compiled.url + "/admin/load", json={"version": refused["version"]}, headers=AUTH, timeout=300)
    assert loaded.status_code == 200, loaded.text
    standby = loaded.json()["loaded"]
    assert standby["engine"] == "pyfunc" and standby["compiled"] == refused["package"].compiled
    assert httpx.post(compiled.url + "/admin/swap", json={"version": refused["version"]}, headers=AUTH,
                      timeout=30).status_code == 200  # fmt: skip
    info = httpx.get(compiled.url + "/version", timeout=10).json()
    assert info["model_version"] == refused["version"] and info["engine"] == "pyfunc"
    rows = january_split.X_test.sample(n=50, random_state=2)
    from flywheel.tasks import compiling

    recs = compiling.json_records(rows)
    resp = post(
        compiled.url, {"dataframe_split": {"columns": list(rows.columns), "data": [list(r.values()) for r in recs]}}
    )
    assert resp.json() == {"predictions": refused["pyfunc"].predict(rows).tolist()}
    back = httpx.post(compiled.url + "/admin/rollback", headers=AUTH, timeout=30)
    assert back.status_code == 200 and back.json()["active"]["engine"] == "onnxruntime"
