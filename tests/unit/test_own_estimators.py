"""Your own estimator and features: any estimator with scikit-learn's API by class path (LightGBM, XGBoost), and a
factory in the user's own module that builds an estimator or a whole pipeline from the dataset spec; the user's code
goes with the model and into its code version, and a bad factory fails before any training."""

from __future__ import annotations

import textwrap
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import model_specs, registry, training
from flywheel.tasks.evaluation import evaluate_model
from flywheel.tasks.model_specs import ModelSpec, ModelSpecError, load_model_specs
from flywheel.tasks.training import build_pipeline, train_model

SEED = 42
lightgbm = pytest.importorskip("lightgbm")
xgboost = pytest.importorskip("xgboost")


@pytest.fixture(scope="module")
def cancer() -> tuple[pd.DataFrame, DatasetSpec]:
    frame = load_breast_cancer(as_frame=True).frame
    spec = DatasetSpec(
        name="cancer", source="unused.csv", target="target", task="binary", positive_class=1,
        numeric=[c for c in frame.columns if c != "target"],
    )  # fmt: skip
    return frame, spec


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def fit_and_score(frame: pd.DataFrame, spec: DatasetSpec, model: ModelSpec):
    parts = training.split_dataset(frame, spec, seed=SEED)
    fitted = train_model(parts, spec, model, SEED)
    return fitted, evaluate_model(fitted, parts.X_test, parts.y_test, spec, 1 if spec.task == "binary" else None)


FEATURES = """
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler


    def log_amounts(X):
        return np.log1p(X.clip(lower=0))


    def estimator(spec, C=1.0):
        return LogisticRegression(C=C, max_iter=2000)


    def pipeline(spec, C=1.0):
        features = ColumnTransformer([("log", FunctionTransformer(log_amounts), spec.numeric)], remainder="drop")
        return Pipeline([("features", features), ("scale", StandardScaler()), ("clf", LogisticRegression(C=C))])


    def regressor(spec):
        return Ridge()
"""


# --------------------------------------------------------------------------------------------------- class paths
def test_lightgbm_classifier_by_class_path(tmp_path, cancer):
    frame, spec = cancer
    params = write(
        tmp_path, "params.yaml",
        """
        name: lgbm
        estimator: lightgbm.LGBMClassifier
        params: {n_estimators: 60, learning_rate: 0.1, verbose: -1, max_bin: 63}  # max_bin: LightGBM's own
        """,
    )  # fmt: skip
    [model] = load_model_specs(params, "binary", dataset=spec)
    fitted, metrics = fit_and_score(frame, spec, model)

    estimator = fitted.named_steps["model"]
    assert isinstance(estimator, lightgbm.LGBMClassifier) and estimator.random_state == SEED
    assert metrics["f1"] > 0.9 and metrics["roc_auc"] > 0.95
    # Stored the usual way (skops, its types trusted) and pinned as a requirement of the model.
    storage = registry.model_storage(fitted, model)
    assert storage["serialization_format"] == "skops" and storage["code_paths"] is None
    assert f"lightgbm=={lightgbm.__version__}" in storage["pip_requirements"]
    loaded = skops.io.loads(skops.io.dumps(fitted), trusted=storage["skops_trusted_types"])
    parts = training.split_dataset(frame, spec, seed=SEED)
    np.testing.assert_allclose(loaded.predict_proba(parts.X_test), fitted.predict_proba(parts.X_test))


def test_xgboost_regressor_by_class_path(tmp_path, diabetes):
    frame, spec = diabetes
    text = "estimator: xgboost.XGBRegressor\nparams: {n_estimators: 80, max_depth: 3}\n"
    params = write(tmp_path, "params.yaml", text)
    [model] = load_model_specs(params, "regression", dataset=spec)
    fitted, metrics = fit_and_score(frame, spec, model)

    assert isinstance(fitted.named_steps["model"], xgboost.XGBRegressor)
    assert fitted.named_steps["model"].random_state == SEED  # seeded though its __init__ names only **kwargs
    assert metrics["r2"] > 0.2
    again, _ = fit_and_score(frame, spec, model)
    X = training.feature_frame(frame.head(50), spec)
    np.testing.assert_array_equal(again.predict(X), fitted.predict(X))
    assert any(r.startswith("xgboost") and "==" in r for r in registry.pip_requirements(fitted))


@pytest.mark.parametrize(
    ("task", "fits", "wrong", "message"),
    [
        ("binary", "xgboost.XGBClassifier", "xgboost.XGBRegressor", "XGBRegressor is not a classifier"),
        ("regression", "lightgbm.LGBMRegressor", "lightgbm.LGBMClassifier", "LGBMClassifier is not a regressor"),
        ("multiclass", "lightgbm.LGBMClassifier", "lightgbm.LGBMRegressor", "LGBMRegressor is not a classifier"),
    ],
)
def test_class_path_estimators_must_fit_the_task(task, fits, wrong, message):
    """By scikit-learn's estimator tags: a regressor for regression, a classifier for binary and multiclass."""
    assert model_specs.model_specs_from([{"estimator": fits}], task)[0].class_path == fits
    with pytest.raises(ModelSpecError, match=message):
        model_specs.model_specs_from([{"estimator": wrong}], task)


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("lightgbm.LGBMClassifier", {"n_estimator": 10}, r"'n_estimator' \(did you mean 'n_estimators'\?\)"),
        ("xgboost.XGBClassifier", {"max_dept": 3}, "did you mean 'max_depth'"),
        ("sklearn.ensemble.RandomForestClassifier", {"max_bin": 10}, r"no parameter\(s\) \['max_bin'\]"),
        ("sklearn.linear_model.LogisticRegresion", {}, "did you mean 'LogisticRegression'"),
    ],
)
def test_unknown_parameters_and_names_are_refused(path, params, message):
    with pytest.raises(ModelSpecError, match=message):
        model_specs.model_specs_from([{"estimator": path, "params": params}], "binary")


def test_native_parameters_of_kwargs_estimators_pass_through():
    [spec] = model_specs.model_specs_from(
        [{"estimator": "lightgbm.LGBMClassifier", "params": {"min_data_in_leaf": 5, "colsample_bynode": 0.8}}],
        "binary",
    )
    assert model_specs.resolve_estimator(spec) is lightgbm.LGBMClassifier


def test_own_estimator_class_next_to_the_params_file(tmp_path, cancer):
    frame, spec = cancer
    write(
        tmp_path, "my_estimators.py",
        """
        from sklearn.linear_model import LogisticRegression


        class SteadyLogistic(LogisticRegression):
            '''A logistic regression of the user's own (a subclass: scikit-learn's API and tags).'''
        """,
    )  # fmt: skip
    params = write(tmp_path, "params.yaml", "estimator: my_estimators.SteadyLogistic\nparams: {max_iter: 2000}\n")
    [model] = load_model_specs(params, "binary", dataset=spec)
    fitted, metrics = fit_and_score(frame, spec, model)
    assert type(fitted.named_steps["model"]).__name__ == "SteadyLogistic" and metrics["f1"] > 0.9
    assert model.user_code().paths == ((tmp_path / "my_estimators.py").resolve(),)
    assert registry.model_storage(fitted, model)["serialization_format"] == "cloudpickle"


# --------------------------------------------------------------------------------------------------- factories
def test_factory_returning_an_estimator_gets_flywheels_preprocessing(tmp_path, cancer):
    frame, spec = cancer
    write(tmp_path, "features.py", FEATURES)
    params = write(tmp_path, "params.yaml", "name: own\nfactory: features:estimator\nparams: {C: 0.5}\n")
    [model] = load_model_specs(params, "binary", dataset=spec)
    assert model.source_dir == str(tmp_path.resolve()) and model.class_path == "features:estimator"

    pipeline = build_pipeline(spec, model, SEED)
    assert [name for name, _ in pipeline.steps] == ["preprocess", "model"]
    assert isinstance(pipeline.named_steps["model"], LogisticRegression)
    assert pipeline.named_steps["model"].C == 0.5 and pipeline.named_steps["model"].random_state == SEED
    _, metrics = fit_and_score(frame, spec, model)
    assert metrics["f1"] > 0.9


def test_factory_returning_a_pipeline_is_used_as_is(tmp_path, cancer):
    frame, spec = cancer
    write(tmp_path, "features.py", FEATURES)
    params = write(tmp_path, "params.yaml", "factory: features:pipeline\n")
    [model] = load_model_specs(params, "binary", dataset=spec)
    fitted, metrics = fit_and_score(frame, spec, model)

    assert [name for name, _ in fitted.steps] == ["features", "scale", "clf"]  # no preprocessing of ours
    transformer = fitted.named_steps["features"].transformers_[0][1]
    assert transformer.func.__module__ == "features" and transformer.func.__name__ == "log_amounts"
    assert metrics["f1"] > 0.9
    # The user's file goes with the model, which is pickled by reference to it (not skops).
    storage = registry.model_storage(fitted, model)
    assert storage["code_paths"] == [str((tmp_path / "features.py").resolve())]
    assert storage["serialization_format"] == "cloudpickle" and "skops_trusted_types" not in storage
    names = [r.partition("==")[0] for r in storage["pip_requirements"]]
    assert "cloudpickle" in names and "features" not in names


def test_candidates_parameter_looks_in_the_working_directory(tmp_path, monkeypatch, cancer):
    _, spec = cancer
    write(tmp_path, "features.py", FEATURES)
    monkeypatch.chdir(tmp_path)
    specs = model_specs.resolve_model_specs(
        None, [{"factory": "features:estimator"}, {"factory": "features:pipeline"}], "binary", dataset=spec
    )
    assert [s.name for s in specs] == ["features.estimator", "features.pipeline"]  # unnamed: module.function


def test_factory_module_is_not_left_on_sys_path(tmp_path, cancer):
    import sys

    _, spec = cancer
    write(tmp_path, "features.py", FEATURES)
    load_model_specs(write(tmp_path, "params.yaml", "factory: features:estimator\n"), "binary", dataset=spec)
    assert str(tmp_path.resolve()) not in sys.path and str(tmp_path) not in sys.path


def test_sibling_modules_and_packages_go_with_the_model(tmp_path, cancer):
    _, spec = cancer
    write(
        tmp_path, "helpers.py",
        """
        from sklearn.linear_model import LogisticRegression


        def clip(X):
            return X.clip(lower=0)


        def make(spec):
            return LogisticRegression()
        """,
    )  # fmt: skip
    write(
        tmp_path, "features.py",
        """
        import helpers
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer
        from sklearn.linear_model import LogisticRegression


        def model(spec):
            return make_pipeline(FunctionTransformer(helpers.clip), LogisticRegression())
        """,
    )  # fmt: skip
    write(tmp_path, "ownpkg/__init__.py", "")
    write(tmp_path, "ownpkg/models.py", "from sklearn.linear_model import LogisticRegression as model\n")
    write(tmp_path, "ownpkg/factories.py", "from .models import model as _m\n\ndef make(spec):\n    return _m()\n")
    factories = ["helpers:make", "features:model", "ownpkg.factories:make"]  # helpers imported before features
    params = write(tmp_path, "params.yaml", "candidates:\n" + "".join(f"  - factory: {f}\n" for f in factories))
    alone, flat, package = load_model_specs(params, "binary", dataset=spec)
    root = tmp_path.resolve()
    assert alone.user_code().paths == (root / "helpers.py",)
    assert flat.user_code().paths == (root / "features.py", root / "helpers.py")  # what features.py imports
    assert package.user_code().paths == (root / "ownpkg",)
    # Editing the sibling is an edit of the code that imports it.
    before = registry.code_version([flat])
    (tmp_path / "helpers.py").write_text((tmp_path / "helpers.py").read_text() + "# tuned\n")
    assert registry.code_version([flat]) != before


def test_modules_of_the_same_name_in_two_directories(tmp_path, cancer):
    _, spec = cancer
    first, second = tmp_path / "a", tmp_path / "b"
    write(first, "features.py", "from sklearn.linear_model import LogisticRegression\n\ndef m(spec):\n"
          "    return LogisticRegression(C=1.0)\n")  # fmt: skip
    write(second, "features.py", "from sklearn.linear_model import LogisticRegression\n\ndef m(spec):\n"
          "    return LogisticRegression(C=2.0)\n")  # fmt: skip
    for directory, c in ((first, 1.0), (second, 2.0), (first, 1.0)):
        [model] = load_model_specs(write(directory, "params.yaml", "factory: features:m\n"), "binary", dataset=spec)
        assert build_pipeline(spec, model, SEED).named_steps["model"].C == c


def test_a_module_shadowing_an_imported_one_is_refused(tmp_path, cancer):
    _, spec = cancer
    write(tmp_path, "json.py", "def m(spec):\n    return None\n")
    with pytest.raises(ModelSpecError, match="'json' .* already imported .* rename it"):
        load_model_specs(write(tmp_path, "params.yaml", "factory: json:m\n"), "binary", dataset=spec)


# --------------------------------------------------------------------------------------------------- bad factories
BAD_FACTORIES = """
    from sklearn.linear_model import LogisticRegression, Ridge


    def raises(spec):
        raise ValueError("no column called 'tenure' in " + spec.name)


    def returns_none(spec):
        return None


    def returns_text(spec):
        return "LogisticRegression"


    def returns_class(spec):
        return LogisticRegression


    def returns_regressor(spec):
        return Ridge()


    def takes_nothing():
        return LogisticRegression()


    NOT_CALLABLE = 3
"""


@pytest.mark.parametrize(
    ("factory", "params", "message"),
    [
        ("bad:raises", {}, "factory 'bad:raises' raised ValueError: no column called 'tenure' in cancer"),
        ("bad:returns_none", {}, "returned NoneType: it must return an estimator or a Pipeline"),
        ("bad:returns_text", {}, "returned str: it must return an estimator"),
        ("bad:returns_class", {}, r"returned the class LogisticRegression \(not an instance\)"),
        ("bad:returns_regressor", {}, r"returned \(Ridge\) is not a classifier \(task 'binary'\)"),
        ("bad:takes_nothing", {}, r"cannot be called as takes_nothing\(dataset_spec, \*\*params\)"),
        ("bad:raises", {"depth": 3}, r"with params \['depth'\]"),
        ("bad:NOT_CALLABLE", {}, "is not a function: it is a int"),
        ("bad:nope", {}, "bad has no 'nope'"),
        ("nowhere:make", {}, "module 'nowhere' not found in .* or on sys.path"),
        ("broken:make", {}, r"module 'broken' \(.*broken.py\) failed to import: ZeroDivisionError"),
        ("bad.raises", {}, "must look like package.module:function"),
    ],
)
def test_bad_factories_fail_with_a_clear_error(tmp_path, cancer, factory, params, message):
    _, spec = cancer
    write(tmp_path, "bad.py", BAD_FACTORIES)
    write(tmp_path, "broken.py", "RATE = 1 / 0\n")
    path = tmp_path / "params.yaml"
    path.write_text(f"name: x\nfactory: '{factory}'\nparams: {params}\n")
    with pytest.raises(ModelSpecError, match=message) as err:
        load_model_specs(path, "binary", dataset=spec)
    assert f"params file {path}, candidate 0" in str(err.value)


def test_a_bad_factory_stops_the_train_flow_before_any_step(tmp_path, cancer, fresh_settings):
    """The train flow's plan checks the factory: no registry check, no data pulled, nothing trained."""
    from flywheel.flows.train import TrainSteps, run_train

    frame, spec = cancer
    data = tmp_path / "cancer.csv"
    frame.to_csv(data, index=False)
    spec_path = write(tmp_path, "spec.yaml", spec.with_overrides(source=str(data)).model_dump_json())
    write(tmp_path, "bad.py", BAD_FACTORIES)
    params = write(tmp_path, "params.yaml", "factory: bad:returns_none\n")

    def never(*args, **kwargs):
        raise AssertionError("a step ran before the factory was checked")

    steps = replace(TrainSteps(), **{f.name: never for f in fields(TrainSteps)})
    with pytest.raises(ModelSpecError, match="returned NoneType"):
        run_train(steps, None, spec_path=str(spec_path), params_path=str(params))


# --------------------------------------------------------------------------------------------------- code version
def test_the_users_code_is_part_of_the_code_version(tmp_path, cancer):
    _, spec = cancer
    features = write(tmp_path, "features.py", FEATURES)
    params = write(tmp_path, "params.yaml", "factory: features:estimator\nparams: {C: 0.5}\n")
    [model] = load_model_specs(params, "binary", dataset=spec)
    own = registry.code_version([model])
    assert own != registry.code_version() and own == registry.code_version([model])
    # A candidate of scikit-learn (or an installed library) only adds nothing: existing lineages stay the same.
    sklearn_only = [ModelSpec(estimator="ridge"), ModelSpec(estimator="lightgbm.LGBMClassifier")]
    assert registry.code_version(sklearn_only) == registry.code_version()
    key = training._fit_cache_key(None, {"spec": spec, "model": model, "seed": SEED, "data_key": "d"})

    features.write_text(features.read_text().replace("max_iter=2000", "max_iter=3000"))
    assert registry.code_version([model]) not in (own, registry.code_version())
    assert training._fit_cache_key(None, {"spec": spec, "model": model, "seed": SEED, "data_key": "d"}) != key
    # ...and the edited code is what trains.
    assert build_pipeline(spec, model, SEED).named_steps["model"].max_iter == 3000


def test_params_hash_of_factories_and_estimators():
    factory = ModelSpec(factory="features:estimator", params={"C": 0.5})
    assert factory.params_hash() != ModelSpec(factory="features:pipeline", params={"C": 0.5}).params_hash()
    assert factory.params_hash() != ModelSpec(factory="features:estimator", params={"C": 1}).params_hash()
    assert factory.params_hash() == factory.looked_up_in(Path.cwd()).params_hash()  # where it is: not a param
    with pytest.raises(ValueError, match="either 'estimator'"):
        ModelSpec(estimator="ridge", factory="features:estimator")
    with pytest.raises(ValueError, match="either 'estimator'"):
        ModelSpec()


def test_pipeline_of_a_factory_is_seeded_where_unset(tmp_path, cancer):
    _, spec = cancer
    write(
        tmp_path, "seeded.py",
        """
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.feature_selection import SelectFromModel
        from sklearn.pipeline import Pipeline


        def forest(spec):
            select = SelectFromModel(RandomForestClassifier(n_estimators=10))
            return Pipeline([("select", select), ("model", RandomForestClassifier(random_state=3))])
        """,
    )  # fmt: skip
    [model] = load_model_specs(write(tmp_path, "params.yaml", "factory: seeded:forest\n"), "binary", dataset=spec)
    built = build_pipeline(spec, model, SEED)
    assert isinstance(built, Pipeline)
    assert built.named_steps["select"].estimator.random_state == SEED  # unset: seeded
    assert built.named_steps["model"].random_state == 3  # the user's own seed stays
