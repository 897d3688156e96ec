"""Compiled inference on real data and real models, against a real MLflow registry (SQLite in tmp): no mocks of
MLflow, skl2onnx or onnxruntime, and no server process (apps through Starlette's TestClient).

The flights demo model (trained on January flights by the conftest fixtures), a regression on load_diabetes, the
raw-input pipeline the train flow logs (a coercion step first), a version skl2onnx cannot convert and one whose
compiled output is forced to differ: each either serves compiled with labels identical to pyfunc's, or serves
through pyfunc with the reason.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from serving_models import log_version, sqlite_experiment, wait_until
from starlette.testclient import TestClient

from flywheel.serving.app import create_app
from flywheel.tasks import compiling
from flywheel.tasks import registry as reg

MODEL = "flights-compiled-test"
ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


# --------------------------------------------------------------------------------------------------- helpers
def _log_distance(X: pd.DataFrame) -> pd.DataFrame:
    """A first step that is not a cast (skl2onnx converts no FunctionTransformer with a function)."""
    return X.assign(distance=np.log1p(X["distance"]))


def _shift_baseline(onnx_bytes: bytes, delta: float) -> bytes:
    """The same graph with every tree ensemble's baseline moved: its probabilities, and so labels, differ."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    for node in model.graph.node:
        if node.op_type.startswith("TreeEnsemble"):
            for attr in node.attribute:
                if attr.name == "base_values_as_tensor":
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t) + delta, attr.t.name))
                elif attr.name == "base_values":
                    attr.floats[:] = [v + delta for v in attr.floats]
    return model.SerializeToString()


def served_app(uri: str, version: str, **kwargs):
    app = create_app(MODEL, uri, admin_token=ADMIN, initial_version=version, **kwargs)
    client = TestClient(app)
    client.__enter__()
    wait_until(lambda: client.get("/ping").status_code == 200)
    return client, app


def split_of(frame: pd.DataFrame) -> dict:
    recs = compiling.json_records(frame)
    return {"columns": list(frame.columns), "data": [list(r.values()) for r in recs]}


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def feb(flights, flights_spec):
    """February flights as the model's features (weather columns hold real missing values)."""
    from flywheel.tasks import training

    return training.feature_frame(flights.loc[flights["month"] == 2], flights_spec)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, january, january_split, flights_model, flights_spec):
    """Versions of MODEL: 1 the flights model (its holdout sample logged, compiled), 2 a pipeline that starts with
    a FunctionTransformer, 3 the flights model with its compiled form forced to differ, 4 the flights model with no
    holdout sample of its own (champion: v1), 5 the flights model as the train flow logs it (raw-input step)."""
    from mlflow.models import infer_signature
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from flywheel.tasks import training

    root = tmp_path_factory.mktemp("compiled")
    X, holdout = january_split.X_train, january_split.X_test

    with sqlite_experiment(root, "compiled-test") as (uri, exp):

        def log(model, example: pd.DataFrame, holdout_sample: pd.DataFrame | None, signature=None) -> str:
            return log_version(root, exp, model, example, holdout_sample, MODEL, signature)

        client = reg.client(uri)
        versions = {"flights": log(flights_model, X, holdout)}
        refused = Pipeline([("log", FunctionTransformer(_log_distance)), *clone(flights_model).steps])
        refused.fit(X, january_split.y_train)
        versions["refused"] = log(refused, X, holdout)
        versions["forced"] = log(flights_model, X, holdout)
        versions["no_holdout"] = log(flights_model, X, None)
        raw_model = training.servable_model(flights_model, january, flights_spec)
        raw = january[flights_spec.features]
        sig = reg.raw_rows_signature(infer_signature(raw.head(200), raw_model.predict(raw.head(200))))
        versions["raw"] = log(raw_model, raw, holdout, signature=sig)
        client.set_registered_model_alias(MODEL, reg.CHAMPION, versions["flights"])
        verdicts = {
            name: compiling.compile_version(client, MODEL, v) for name, v in versions.items() if name != "forced"
        }
        yield {"uri": uri, "client": client, "versions": versions, "verdicts": verdicts, "root": root}


@pytest.fixture(scope="module")
def pyfunc_models(registry):
    import mlflow.pyfunc
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(registry["uri"]):
        return {name: mlflow.pyfunc.load_model(f"models:/{MODEL}/{v}") for name, v in registry["versions"].items()}


@pytest.fixture(scope="module")
def compiled_server(registry, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("request-log")
    client, app = served_app(registry["uri"], registry["versions"]["flights"], request_log_dir=log_dir,
                             request_log_flush_seconds=0.2)  # fmt: skip
    yield client, app, log_dir
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def pyfunc_server(registry):
    client, app = served_app(registry["uri"], registry["versions"]["flights"], compiled=False)
    yield client, app
    client.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------------- parity
def test_flights_model_compiles_with_every_label_identical(registry, pyfunc_models, feb):
    verdict = registry["verdicts"]["flights"]
    assert verdict.ok and verdict.engine == "onnxruntime", verdict.reason
    parity = verdict.parity
    assert parity["labels_differ"] == 0 and parity["max_abs_proba_diff"] <= compiling.PROBA_TOLERANCE
    assert parity["rows"] > 800 and parity["probe_rows"] > 0  # the holdout sample, and rows with a missing value
    assert verdict.reason.startswith("compiled: yes (onnxruntime; labels identical on ")
    tags = registry["client"].get_model_version(MODEL, registry["versions"]["flights"]).tags
    assert tags[compiling.TAG_COMPILED] == verdict.reason.removeprefix("compiled: ")

    # beyond the parity sample: all of February, as JSON rows, through the server's codec
    compiled, _ = compiling.load_compiled(registry["client"], *_run_and_source(registry, "flights"), _tmp(registry))
    recs = compiling.json_records(feb)
    enc = compiled.encode("dataframe_records", recs)
    got, unsure = compiled.predict(enc.feeds, enc.n)
    want = pyfunc_models["flights"].predict(feb)
    sure = np.ones(len(feb), dtype=bool) if unsure is None else ~unsure
    assert len(feb) > 20_000 and (got[sure] == want[sure]).all() and got.dtype == want.dtype
    assert sure.sum() >= len(feb) - 5  # rows near the decision boundary go to pyfunc: a handful at most


def test_regression_on_diabetes_within_one_millionth(tmp_path):
    import mlflow.pyfunc
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_diabetes(return_X_y=True, as_frame=True)
    train, test = X.iloc[:300], X.iloc[300:]
    for i, model in enumerate(
        (make_pipeline(StandardScaler(), Ridge(alpha=1.0)), HistGradientBoostingRegressor(max_iter=100, random_state=0))
    ):
        model.fit(train, y.iloc[:300])
        path = tmp_path / f"m{i}"
        mlflow.sklearn.save_model(model, path, signature=infer_signature(train, model.predict(train)),
                                  serialization_format="cloudpickle")  # fmt: skip
        pm = mlflow.pyfunc.load_model(str(path))
        verdict = compiling.compile_model(pm, test, sample_source="the diabetes holdout")
        assert verdict.ok, verdict.reason
        assert verdict.parity["values_differ"] == 0 and verdict.parity["max_rel_diff"] <= 1e-6
        compiled = compiling.CompiledModel(verdict.onnx, verdict.plan)
        enc = compiled.encode("dataframe_split", split_of(X))
        got, unsure = compiled.predict(enc.feeds, enc.n)
        want = pm.predict(X)
        assert unsure is None and got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_multiclass_labels_and_a_forest_whose_nulls_are_left_to_pyfunc(tmp_path):
    """Three string classes; a RandomForest (its converted trees route a missing value unlike scikit-learn's)
    compiles with the nulls of those columns scored by pyfunc, and every other row compiled."""
    import mlflow.pyfunc
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    X, y = load_iris(return_X_y=True, as_frame=True)
    y = y.map({0: "setosa", 1: "versicolor", 2: "virginica"})
    for i, model in enumerate(
        (HistGradientBoostingClassifier(max_iter=30), RandomForestClassifier(30, random_state=0))
    ):
        model.fit(X, y)
        mlflow.sklearn.save_model(model, tmp_path / f"m{i}", signature=infer_signature(X, model.predict(X)),
                                  serialization_format="cloudpickle")  # fmt: skip
        pm = mlflow.pyfunc.load_model(str(tmp_path / f"m{i}"))
        verdict = compiling.compile_model(pm, X, sample_source="iris")
        assert verdict.ok, verdict.reason
        compiled = compiling.CompiledModel(verdict.onnx, verdict.plan)
        enc = compiled.encode("dataframe_records", compiling.json_records(X))
        got, unsure = compiled.predict(enc.feeds, enc.n)
        assert unsure is None and got.tolist() == pm.predict(X).tolist() and got.dtype == object
        with_null = {**compiling.json_records(X.iloc[:1])[0], "petal width (cm)": None}
        served_compiled = compiled.encode("dataframe_records", [with_null]) is not None
        assert served_compiled == isinstance(model, HistGradientBoostingClassifier)
        if not served_compiled:
            assert "is scored by pyfunc" in verdict.reason and verdict.parity["nulls_to_pyfunc"]


def test_a_native_categorical_booster_is_refused_with_the_reason(tmp_path, january_split):
    import mlflow.pyfunc
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import HistGradientBoostingClassifier

    X = january_split.X_train[["hour", "distance", "carrier"]].astype({"carrier": "category"})
    model = HistGradientBoostingClassifier(max_iter=20, categorical_features="from_dtype").fit(X, january_split.y_train)
    mlflow.sklearn.save_model(model, tmp_path / "m", signature=infer_signature(X.astype({"carrier": str})),
                              serialization_format="cloudpickle")  # fmt: skip
    verdict = compiling.compile_model(mlflow.pyfunc.load_model(str(tmp_path / "m")), X.astype({"carrier": str}),
                                      sample_source="the held-out rows")  # fmt: skip
    assert not verdict.ok and verdict.engine == "pyfunc"
    assert verdict.reason.startswith("compiled: no (") and len(verdict.reason) > 20


def test_a_pipeline_skl2onnx_cannot_convert_serves_pyfunc_with_its_reason(registry, pyfunc_models, feb):
    verdict = registry["verdicts"]["refused"]
    assert not verdict.ok and "FunctionTransformer" in verdict.reason, verdict.reason
    meta = compiling.read_meta(registry["client"], _run_and_source(registry, "refused")[0])
    assert meta["ok"] is False and meta["onnx_sha256"] is None and meta["reason"] == verdict.reason
    client, app = served_app(registry["uri"], registry["versions"]["refused"])
    try:
        version = client.get("/version").json()
        assert version["engine"] == "pyfunc" and version["compiled"] == verdict.reason
        rows = feb.sample(n=30, random_state=5)
        resp = client.post("/invocations", json={"dataframe_split": split_of(rows)})
        assert resp.json() == {"predictions": pyfunc_models["refused"].predict(rows).tolist()}
    finally:
        client.__exit__(None, None, None)


def test_a_version_whose_compiled_output_differs_never_serves_compiled(registry, pyfunc_models, feb, monkeypatch):
    from flywheel.tasks.compiling import compile as compile_step

    original = compile_step._convert

    def differing(*args, **kwargs):
        onnx_bytes, plan = original(*args, **kwargs)
        return _shift_baseline(onnx_bytes, 0.4), plan

    monkeypatch.setattr(compile_step, "_convert", differing)
    version = registry["versions"]["forced"]
    verdict = compiling.compile_version(registry["client"], MODEL, version)
    monkeypatch.undo()
    assert not verdict.ok and "labels differ" in verdict.reason, verdict.reason
    assert verdict.parity["labels_differ"] > 0
    tags = registry["client"].get_model_version(MODEL, version).tags
    assert tags[compiling.TAG_COMPILED].startswith("no (") and "labels differ" in tags[compiling.TAG_COMPILED]
    client, app = served_app(registry["uri"], version)
    try:
        assert app.server.active.compiled is None and client.get("/version").json()["engine"] == "pyfunc"
        rows = feb.sample(n=40, random_state=6)
        resp = client.post("/invocations", json={"dataframe_records": compiling.json_records(rows)})
        assert resp.json() == {"predictions": pyfunc_models["forced"].predict(rows).tolist()}
    finally:
        client.__exit__(None, None, None)


def test_a_compiled_artefact_that_does_not_check_out_is_not_served(registry, tmp_path):
    """An artefact replaced after its parity check (its hash no longer matches) means pyfunc."""
    client = registry["client"]
    run_id, source = _run_and_source(registry, "no_holdout")
    folder = tmp_path / compiling.COMPILED_DIR
    folder.mkdir()
    meta = compiling.read_meta(client, run_id)
    assert meta["ok"]
    onnx_path = client.download_artifacts(run_id, compiling.ONNX_ARTIFACT, str(tmp_path / "dl"))
    (folder / compiling.ONNX_FILE).write_bytes(_shift_baseline(open(onnx_path, "rb").read(), 0.4))
    client.log_artifact(run_id, str(folder / compiling.ONNX_FILE), compiling.COMPILED_DIR)
    model, reason = compiling.load_compiled(client, run_id, source, str(tmp_path / "load"))
    assert model is None and "hash" in reason
    model, reason = compiling.load_compiled(client, run_id, "models:/some-other-model", str(tmp_path / "load2"))
    assert model is None and "another model" in reason


def test_a_version_without_a_holdout_sample_is_checked_on_the_champions(registry):
    verdict = registry["verdicts"]["no_holdout"]
    assert verdict.ok and f"the champion v{registry['versions']['flights']}'s holdout sample" in verdict.reason


def test_the_train_flows_raw_input_step_is_applied_when_the_inputs_are_built(registry, pyfunc_models, january):
    verdict = registry["verdicts"]["raw"]
    assert verdict.ok, verdict.reason
    plan = {c.name: c for c in verdict.plan.columns}
    assert plan["hour"].kind == "any" and plan["hour"].dtype == "float64" and plan["temp"].nan_ok
    assert plan["carrier"].null_fill is not None  # a null label becomes the training data's "missing" label
    client, app = served_app(registry["uri"], registry["versions"]["raw"])
    try:
        assert client.get("/version").json()["engine"] == "onnxruntime"
        raw = january.sample(n=60, random_state=8)[list(plan)]  # raw rows: int64 hours, NaN weather
        recs = compiling.json_records(raw)
        recs[0]["carrier"], recs[1]["temp"] = None, None
        from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

        want = pyfunc_models["raw"].predict(
            dataframe_from_parsed_json(recs, "records", pyfunc_models["raw"].metadata.get_input_schema())
        )
        resp = client.post("/invocations", json={"dataframe_records": recs})
        assert resp.status_code == 200 and resp.json() == {"predictions": want.tolist()}
        assert not app.server.active.model.loaded  # all of it served compiled, nulls included
    finally:
        client.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------------- serving
def test_compiled_version_answers_every_json_format_like_pyfunc(compiled_server, pyfunc_models, feb):
    client, app, log_dir = compiled_server
    slot = app.server.active
    assert slot.engine == "onnxruntime" and client.get("/version").json()["engine"] == "onnxruntime"
    assert client.get("/admin/state", headers=AUTH).json()["active"]["compiled"].startswith("compiled: yes")
    rows = feb.sample(n=80, random_state=3)
    want = pyfunc_models["flights"].predict(rows).tolist()
    recs = compiling.json_records(rows)
    columnar = {c: [r[c] for r in recs] for c in rows.columns}
    bodies = {
        "dataframe_split": {"dataframe_split": split_of(rows)},
        "dataframe_records": {"dataframe_records": recs},
        "instances": {"instances": recs},
        "inputs (records)": {"inputs": recs},
        "inputs (columns)": {"inputs": columnar},
        "params.request_id": {"dataframe_records": recs, "params": {"request_id": "compiled-1"}},
    }
    for name, body in bodies.items():
        resp = client.post("/invocations", json=body)
        assert resp.status_code == 200 and resp.json() == {"predictions": want}, name
    assert resp.headers["X-Request-Id"] == "compiled-1"
    one = client.post("/invocations", json={"dataframe_split": split_of(rows.iloc[:1])})
    assert one.json() == {"predictions": want[:1]} and one.headers["X-Flywheel-Model-Version"] == slot.version
    assert not slot.model.loaded  # no scikit-learn model was needed

    # concurrent single rows are merged into one compiled batch; each answer is its row's
    jobs = [app.server._json_job(slot, {"dataframe_records": [r]}, rid=f"c{i}") for i, r in enumerate(recs)]
    assert all(j.kind == "compiled" and j.key == ("compiled",) for j in jobs)
    outcomes = app.server._score_group(jobs)
    assert [json.loads(o.body)["predictions"][0] for o in outcomes] == want

    wait_until(lambda: (log_dir / "").exists() and app.server.request_log.rows_written >= len(rows) * 7)
    from flywheel.tasks.request_log import read_request_log

    logged = read_request_log(log_dir, MODEL)
    assert {"compiled-1", "c0"} <= set(logged["request_id"]) and "prediction" in logged.columns


def test_predictions_are_written_as_mlflow_writes_them():
    from mlflow.pyfunc.scoring_server import predictions_to_json

    from flywheel.serving.compiled import _predictions_json

    for preds in (np.array([0, 1, 1]), np.array([0.1, 2.5e-17, 3.0]), np.array(["a", "b"], dtype=object),
                  np.array([[0.25, 0.75]]), np.array([True, False])):  # fmt: skip
        buf = io.StringIO()
        predictions_to_json(preds, buf)
        assert _predictions_json(preds) == buf.getvalue().encode()


BAD_OR_ODD = {
    "missing column": lambda r: {"dataframe_records": [{k: v for k, v in r.items() if k != "origin"}]},
    "text in a number column": lambda r: {"dataframe_records": [{**r, "hour": "noon"}]},
    "number as text": lambda r: {"dataframe_records": [{**r, "hour": "7"}]},
    "bool in a number column": lambda r: {"dataframe_records": [{**r, "hour": True}]},
    "number in a text column": lambda r: {"dataframe_records": [{**r, "carrier": 7}]},
    "null label": lambda r: {"dataframe_records": [{**r, "carrier": None}]},
    "null number": lambda r: {"dataframe_records": [{**r, "pressure": None}]},
    "split with an index": lambda r: {
        "dataframe_split": {"index": [7], "columns": list(r), "data": [list(r.values())]}
    },
    "split without data": lambda r: {"dataframe_split": {"columns": list(r)}},
    "records not a list": lambda r: {"dataframe_records": r},
    "empty records": lambda r: {"dataframe_records": []},
    "ragged instances": lambda r: {"instances": [r, {k: v for k, v in r.items() if k != "dest"}]},
    "nested value in an extra column": lambda r: {"dataframe_records": [{**r, "extra": {"a": [1, 2]}}]},
    "params": lambda r: {"dataframe_records": [r], "params": {"unknown": 1}},
}


@pytest.mark.parametrize("case", list(BAD_OR_ODD))
def test_errors_and_odd_inputs_get_mlflows_own_answers(compiled_server, pyfunc_server, feb, case):
    """On a compiled slot anything but a plain request takes MLflow's path: the same status and body as the same
    version served through pyfunc; a request refused by the schema loads no scikit-learn model."""
    client, app, _ = compiled_server
    pclient, _ = pyfunc_server
    row = compiling.json_records(feb.iloc[:1])[0]
    body = BAD_OR_ODD[case](row)
    got, want = client.post("/invocations", json=body), pclient.post("/invocations", json=body)
    assert (got.status_code, got.json()) == (want.status_code, want.json()), case
    if case in ("missing column", "text in a number column", "records not a list", "split without data"):
        assert got.status_code == 400


def test_a_schema_error_loads_no_model_and_a_request_that_needs_one_loads_it_once(registry, feb):
    client, app = served_app(registry["uri"], registry["versions"]["flights"])
    try:
        slot = app.server.active
        row = compiling.json_records(feb.iloc[:1])[0]
        bad = client.post("/invocations", json={"dataframe_records": [{**row, "hour": "noon"}]})
        missing = client.post("/invocations", json={"dataframe_records": [{"hour": 5}]})
        assert bad.status_code == missing.status_code == 400 and not slot.model.loaded
        assert client.post("/invocations", json={"dataframe_records": [{**row, "carrier": None}]}).status_code == 200
        assert slot.model.loaded  # loaded on the worker thread for the request that needed it
    finally:
        client.__exit__(None, None, None)


def test_rows_the_compiled_model_is_unsure_of_are_answered_by_pyfunc(registry, pyfunc_models, feb):
    client, app = served_app(registry["uri"], registry["versions"]["flights"])
    try:
        slot = app.server.active
        slot.compiled.plan.output.margin = 2.0  # every row "near the boundary"
        rows = feb.sample(n=25, random_state=9)
        resp = client.post("/invocations", json={"dataframe_split": split_of(rows)})
        assert resp.json() == {"predictions": pyfunc_models["flights"].predict(rows).tolist()}
        assert slot.model.loaded
    finally:
        client.__exit__(None, None, None)


def test_compilation_off(registry, pyfunc_server):
    pclient, papp = pyfunc_server
    version = pclient.get("/version").json()
    assert version["engine"] == "pyfunc" and version["compiled"] == "compiled: off (FLYWHEEL_COMPILE_MODELS=false)"
    verdict = compiling.compile_version(registry["client"], MODEL, registry["versions"]["refused"], enabled=False)
    assert verdict.reason.startswith("compiled: off")
    tags = registry["client"].get_model_version(MODEL, registry["versions"]["refused"]).tags
    assert tags[compiling.TAG_COMPILED] == "off (FLYWHEEL_COMPILE_MODELS=false)"


# --------------------------------------------------------------------------------------------------- the codec
CODEC_COLUMNS = [
    compiling.ColumnPlan("d", "double", nan_ok=True),
    compiling.ColumnPlan("d2", "double"),
    compiling.ColumnPlan("l", "long", dtype="int64"),
    compiling.ColumnPlan("s", "string", dtype="object"),
    compiling.ColumnPlan("f", "float", dtype="float32"),
]
BASE = {"d": 1.5, "d2": -2.0, "l": 3, "s": "x", "f": 0.25}
VARIANTS = {
    "plain": {},
    "int in double": {"d": 5, "d2": 2**40},
    "null where taken": {"d": None},
    "null where refused": {"d2": None},
    "bool in double": {"d": True},
    "text in double": {"d": "1.5"},
    "float in long": {"l": 1.5},
    "huge int": {"l": 2**70},
    "bool in long": {"l": False},
    "null label": {"s": None},
    "number label": {"s": 5},
    "big int in float": {"f": 2**30},
    "NaN": {"d2": float("nan")},
    "infinity": {"d": float("inf")},
}
PLAIN = {"plain", "int in double", "null where taken"}
CODEC_PLAN = compiling.Plan(
    columns=CODEC_COLUMNS,
    inputs=[compiling.InputGroup("numbers", "float64", ["d", "d2"]), compiling.InputGroup("l", "int64", ["l"]),
            compiling.InputGroup("s", "object", ["s"]), compiling.InputGroup("f", "float32", ["f"])],
    output=compiling.OutputPlan("value", ["v"]),
)  # fmt: skip


def _mlflow_frame(schema, body):
    """What MLflow's scoring path hands the model for `body` (an exception when it refuses it)."""
    from mlflow.models import Model
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc import scoring_server as ss

    meta = Model()
    parsed = ss._parse_json_data(body, meta, schema)
    return _enforce_schema(parsed.data, schema)


@pytest.mark.parametrize("fmt", ["dataframe_split", "dataframe_records", "instances", "inputs", "inputs-columns"])
def test_the_codec_serves_only_what_mlflow_parses_alike(fmt):
    """Every body the codec turns into inputs, MLflow parses too, to the same values and dtypes; the plain ones
    are served compiled and the others are left to MLflow."""
    from mlflow.types.schema import ColSpec, DataType, Schema

    types = {"double": DataType.double, "long": DataType.long, "string": DataType.string, "float": DataType.float}
    schema = Schema([ColSpec(types[c.kind], c.name) for c in CODEC_COLUMNS])
    codec = compiling.InputCodec(CODEC_PLAN)
    served = set()
    for name, change in VARIANTS.items():
        rows = [{**BASE, "extra": "ignored"}, {**BASE, **change, "extra": 1}]
        if fmt == "dataframe_split":
            cols = list(rows[0])
            key, value = fmt, {"columns": cols, "data": [[r[c] for c in cols] for r in rows]}
        elif fmt == "inputs-columns":
            key, value = "inputs", {c: [r[c] for r in rows] for c in rows[0]}
        else:
            key, value = fmt, rows
        enc = codec.encode(key, value)
        if enc is None:
            continue
        served.add(name)
        frame = _mlflow_frame(schema, {key: value})
        columns = {c: enc.feeds[g.name][:, j] for g in CODEC_PLAN.inputs for j, c in enumerate(g.columns)}
        for col in CODEC_COLUMNS:
            mine, theirs = columns[col.name], frame[col.name].to_numpy()
            assert mine.dtype == theirs.dtype or (col.kind == "string" and theirs.dtype == object), (name, col.name)
            assert pd.Series(mine).equals(pd.Series(theirs).astype(mine.dtype)), (name, col.name, mine, theirs)
    assert served == PLAIN, fmt


def test_the_codec_needs_every_column_and_one_shape():
    codec = compiling.InputCodec(CODEC_PLAN)
    assert codec.encode("dataframe_records", [BASE]) is not None
    assert codec.encode("dataframe_records", [{k: v for k, v in BASE.items() if k != "f"}]) is None
    assert codec.encode("dataframe_split", {"columns": ["d", "d"], "data": [[1.0, 2.0]]}) is None
    assert codec.encode("dataframe_split", {"columns": list(BASE), "data": [[1.0]]}) is None
    assert codec.encode("instances", [BASE, {**BASE, "extra": 1}]) is None  # instances: one key set
    assert codec.encode("inputs", {**{k: [v] for k, v in BASE.items()}, "extra": [1, 2]}) is None
    enc = codec.encode("dataframe_split", {"columns": list(BASE), "data": [list(BASE.values())] * 3})
    assert enc.n == 3 and enc.feeds["numbers"].shape == (3, 2) and enc.feeds["s"].shape == (3, 1)
    assert all(a.flags["C_CONTIGUOUS"] for a in enc.feeds.values())
    assert enc.feeds["numbers"].tolist() == [[1.5, -2.0]] * 3 and enc.feeds["f"].dtype == np.float32


# --------------------------------------------------------------------------------------------------- packaging, ledger
def test_packaging_compiles_and_a_failed_compilation_never_fails_it(registry, monkeypatch):
    from flywheel.tasks import packaging

    def unreachable(*args, **kwargs):
        raise ConnectionError("registry down")

    monkeypatch.setattr(reg, "client", unreachable)
    verdict = packaging.compile_for_serving(MODEL, registry["versions"]["flights"], enabled=True)
    assert verdict.startswith("compiled: no (compilation failed: ConnectionError")


def test_the_ledger_records_the_engine(registry):
    from flywheel.tasks import ledger

    version = registry["versions"]["flights"]
    reason = registry["verdicts"]["flights"].reason
    rec = ledger.DeploymentRecord(model_name=MODEL, version=version, alias="champion", target="local",
                                  url="http://127.0.0.1:5080", trigger="manual", outcome="serving",
                                  engine="onnxruntime", engine_reason=reason)  # fmt: skip
    ledger.record_in_registry(registry["client"], rec)
    tags = registry["client"].get_model_version(MODEL, version).tags
    assert tags["deploy_engine"] == "onnxruntime" and tags["deploy_engine_reason"].startswith("compiled: yes")


# --------------------------------------------------------------------------------------------------- small helpers
def _run_and_source(registry, name: str) -> tuple[str, str]:
    mv = registry["client"].get_model_version(MODEL, registry["versions"][name])
    return mv.run_id, str(mv.source)


def _tmp(registry) -> str:
    import tempfile

    return tempfile.mkdtemp(dir=registry["root"])
