"""Training: model specs (estimator + hyper-parameters), features, the holdout split and the sklearn pipeline.

Candidates competing on a task runner are in `candidates`; the plan and result of one training run in `training_run`."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, ValidationError
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from flywheel.core.errors import UserError
from flywheel.core.spec import DatasetSpec
from flywheel.tasks.evaluation import primary_metric

CLASSIFICATION_METRICS = frozenset({"accuracy", "precision", "recall", "f1", "roc_auc"})
REGRESSION_METRICS = frozenset({"rmse", "mae", "r2"})

# Short names for the estimators people reach for first; any other `sklearn.*` class path works too.
ESTIMATORS = {
    "logistic_regression": "sklearn.linear_model.LogisticRegression",
    "random_forest": "sklearn.ensemble.RandomForestClassifier",
    "gradient_boosting": "sklearn.ensemble.HistGradientBoostingClassifier",
    "linear_regression": "sklearn.linear_model.LinearRegression",
    "ridge": "sklearn.linear_model.Ridge",
    "random_forest_regressor": "sklearn.ensemble.RandomForestRegressor",
    "gradient_boosting_regressor": "sklearn.ensemble.HistGradientBoostingRegressor",
}
DEFAULT_MODEL = {
    "binary": {
        "name": "hgb",
        "estimator": "gradient_boosting",
        "params": {"class_weight": "balanced", "max_iter": 200},
    },
    "regression": {"name": "ridge", "estimator": "ridge", "params": {"alpha": 1.0}},
}


class ModelSpecError(UserError, ValueError):
    """A params file or model spec names an unknown estimator or bad hyper-parameters."""


class ModelSpec(BaseModel):
    """One candidate model: an estimator and its hyper-parameters (a params YAML holds one or a list)."""

    name: str = "model"
    estimator: str
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def class_path(self) -> str:
        return ESTIMATORS.get(self.estimator, self.estimator)

    def params_hash(self) -> str:
        blob = json.dumps({"estimator": self.class_path, "params": self.params}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_model_spec(task: str) -> ModelSpec:
    return ModelSpec.model_validate(DEFAULT_MODEL[task])


def load_model_specs(path: str | Path | None, task: str) -> list[ModelSpec]:
    """Read a params YAML: either one spec (`estimator`, `params`) or `candidates: [...]` of them."""
    if path is None:
        return [default_model_spec(task)]
    p = Path(path)
    if not p.is_file():
        raise ModelSpecError(f"params file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ModelSpecError(f"params file {p} is not valid YAML: {exc}") from exc
    if isinstance(raw, dict) and "candidates" in raw:
        return model_specs_from(raw["candidates"], task, f"params file {p}")
    return model_specs_from([raw], task, f"params file {p}")


def model_specs_from(items: Any, task: str, where: str = "candidates") -> list[ModelSpec]:
    """Validate a list of candidate specs (from a params file or the flow's `candidates` parameter).

    Each must name a scikit-learn estimator of the task's kind with parameters it accepts; a candidate without a
    name is named after its estimator; names must be unique (they name the MLflow runs).
    """
    if not isinstance(items, list) or not items:
        raise ModelSpecError(f"{where}: 'candidates' must be a non-empty list")
    specs = []
    for i, item in enumerate(items):
        try:
            spec = item if isinstance(item, ModelSpec) else ModelSpec.model_validate(item)
        except ValidationError as exc:
            raise ModelSpecError(f"{where}, candidate {i}: {exc.errors()[0]['msg']}") from exc
        cls = resolve_estimator(spec)  # fail early on unknown estimators or parameters
        kind, noun = (ClassifierMixin, "classifier") if task == "binary" else (RegressorMixin, "regressor")
        if not issubclass(cls, kind):
            raise ModelSpecError(f"{where}, candidate {i}: {cls.__name__} is not a {noun} (task '{task}')")
        if len(items) > 1 and "name" not in spec.model_fields_set:
            spec = spec.model_copy(update={"name": spec.estimator.rpartition(".")[2]})
        specs.append(spec)
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelSpecError(f"{where}: candidate names must be unique, repeated: {dupes}")
    return specs


def resolve_model_specs(params_path: str | Path | None, candidates: list[Any] | None, task: str) -> list[ModelSpec]:
    """The candidates of a training run: the flow's `candidates` parameter, else the params file, else the
    task's default model."""
    if candidates is not None and params_path is not None:
        raise ModelSpecError("give either a params file or a candidates list, not both")
    if candidates is not None:
        return model_specs_from(list(candidates), task, "candidates parameter")
    return load_model_specs(params_path, task)


def selection_metric(task: str, configured: str | None = None) -> str:
    """The holdout metric that picks the best candidate: the configured one, else F1 (binary) / RMSE (regression)."""
    known = CLASSIFICATION_METRICS if task == "binary" else REGRESSION_METRICS
    metric = (configured or primary_metric(task)).strip().lower()
    if metric not in known:
        raise ModelSpecError(f"candidate metric '{metric}' is not a {task} metric: use one of {sorted(known)}")
    return metric


def candidate_set_hash(specs: Sequence[ModelSpec], metric: str) -> str:
    """The lineage `params_hash` of a training run. One candidate: its own hash (single-model files keep theirs).
    Several: the set of their hashes (order and names do not matter) and the metric that picks the winner."""
    if len(specs) == 1:
        return specs[0].params_hash()
    blob = json.dumps({"candidates": sorted(s.params_hash() for s in specs), "metric": metric}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_estimator(spec: ModelSpec) -> type:
    path = spec.class_path
    if not path.startswith("sklearn."):
        known = ", ".join(sorted(ESTIMATORS))
        raise ModelSpecError(f"unknown estimator '{spec.estimator}': use one of {known} or a sklearn.* class path")
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"estimator '{path}' cannot be imported: {exc}") from exc
    if not (inspect.isclass(cls) and issubclass(cls, BaseEstimator)):
        raise ModelSpecError(f"'{path}' is not a scikit-learn estimator class")
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(spec.params) - accepted)
    if unknown:
        raise ModelSpecError(f"estimator {name} has no parameter(s) {unknown}")
    return cls


def build_pipeline(spec: DatasetSpec, model: ModelSpec, seed: int) -> Pipeline:
    """Preprocessing for numeric and categorical columns followed by the configured estimator, seeded."""
    cls = resolve_estimator(model)
    params = dict(model.params)
    if "random_state" in inspect.signature(cls).parameters:
        params.setdefault("random_state", seed)
    transformers = []
    if spec.numeric:
        numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
        transformers.append(("numeric", numeric, spec.numeric))
    if spec.categorical:
        categorical = Pipeline(
            [
                ("impute", SimpleImputer(strategy="constant", fill_value="missing")),
                ("onehot", OneHotEncoder(handle_unknown="ignore", min_frequency=5, sparse_output=False)),
            ]
        )
        transformers.append(("categorical", categorical, spec.categorical))
    pre = ColumnTransformer(transformers, remainder="drop")
    return Pipeline([("preprocess", pre), ("model", cls(**params))])


def feature_frame(df: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The model's input columns with stable dtypes: numeric as float64, categorical as str."""
    X = pd.DataFrame(index=df.index)
    for col in spec.numeric:
        X[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in spec.categorical:
        X[col] = df[col].astype("string").fillna("missing").astype(str)
    return X


def target_series(df: pd.DataFrame, spec: DatasetSpec) -> pd.Series:
    y = df[spec.target]
    return pd.to_numeric(y).astype("float64") if spec.task == "regression" else y


def positive_label(y: pd.Series, spec: DatasetSpec) -> Any:
    """The positive class as it appears in the data (a YAML `1` matches an int 1 or a string '1')."""
    for value in pd.unique(y):
        if value == spec.positive_class or str(value) == str(spec.positive_class):
            return value.item() if hasattr(value, "item") else value
    return spec.positive_class


@dataclass
class Split:
    X_train: pd.DataFrame
    X_test: pd.DataFrame
    y_train: pd.Series
    y_test: pd.Series


def split_dataset(df: pd.DataFrame, spec: DatasetSpec, *, test_size: float = 0.2, seed: int = 42) -> Split:
    """A seeded holdout split, stratified on the target for classification."""
    X, y = feature_frame(df, spec), target_series(df, spec)
    stratify = y if spec.task == "binary" else None
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=stratify)
    return Split(X_train, X_test, y_train, y_test)


def train_model(split: Split, spec: DatasetSpec, model: ModelSpec, seed: int) -> Pipeline:
    pipeline = build_pipeline(spec, model, seed)
    pipeline.fit(split.X_train, split.y_train)
    return pipeline


# --------------------------------------------------------------------------------------------------- tasks
def _fit_cache_key(context, parameters) -> str:
    """Same data, same spec, same estimator+params, same seed and same code → same model: skip training."""
    from flywheel.tasks.registry import code_version

    spec_key = hashlib.sha256(parameters["spec"].model_dump_json().encode()).hexdigest()[:12]
    return "fit-" + "-".join(
        [parameters["data_key"], spec_key, parameters["model"].params_hash(), str(parameters["seed"]), code_version()]
    )


@task(name="split-dataset", cache_policy=NO_CACHE)
def split(df: pd.DataFrame, spec: DatasetSpec, seed: int = 42) -> Split:
    return split_dataset(df, spec, seed=seed)


@task(name="train-model", cache_key_fn=_fit_cache_key, cache_expiration=timedelta(days=7), persist_result=True)
def fit(split: Split, spec: DatasetSpec, model: ModelSpec, seed: int, data_key: str) -> Pipeline:
    return train_model(split, spec, model, seed)
