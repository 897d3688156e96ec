"""Training: model specs and params files, features, the split, and the pipeline on real data.

Code tests first, then model tests (behavioural: it learns something, it is deterministic, it is robust to
inputs a serving endpoint will see).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import candidates, model_specs, training
from flywheel.tasks.evaluation import evaluate_model
from flywheel.tasks.model_specs import (
    ModelSpec,
    ModelSpecError,
    default_model_spec,
    load_model_specs,
    resolve_estimator,
)
from flywheel.tasks.training import build_pipeline, feature_frame, positive_label, split_dataset, train_model

SEED = 42


def params_file(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------- model specs
@pytest.mark.parametrize(("task", "cls"), [("binary", HistGradientBoostingClassifier), ("regression", Ridge)])
def test_default_model_spec_per_task(task, cls):
    spec = default_model_spec(task)
    assert resolve_estimator(spec) is cls
    assert load_model_specs(None, task) == [spec]


def test_params_file_with_one_model(tmp_path):
    path = params_file(tmp_path, "name: lr\nestimator: logistic_regression\nparams: {C: 0.5, max_iter: 500}\n")
    [spec] = load_model_specs(path, "binary")
    assert (spec.name, spec.estimator, spec.params) == ("lr", "logistic_regression", {"C": 0.5, "max_iter": 500})
    assert spec.class_path == "sklearn.linear_model.LogisticRegression"


def test_params_file_with_candidates(tmp_path):
    path = params_file(
        tmp_path,
        """
candidates:
  - name: rf
    estimator: random_forest
    params: {n_estimators: 50}
  - name: full-path
    estimator: sklearn.linear_model.LogisticRegression
""",
    )
    specs = load_model_specs(str(path), "binary")
    assert [s.name for s in specs] == ["rf", "full-path"]
    assert [resolve_estimator(s) for s in specs] == [RandomForestClassifier, LogisticRegression]
    assert specs[1].params == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("candidates: []\n", "non-empty list"),
        ("candidates: {name: x}\n", "non-empty list"),
        ("estimator: [unclosed\n", "not valid YAML"),
        ("name: no-estimator\n", "candidate 0"),
        ("- estimator: ridge\n", "candidate 0"),
        ("estimator: xgboost_classifier\n", "unknown estimator 'xgboost_classifier'"),
        ("estimator: random_forest\nparams: {n_trees: 10}\n", r"has no parameter\(s\) \['n_trees'\]"),
        ("candidates:\n  - estimator: ridge\n  - estimator: nope\n", "unknown estimator 'nope'"),
    ],
    ids=["empty", "not-a-list", "bad-yaml", "no-estimator", "top-level-list", "unknown", "bad-param", "2nd-bad"],
)
def test_bad_params_files(tmp_path, text, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model_specs(params_file(tmp_path, text), "regression")


def test_missing_params_file(tmp_path):
    with pytest.raises(ModelSpecError, match="not found"):
        load_model_specs(tmp_path / "params.yaml", "binary")


@pytest.mark.parametrize(
    ("task", "estimator", "message"),
    [("binary", "ridge", "Ridge is not a classifier"), ("regression", "random_forest", "not a regressor")],
)
def test_estimator_must_fit_the_task(tmp_path, task, estimator, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model_specs(params_file(tmp_path, f"estimator: {estimator}\n"), task)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("os.system", "not a scikit-learn estimator"),
        ("builtins.eval", "not a scikit-learn estimator"),
        ("subprocess.Popen", "not a scikit-learn estimator"),  # refused before it is ever instantiated
        ("sklearnx.Foo", "cannot be imported"),
        ("xgboost_classifier", "unknown estimator"),
    ],
)
def test_class_paths_that_are_not_estimators_are_refused(path, message):
    """Any importable class with scikit-learn's API works by class path (tests/unit/test_own_estimators.py);
    anything else is refused without being called."""
    with pytest.raises(ModelSpecError, match=message):
        resolve_estimator(ModelSpec(estimator=path))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("sklearn.linear_model.NoSuchModel", "cannot be imported"),
        ("sklearn.nowhere.Model", "cannot be imported"),
        ("sklearn.metrics.accuracy_score", "not a scikit-learn estimator"),
        ("sklearn.linear_model", "not a scikit-learn estimator"),
    ],
)
def test_sklearn_paths_that_are_not_estimators_are_refused(path, message):
    with pytest.raises(ModelSpecError, match=message):
        resolve_estimator(ModelSpec(estimator=path))


def test_params_hash_depends_on_estimator_and_params_only():
    a = ModelSpec(name="a", estimator="ridge", params={"alpha": 1.0})
    same = ModelSpec(name="b", estimator="sklearn.linear_model.Ridge", params={"alpha": 1.0})
    assert a.params_hash() == same.params_hash()
    assert a.params_hash() != ModelSpec(estimator="ridge", params={"alpha": 2.0}).params_hash()
    assert a.params_hash() != ModelSpec(estimator="linear_regression", params={}).params_hash()
    assert len(a.params_hash()) == 16


# --------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_seeds_estimators_that_take_a_seed(tiny_spec):
    rf = build_pipeline(tiny_spec, ModelSpec(estimator="random_forest"), seed=7)
    assert rf.named_steps["model"].random_state == 7
    explicit = build_pipeline(tiny_spec, ModelSpec(estimator="random_forest", params={"random_state": 1}), seed=7)
    assert explicit.named_steps["model"].random_state == 1
    unseeded = build_pipeline(tiny_spec, ModelSpec(estimator="linear_regression"), seed=7)  # takes no random_state
    assert isinstance(unseeded.named_steps["model"], LinearRegression)


def test_pipeline_preprocesses_only_the_spec_columns(tiny_spec):
    pre = build_pipeline(tiny_spec, ModelSpec(estimator="logistic_regression"), SEED).named_steps["preprocess"]
    columns = [(name, cols) for name, _, cols in pre.transformers]
    assert columns == [("numeric", ["x1", "x2"]), ("categorical", ["colour"])]
    assert pre.remainder == "drop"


def test_pipeline_without_categorical_columns():
    spec = DatasetSpec(source="x.csv", target="y", task="regression", numeric=["a"])
    pre = build_pipeline(spec, default_model_spec("regression"), SEED).named_steps["preprocess"]
    assert [name for name, _, _ in pre.transformers] == ["numeric"]


def test_unknown_parameter_fails_when_building(tiny_spec):
    with pytest.raises(ModelSpecError, match="has no parameter"):
        build_pipeline(tiny_spec, ModelSpec(estimator="ridge", params={"depth": 3}), SEED)


# --------------------------------------------------------------------------------------------------- features
def test_feature_frame_types_and_columns(tiny_spec):
    df = pd.DataFrame(
        {
            "colour": ["red", None, "blue"],
            "x2": ["1.5", "oops", None],
            "x1": [1, 2, 3],
            "label": [1, 0, 1],
            "ts": ["2013-01-01"] * 3,
        }
    )
    X = feature_frame(df, tiny_spec)
    assert X.columns.tolist() == ["x1", "x2", "colour"]
    assert X.dtypes.astype(str).tolist() == ["float64", "float64", "object"]
    assert X["x2"].isna().tolist() == [False, True, True]
    assert X["x2"].iloc[0] == 1.5
    assert X["colour"].tolist() == ["red", "missing", "blue"]
    assert X.index.equals(df.index)


def test_feature_frame_missing_column_raises(tiny_spec):
    with pytest.raises(KeyError):
        feature_frame(pd.DataFrame({"x1": [1.0], "x2": [2.0]}), tiny_spec)


def test_positive_label_matches_across_types():
    spec_int = DatasetSpec(source="x", target="y", positive_class=1, numeric=["a"])
    spec_str = spec_int.with_overrides(positive_class="1")
    assert positive_label(pd.Series(["0", "1", "0"]), spec_int) == "1"
    found = positive_label(pd.Series(np.array([0, 1, 0], dtype="int64")), spec_str)
    assert found == 1 and type(found) is int  # a plain int, not numpy's (it ends up in JSON and MLflow tags)
    assert positive_label(pd.Series([0.0, 1.0]), spec_int) == 1.0
    assert positive_label(pd.Series(["a", "b"]), spec_int) == 1  # not in the data: the spec's value


# --------------------------------------------------------------------------------------------------- split
def test_split_is_stratified_and_seeded(january, flights_spec):
    a = split_dataset(january, flights_spec, seed=SEED)
    b = split_dataset(january, flights_spec, seed=SEED)
    c = split_dataset(january, flights_spec, seed=SEED + 1)
    assert (len(a.X_train), len(a.X_test)) == (3200, 800)
    assert a.X_test.index.equals(b.X_test.index)
    assert not a.X_test.index.equals(c.X_test.index)
    assert set(a.X_train.index).isdisjoint(a.X_test.index)
    assert abs(a.y_train.mean() - a.y_test.mean()) < 0.005
    assert a.X_train.columns.tolist() == flights_spec.features


def test_split_task_wrapper(january, flights_spec):
    parts = training.split.fn(january, flights_spec, SEED)
    assert len(parts.X_test) == 800


def test_fit_cache_key_follows_data_spec_params_and_seed(flights_spec):
    base = {"data_key": "abc", "spec": flights_spec, "model": default_model_spec("binary"), "seed": 1}
    key = training._fit_cache_key(None, base)
    assert key == training._fit_cache_key(None, dict(base))
    for change in (
        {"data_key": "abd"},
        {"seed": 2},
        {"model": ModelSpec(estimator="gradient_boosting", params={"max_iter": 10})},
        {"spec": flights_spec.with_overrides(numeric=["hour"])},
    ):
        assert training._fit_cache_key(None, {**base, **change}) != key


# --------------------------------------------------------------------------------------------------- model: flights
def test_flights_model_beats_trivial_baselines(flights_model, january_split, flights_spec):
    y = january_split.y_test
    positive = positive_label(y, flights_spec)
    metrics = evaluate_model(flights_model, january_split.X_test, y, flights_spec, positive)
    share = float((y == positive).mean())
    all_positive_f1 = 2 * share / (1 + share)  # precision = share, recall = 1
    assert metrics["f1"] > 0.0  # the all-negative baseline's F1
    assert metrics["f1"] > all_positive_f1 + 0.05
    assert metrics["roc_auc"] > 0.6


def test_flights_model_predicts_the_data_labels(flights_model, january_split):
    assert set(np.unique(flights_model.predict(january_split.X_test))) == {0, 1}
    proba = flights_model.predict_proba(january_split.X_test)
    assert proba.shape == (800, 2)
    assert np.allclose(proba.sum(axis=1), 1.0)


def test_training_is_deterministic_for_a_seed(january_split, flights_spec):
    model = ModelSpec(estimator="random_forest", params={"n_estimators": 20, "max_depth": 8})
    X = january_split.X_test
    first = train_model(january_split, flights_spec, model, SEED).predict_proba(X)
    second = train_model(january_split, flights_spec, model, SEED).predict_proba(X)
    other_seed = train_model(january_split, flights_spec, model, SEED + 1).predict_proba(X)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other_seed)


def test_default_model_is_deterministic(flights_model, january_split, flights_spec):
    again = train_model(january_split, flights_spec, default_model_spec("binary"), SEED)
    X = january_split.X_test
    np.testing.assert_array_equal(again.predict_proba(X), flights_model.predict_proba(X))


def test_prediction_ignores_column_order_and_extra_columns(flights_model, january_split):
    X = january_split.X_test
    shuffled = X[X.columns[::-1]].assign(passenger_name="unused")
    np.testing.assert_array_equal(flights_model.predict_proba(shuffled), flights_model.predict_proba(X))


def test_unseen_and_missing_values_are_tolerated(flights_model, january_split):
    X = january_split.X_test.head(5).copy()
    X["carrier"] = "ZZ"  # a carrier never seen in training
    X["dest"] = "missing"
    X["temp"] = np.nan
    proba = flights_model.predict_proba(X)
    assert proba.shape == (5, 2) and np.isfinite(proba).all()


# --------------------------------------------------------------------------------------------------- model: regression
@pytest.mark.parametrize(
    "model",
    [
        ModelSpec(estimator="linear_regression"),
        ModelSpec(estimator="random_forest_regressor", params={"n_estimators": 50, "min_samples_leaf": 3}),
        default_model_spec("regression"),
    ],
    ids=["linear", "random-forest", "default-ridge"],
)
def test_regression_pipeline_learns(diabetes, model):
    df, spec = diabetes
    parts = split_dataset(df, spec, seed=SEED)
    assert parts.y_train.dtype == "float64"
    assert len(parts.X_test) == math.ceil(len(df) * 0.2)
    fitted = train_model(parts, spec, model, SEED)
    metrics = evaluate_model(fitted, parts.X_test, parts.y_test, spec)
    assert set(metrics) == {"rmse", "mae", "r2"}
    assert metrics["r2"] > 0.2
    assert metrics["rmse"] < float(parts.y_test.std())  # better than predicting the mean


# --------------------------------------------------------------------------------------------------- candidates
CANDIDATES_FILE = Path(__file__).resolve().parents[2] / "flywheel" / "params" / "candidates.yaml"


def test_shipped_candidates_file_lists_logreg_hgb_and_random_forest():
    specs = load_model_specs(CANDIDATES_FILE, "binary")
    assert [s.name for s in specs] == ["logreg", "hgb", "rf"]
    assert [resolve_estimator(s) for s in specs] == [
        LogisticRegression, HistGradientBoostingClassifier, RandomForestClassifier
    ]  # fmt: skip
    with pytest.raises(ModelSpecError, match="not a regressor"):
        load_model_specs(CANDIDATES_FILE, "regression")


def test_unnamed_candidates_are_named_after_their_estimator(tmp_path):
    path = params_file(
        tmp_path, "candidates:\n  - estimator: ridge\n  - estimator: sklearn.linear_model.LinearRegression\n"
    )
    assert [s.name for s in load_model_specs(path, "regression")] == ["ridge", "LinearRegression"]
    [single] = load_model_specs(params_file(tmp_path, "estimator: ridge\n"), "regression")
    assert single.name == "model"  # a one-model file keeps its old default name


def test_candidate_names_must_be_unique(tmp_path):
    path = params_file(tmp_path, "candidates:\n  - {name: a, estimator: ridge}\n  - {name: a, estimator: ridge}\n")
    with pytest.raises(ModelSpecError, match=r"unique, repeated: \['a'\]"):
        load_model_specs(path, "regression")


def test_candidates_parameter_or_params_file(tmp_path):
    items = [{"name": "lr", "estimator": "logistic_regression"}, ModelSpec(name="rf", estimator="random_forest")]
    assert [s.name for s in model_specs.resolve_model_specs(None, items, "binary")] == ["lr", "rf"]
    assert model_specs.resolve_model_specs(None, None, "binary") == [default_model_spec("binary")]
    assert [s.name for s in model_specs.resolve_model_specs(CANDIDATES_FILE, None, "binary")] == ["logreg", "hgb", "rf"]
    with pytest.raises(ModelSpecError, match="either a params file or a candidates list"):
        model_specs.resolve_model_specs(CANDIDATES_FILE, items, "binary")
    with pytest.raises(ModelSpecError, match="unknown estimator 'nope'"):
        model_specs.resolve_model_specs(None, [{"estimator": "ridge"}, {"estimator": "nope"}], "regression")
    with pytest.raises(ModelSpecError, match="non-empty list"):
        model_specs.resolve_model_specs(None, [], "binary")


@pytest.mark.parametrize(
    ("task", "configured", "expected"),
    [
        ("binary", None, "f1"),
        ("regression", None, "rmse"),
        ("binary", "ROC_AUC", "roc_auc"),
        ("regression", "r2", "r2"),
    ],  # fmt: skip
)
def test_selection_metric_defaults_and_settings(task, configured, expected):
    assert model_specs.selection_metric(task, configured) == expected


@pytest.mark.parametrize(("task", "configured"), [("binary", "rmse"), ("regression", "f1"), ("binary", "loss")])
def test_selection_metric_must_fit_the_task(task, configured):
    with pytest.raises(ModelSpecError, match=f"'{configured}' is not a {task} metric"):
        model_specs.selection_metric(task, configured)


def test_candidate_set_hash_covers_the_set_not_names_or_order():
    lr = ModelSpec(name="lr", estimator="logistic_regression", params={"C": 1.0})
    rf = ModelSpec(name="rf", estimator="random_forest", params={"n_estimators": 10})
    assert model_specs.candidate_set_hash([lr], "f1") == lr.params_hash()  # single-model lineage is unchanged
    pair = model_specs.candidate_set_hash([lr, rf], "f1")
    assert len(pair) == 16 and pair not in {lr.params_hash(), rf.params_hash()}
    assert model_specs.candidate_set_hash([rf.model_copy(update={"name": "forest"}), lr], "f1") == pair
    assert model_specs.candidate_set_hash([lr, rf], "roc_auc") != pair  # another metric can pick another winner
    bigger = rf.model_copy(update={"params": {"n_estimators": 20}})
    assert model_specs.candidate_set_hash([lr, bigger], "f1") != pair
    assert model_specs.candidate_set_hash([lr, rf, bigger], "f1") != pair


def _result(name, error=None, **metrics):
    return candidates.CandidateResult(
        name, ModelSpec(name=name, estimator="ridge"), metrics, f"run-{name}", error=error
    )


def test_best_candidate_by_metric_direction():
    results = [_result("a", f1=0.4, rmse=3.0), _result("b", f1=0.6, rmse=2.0), _result("c", f1=0.5, rmse=1.0)]
    assert candidates.best_candidate(results, "f1").name == "b"  # higher is better
    assert candidates.best_candidate(results, "rmse").name == "c"  # lower is better
    assert candidates.best_candidate([_result("x", r2=-0.5), _result("y", r2=-0.1)], "r2").name == "y"


def test_best_candidate_tie_goes_to_the_first_listed():
    assert candidates.best_candidate([_result("a", f1=0.5), _result("b", f1=0.5)], "f1").name == "a"
    assert candidates.best_candidate([_result("a", rmse=1.0), _result("b", rmse=1.0)], "rmse").name == "a"


def test_best_candidate_skips_failed_missing_and_nan():
    results = [
        _result("failed", error="ValueError: boom", f1=0.99),
        _result("no-metric", accuracy=0.9),
        _result("nan", f1=float("nan")),
        _result("ok", f1=0.1),
    ]
    assert candidates.best_candidate(results, "f1").name == "ok"
    with pytest.raises(ModelSpecError, match=r"no candidate can be selected on 'f1' \(failed: ValueError: boom; "):
        candidates.best_candidate(results[:3], "f1")
    with pytest.raises(ModelSpecError, match="no candidates"):
        candidates.best_candidate([], "f1")


def test_candidate_summary_has_no_model_and_names_where_it_ran():
    result = _result("a", f1=0.5)
    result.model, result.worker = object(), {"pid": "1"}
    summary = result.summary()
    assert summary == {
        "name": "a", "estimator": "sklearn.linear_model.Ridge", "params_hash": result.model_spec.params_hash(),
        "metrics": {"f1": 0.5}, "run_id": "run-a", "worker": {"pid": "1"}, "error": None,
    }  # fmt: skip


def test_worker_identity_outside_dask():
    ident = candidates.worker_identity()
    assert ident["pid"] == str(os.getpid()) and ident["host"] and ident["thread"]
    assert "dask_worker" not in ident


class _FakeRegistry:
    """Records the MLflow calls train_candidate makes (no server)."""

    def __init__(self):
        self.calls = []

    def client(self, uri=None):
        self.calls.append(("client", uri))
        return "client"

    def start_run(self, client, experiment_id, run_name, tags, parent_run_id=None):
        self.calls.append(("start", experiment_id, run_name, parent_run_id, tags))
        return "child-1"

    def log_run_data(self, client, run_id, *, params=None, metrics=None, tags=None):
        self.calls.append(("log", run_id, params, metrics))

    def end_run(self, client, run_id, status="FINISHED"):
        self.calls.append(("end", run_id, status))


@pytest.fixture
def fake_registry(monkeypatch):
    from flywheel.tasks import registry, tracking

    fake = _FakeRegistry()
    monkeypatch.setattr(registry, "client", fake.client)
    for name in ("start_run", "log_run_data", "end_run"):
        monkeypatch.setattr(tracking, name, getattr(fake, name))
    # The cached `train-model` task needs the Prefect engine; its plain function is what it runs.
    monkeypatch.setattr(training, "fit", lambda split, spec, model, seed, _key: train_model(split, spec, model, seed))
    return fake


def test_train_candidate_logs_a_nested_run(fake_registry, january_split, flights_spec):
    model = ModelSpec(name="lr", estimator="logistic_regression", params={"max_iter": 300})
    tracking = candidates.CandidateTracking("http://mlflow", "7", "parent-1", {"flywheel.flow_run_id": "fr"})
    result = candidates.train_candidate.fn(model, january_split, flights_spec, SEED, "abcdef0123", 1, tracking)

    assert result.name == "lr" and result.run_id == "child-1" and result.error is None
    assert result.metrics["f1"] > 0 and hasattr(result.model, "predict_proba")
    assert result.worker["pid"] == str(os.getpid())
    calls = fake_registry.calls
    assert calls[0] == ("client", "http://mlflow")
    _, experiment_id, run_name, parent, tags = calls[1]
    assert (experiment_id, run_name, parent) == ("7", "lr-abcdef01", "parent-1")
    assert tags["flywheel.candidate"] == "lr" and tags["flywheel.flow_run_id"] == "fr"
    assert tags["flywheel.worker.pid"] == str(os.getpid())
    params = {"estimator": "sklearn.linear_model.LogisticRegression", "model.max_iter": 300}
    assert calls[2] == ("log", "child-1", params, None)
    assert calls[3][0] == "log" and calls[3][3] == {f"holdout_{k}": v for k, v in result.metrics.items()}
    assert calls[-1] == ("end", "child-1", "FINISHED")


def test_failed_candidate_ends_its_run_failed(fake_registry, january_split, flights_spec):
    bad = ModelSpec(name="bad", estimator="logistic_regression", params={"C": -1.0})  # sklearn rejects C <= 0
    tracking = candidates.CandidateTracking(None, "7", "parent-1")
    with pytest.raises(ValueError):
        candidates.train_candidate.fn(bad, january_split, flights_spec, SEED, "abcdef0123", 1, tracking)
    assert fake_registry.calls[-1] == ("end", "child-1", "FAILED")


def test_candidate_task_runner_threads_by_default_and_dask_when_configured(fresh_settings):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flywheel.tasks.candidates import candidate_task_runner, openmp_threads_per_candidate, runner_label

    fresh_settings.delenv("FLYWHEEL_DASK_ADDRESS", raising=False)
    runner = candidate_task_runner(3)
    assert isinstance(runner, ThreadPoolTaskRunner)
    assert runner_label(runner) == f"threads:{min(3, os.cpu_count() or 1)}"
    assert runner_label(candidate_task_runner(1)) == "threads:1"
    assert openmp_threads_per_candidate(candidate_task_runner(1)) is None  # one at a time: no cap
    assert openmp_threads_per_candidate(ThreadPoolTaskRunner(max_workers=2)) == max(1, (os.cpu_count() or 1) // 2)

    from flywheel.core.settings import get_settings

    fresh_settings.setenv("FLYWHEEL_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    get_settings.cache_clear()
    runner = candidate_task_runner(3)  # built, not connected: nothing listens there
    assert isinstance(runner, DaskTaskRunner) and runner.address == "tcp://127.0.0.1:8786"
    assert runner_label(runner) == "dask:tcp://127.0.0.1:8786"
    assert openmp_threads_per_candidate(runner) is None


def test_openmp_limit_caps_only_the_calling_thread():
    import threading

    from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

    before = _openmp_effective_n_threads()
    seen = {}

    def capped():
        with candidates.openmp_limit(1):
            seen["inside"] = _openmp_effective_n_threads()

    thread = threading.Thread(target=capped)
    thread.start()
    thread.join()
    assert seen["inside"] == 1
    assert _openmp_effective_n_threads() == before
    with candidates.openmp_limit(None):
        assert _openmp_effective_n_threads() == before
