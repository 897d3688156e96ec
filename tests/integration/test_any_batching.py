"""Micro-batching for a model signed with `Any` columns, on real processes: the session's champion trained by the
real `train` flow (issue 14's raw-rows signature: text `string`, every other feature `Any`), compiled as deploy-model
compiles it, served by the real model server (`python -m flywheel.serving`) once with its compiled model and once
through pyfunc. Concurrent single-row requests are merged (the server's `flywheel_predict_batch_rows` histogram
counts predict calls of more than one row), and every row gets the answer it gets alone — rows whose values are of
other Python types (an int sent as a float, a missing value) and a bad row among them included.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from stacks import start_model_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ADMIN = "any-batching-admin"
CLIENTS = 16
MAX_ROUNDS = 20  # rounds of concurrent requests before giving up on seeing a merged predict call


@pytest.fixture(scope="module")
def any_model(trained_champion, mlflow_server):
    """(name, version) of a copy of the session champion, compiled for serving as deploy-model does; its verdict."""
    import uuid

    from mlflow import MlflowClient

    from flywheel.tasks.packaging import compile_for_serving

    client = MlflowClient(mlflow_server.url)
    name = f"any-batching-{uuid.uuid4().hex[:8]}"
    base = trained_champion
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=base.source, run_id=base.run_id,
                                     model_id=base.source.rsplit("/", 1)[-1])  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        verdict = compile_for_serving(name, str(mv.version), True)
    return name, str(mv.version), verdict


@pytest.fixture(scope="module")
def servers(any_model, mlflow_server, tmp_path_factory):
    name, version, _ = any_model
    tmp = tmp_path_factory.mktemp("any-servers")
    started = []
    try:
        for compiled in (True, False):
            started.append(
                start_model_server(mlflow_server.url, name, version, tmp, admin_token=ADMIN, compiled=compiled)
            )
        yield {"compiled": started[0], "pyfunc": started[1]}
    finally:
        for mp in started:
            mp.stop()


@pytest.fixture(scope="module")
def bodies(trained_champion, mlflow_server):
    """Single-row request bodies of held-out March flights as the user's table has them (ints and all); the same
    rows with every int sent as a float, and with a number sent as text (the raw-input step reads it); one row with
    a missing value; last, a bad row (text that is no number), of the same batching key as the rows of text."""
    import mlflow

    from flywheel.core.spec import load_spec
    from flywheel.tasks import compiling
    from flywheel.tasks.data import load_flights

    spec = load_spec()
    flights = load_flights()
    rows = flights.loc[flights["month"] == 3, spec.features].dropna().sample(n=48, random_state=3)
    recs = compiling.json_records(rows)
    number = spec.numeric[0]
    floats = [{k: float(v) if type(v) is int else v for k, v in r.items()} for r in recs[:16]]
    as_text = [{**r, number: str(r[number])} for r in recs[16:24]]
    missing = {**recs[1], number: None}
    bad = {**recs[2], number: "not a number"}
    mlflow.set_tracking_uri(mlflow_server.url)
    schema = mlflow.models.get_model_info(trained_champion.source).signature.inputs
    return [{"dataframe_records": [r]} for r in (*recs, *floats, *as_text, missing, bad)], schema


def _batches(url: str) -> tuple[float, float]:
    """(predict calls, of them those of one row) from the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    count = float(re.search(r"^flywheel_predict_batch_rows_count (\S+)$", text, re.M).group(1))
    ones = float(re.search(r'^flywheel_predict_batch_rows_bucket\{le="1\.0"\} (\S+)$', text, re.M).group(1))
    return count, ones


def _answer(url: str, body: dict) -> tuple[int, object]:
    resp = httpx.post(url + "/invocations", json=body, timeout=60)
    return resp.status_code, resp.json().get("predictions", resp.json().get("error_code"))


def test_the_train_flow_signs_numeric_features_any(bodies, any_model):
    from mlflow.types.schema import AnyType, DataType

    _, schema = bodies
    types = schema.input_types()
    assert any(isinstance(t, AnyType) for t in types) and all(
        isinstance(t, AnyType) or t == DataType.string for t in types
    ), schema
    assert any_model[2].startswith("compiled: yes"), any_model[2]


@pytest.mark.parametrize("engine", ["compiled", "pyfunc"])
def test_concurrent_single_rows_of_an_any_model_are_batched_and_each_gets_its_own_answer(servers, bodies, engine):
    url = servers[engine].url
    reqs, _ = bodies
    assert httpx.get(url + "/version", timeout=10).json()["engine"] == ("onnxruntime" if engine == "compiled"
                                                                        else "pyfunc")  # fmt: skip
    state = httpx.get(url + "/admin/state", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    assert state["active"]["batching"] is True, state["active"]
    alone = [_answer(url, b) for b in reqs]  # one at a time: nothing to merge with
    assert [s for s, _ in alone].count(200) == len(reqs) - 1 and alone[-1][0] == 400, alone[-3:]
    assert alone[-2][0] == 200  # a missing value in an `Any` column is the raw-input step's to read

    before = _batches(url)
    merged = 0.0
    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(MAX_ROUNDS):
            together = list(pool.map(lambda b: _answer(url, b), reqs))
            assert together == alone  # every row, the bad one too, as alone
            count, ones = _batches(url)
            merged = (count - before[0]) - (ones - before[1])  # predict calls of more than one row
            if merged > 0:
                break
    assert merged > 0, f"no predict call of more than one row in {MAX_ROUNDS} rounds of {CLIENTS} clients"
