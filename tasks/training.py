"""Training: the preprocessing and pipeline around what a model spec builds, the features, the holdout split.

How a model spec is read, checked and built is in `model_specs`; candidates competing on a task runner are in
`candidates`; the plan and result of one training run in `training_run`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from flywheel.core.spec import DatasetSpec
from flywheel.tasks.model_specs import ModelSpec, build_estimator


def preprocessor(spec: DatasetSpec) -> ColumnTransformer:
    """Numeric columns median-imputed and scaled, categorical ones imputed and one-hot encoded; the rest dropped."""
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
    return ColumnTransformer(transformers, remainder="drop")


def build_pipeline(spec: DatasetSpec, model: ModelSpec, seed: int) -> Pipeline:
    """The preprocessing followed by the configured estimator, seeded (`build_estimator`). A factory's estimator
    goes behind the same preprocessing; a factory's Pipeline is used as it is (it gets the spec's feature columns
    as `feature_frame` makes them)."""
    built = build_estimator(model, spec, seed)
    if model.factory is not None and isinstance(built, Pipeline):
        return built
    return Pipeline([("preprocess", preprocessor(spec)), ("model", built)])


# --------------------------------------------------------------------------------------------------- features
# A user's raw rows reach a served model as they are: int64 or float columns (an integer column with a missing
# value arrives as float), None, NaN or pandas' NA for a missing value, numbers in a categorical column. The logged
# model starts with `raw_input_step`, which turns them into the features as `feature_frame` made them for training.
# It is built from scikit-learn, NumPy and pandas callables only, so the model loads wherever MLflow installs its
# pinned requirements (a serving image holds no Flywheel).
MISSING = "missing"


def numbers_coded(df: pd.DataFrame, spec: DatasetSpec) -> list[str]:
    """The categorical columns that hold numbers in this table (codes such as a year or a zip code): their values
    are read as numbers before they become labels, so 2007, 2007.0 and "2007" are one category."""
    return [
        c for c in spec.categorical
        if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
    ]  # fmt: skip


def _as(dtype: str) -> FunctionTransformer:
    return FunctionTransformer(np.asarray, kw_args={"dtype": dtype}, feature_names_out="one-to-one")


def _na_to(fill: str) -> SimpleImputer:
    # missing_values=pd.NA: scikit-learn then treats None, NaN and pd.NA alike (pandas' isna). A text fill keeps
    # the column's feature name ("NaN" reads back as a float NaN).
    return SimpleImputer(missing_values=pd.NA, strategy="constant", fill_value=fill, keep_empty_features=True)


def raw_input_step(spec: DatasetSpec, coded: Sequence[str] = ()) -> ColumnTransformer:
    """Raw rows → the model's features, as a DataFrame of the numeric, then the number-coded categorical, then the
    other categorical columns: numbers as float64 with NaN for missing; categories as text, 'missing' for a
    missing label and 'nan' for a missing code. Extra columns are dropped."""
    chosen = set(coded)
    coded = [c for c in spec.categorical if c in chosen]
    labels = [c for c in spec.categorical if c not in chosen]
    blocks = []
    if spec.numeric:
        blocks.append(("numeric", make_pipeline(_as("object"), _na_to("NaN"), _as("float64")), list(spec.numeric)))
    if coded:
        codes = make_pipeline(_as("object"), _na_to("NaN"), _as("float64"), _as("str"), _as("object"))
        blocks.append(("codes", codes, coded))
    if labels:
        blocks.append(("labels", make_pipeline(_as("object"), _na_to(MISSING), _as("str"), _as("object")), labels))
    step = ColumnTransformer(blocks, remainder="drop", verbose_feature_names_out=False).set_output(transform="pandas")
    for _, block, _ in step.transformers:
        for _, inner in block.steps[:-1]:  # only each block's last step builds a frame (the others cost ~1 ms a row)
            inner.set_output(transform="default")
    return step


def feature_frame(df: pd.DataFrame, spec: DatasetSpec, coded: Sequence[str] | None = None) -> pd.DataFrame:
    """The model's input columns with stable dtypes, in `raw_input_step`'s order: numeric as float64 (values that are
    not numbers as NaN), categorical as text exactly as the logged model's first step makes them from raw rows."""
    coded = numbers_coded(df, spec) if coded is None else list(coded)
    X = pd.DataFrame(index=df.index)
    for col in spec.numeric:
        X[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    categorical = raw_input_step(spec.model_copy(update={"numeric": []}), coded)
    if spec.categorical:
        text = categorical.fit_transform(df[spec.categorical])
        for col in text.columns:
            X[col] = text[col].to_numpy()
    return X


def servable_model(model: Any, df: pd.DataFrame, spec: DatasetSpec) -> Pipeline:
    """The fitted model behind `raw_input_step` (fitted on the training table's feature columns): what is logged,
    so the registered model takes a user's raw rows, in process and over HTTP."""
    step = raw_input_step(spec, numbers_coded(df, spec)).fit(df[spec.features])
    if isinstance(model, Pipeline) and "raw_input" not in model.named_steps:
        return Pipeline([("raw_input", step), *model.steps])
    return Pipeline([("raw_input", step), ("model", model)])


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
    """A seeded holdout split, stratified on the target for classification (unless a class has a single row)."""
    X, y = feature_frame(df, spec), target_series(df, spec)
    stratify = y if spec.task != "regression" and y.value_counts().min() >= 2 else None
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=stratify)
    return Split(X_train, X_test, y_train, y_test)


def train_model(split: Split, spec: DatasetSpec, model: ModelSpec, seed: int) -> Pipeline:
    pipeline = build_pipeline(spec, model, seed)
    pipeline.fit(split.X_train, split.y_train)
    return pipeline


# --------------------------------------------------------------------------------------------------- tasks
def _fit_cache_key(context, parameters) -> str:
    """Same data, same spec, same estimator+params, same seed and same code (Flywheel's and the user's code the
    model runs) → same model: skip training."""
    from flywheel.tasks.registry import code_version

    model = parameters["model"]
    spec_key = hashlib.sha256(parameters["spec"].model_dump_json().encode()).hexdigest()[:12]
    return "fit-" + "-".join(
        [parameters["data_key"], spec_key, model.params_hash(), str(parameters["seed"]), code_version([model])]
    )


@task(name="split-dataset", cache_policy=NO_CACHE)
def split(df: pd.DataFrame, spec: DatasetSpec, seed: int = 42) -> Split:
    from flywheel.tasks.evaluation import time_holdout_split  # the latest period for event-time data

    return time_holdout_split(df, spec) or split_dataset(df, spec, seed=seed)


@task(name="train-model", cache_key_fn=_fit_cache_key, cache_expiration=timedelta(days=7), persist_result=True)
def fit(split: Split, spec: DatasetSpec, model: ModelSpec, seed: int, data_key: str) -> Pipeline:
    return train_model(split, spec, model, seed)
