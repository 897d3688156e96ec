"""Model specs: how a candidate (an estimator and its hyper-parameters, or a factory) is read from a params file or the
flow's `candidates` parameter, checked before any training, and built into an estimator.

The pipeline around what a spec builds, the features and the holdout split are in `training`."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator
from sklearn.base import is_classifier, is_regressor

from flywheel.core.errors import UserError
from flywheel.core.spec import DatasetSpec
from flywheel.tasks.evaluation import primary_metric
from flywheel.tasks.user_code import UserCode, UserCodeError, import_user_module

CLASSIFICATION_METRICS = frozenset({"accuracy", "precision", "recall", "f1", "roc_auc"})
MULTICLASS_METRICS = frozenset({"accuracy", "f1_macro", "f1_weighted", "roc_auc_ovr"})
REGRESSION_METRICS = frozenset({"rmse", "mae", "r2"})
TASK_METRICS = {"binary": CLASSIFICATION_METRICS, "multiclass": MULTICLASS_METRICS, "regression": REGRESSION_METRICS}

# Short names for the estimators people reach for first; any class path of an estimator with scikit-learn's API
# importable here works too (`lightgbm.LGBMClassifier`, `xgboost.XGBRegressor` with `pip install flywheel[boosting]`).
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
    "multiclass": {
        "name": "hgb",
        "estimator": "gradient_boosting",
        "params": {"class_weight": "balanced", "max_iter": 200},
    },
    "regression": {"name": "ridge", "estimator": "ridge", "params": {"alpha": 1.0}},
}


class ModelSpecError(UserError, ValueError):
    """A params file or model spec names an unknown estimator or bad hyper-parameters."""


class ModelSpec(BaseModel):
    """One candidate model (a params YAML holds one or a list): an estimator (short name or class path) and its
    hyper-parameters, or a factory (`package.module:function`) called with the dataset spec and `params` that
    returns an estimator or a whole pipeline."""

    name: str = "model"
    estimator: str | None = None
    factory: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    # Where the estimator's or factory's module is looked for before sys.path: the params file's directory.
    _source_dir: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_model(self) -> ModelSpec:
        if (self.estimator is None) == (self.factory is None):
            raise ValueError(
                "give either 'estimator' (a short name or a class path) or 'factory' (package.module:function)"
            )
        if self.factory is not None:
            module, colon, function = self.factory.partition(":")
            if not (colon and _dotted(module) and _dotted(function)):
                raise ValueError(f"factory '{self.factory}' must look like package.module:function")
        return self

    @property
    def class_path(self) -> str:
        """The estimator's class path, or the factory's `module:function`."""
        if self.factory is not None:
            return self.factory
        return ESTIMATORS.get(self.estimator, self.estimator)

    @property
    def source_dir(self) -> str | None:
        return self._source_dir

    def looked_up_in(self, directory: str | Path | None) -> ModelSpec:
        """A copy whose module is looked for in `directory` first (absolute), then on sys.path."""
        spec = self.model_copy()
        spec._source_dir = str(Path(directory).resolve()) if directory is not None else None
        return spec

    def params_hash(self) -> str:
        model = {"factory": self.factory} if self.factory is not None else {"estimator": self.class_path}
        blob = json.dumps({**model, "params": self.params}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def user_code(self) -> UserCode:
        """Where the estimator class or factory comes from: the user's files (logged with the model and hashed into
        its code version) or installed distributions (pinned requirements)."""
        module = self.factory.partition(":")[0] if self.factory is not None else self.class_path.rpartition(".")[0]
        return _import(module, self.source_dir)[1]


def _factory_name(ref: str) -> str:
    """An unnamed factory candidate's name: its module's last part and its function (`features.churn_model`)."""
    module, _, function = ref.partition(":")
    return f"{module.rpartition('.')[2]}.{function}"


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _import(module: str, source_dir: str | None):
    try:
        return import_user_module(module, source_dir)
    except UserCodeError as exc:
        raise ModelSpecError(str(exc)) from exc


def default_model_spec(task: str) -> ModelSpec:
    return ModelSpec.model_validate(DEFAULT_MODEL[task])


def load_model_specs(path: str | Path | None, task: str, *, dataset: DatasetSpec | None = None) -> list[ModelSpec]:
    """Read a params YAML: either one spec (`estimator` or `factory`, `params`) or `candidates: [...]` of them.
    Their modules are looked for in the file's directory first, then on sys.path."""
    if path is None:
        return [default_model_spec(task)]
    p = Path(path)
    if not p.is_file():
        raise ModelSpecError(f"params file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ModelSpecError(f"params file {p} is not valid YAML: {exc}") from exc
    items = raw["candidates"] if isinstance(raw, dict) and "candidates" in raw else [raw]
    return model_specs_from(items, task, f"params file {p}", source_dir=p.parent, dataset=dataset)


def model_specs_from(
    items: Any,
    task: str,
    where: str = "candidates",
    *,
    source_dir: str | Path | None = None,
    dataset: DatasetSpec | None = None,
) -> list[ModelSpec]:
    """Validate a list of candidate specs (from a params file or the flow's `candidates` parameter).

    Each must name an estimator of the task's kind (a regressor for regression, else a classifier) with parameters
    it accepts, or a factory; with `dataset`, each factory is called on it and what it returns is checked the same
    way, so a factory that fails does so here, before any training (`check_model_spec`). Modules are looked for in
    `source_dir` first, then on sys.path. A candidate without a name is named after its estimator or factory; names
    must be unique (they name the MLflow runs).
    """
    if not isinstance(items, list) or not items:
        raise ModelSpecError(f"{where}: 'candidates' must be a non-empty list")
    specs = []
    for i, item in enumerate(items):
        try:
            spec = item if isinstance(item, ModelSpec) else ModelSpec.model_validate(item)
        except ValidationError as exc:
            raise ModelSpecError(f"{where}, candidate {i}: {exc.errors()[0]['msg']}") from exc
        if source_dir is not None and spec.source_dir is None:
            spec = spec.looked_up_in(source_dir)
        try:
            check_model_spec(spec, task, dataset)
        except ModelSpecError as exc:
            raise ModelSpecError(f"{where}, candidate {i}: {exc}") from exc
        if len(items) > 1 and "name" not in spec.model_fields_set:
            short = spec.estimator.rpartition(".")[2] if spec.factory is None else _factory_name(spec.factory)
            spec = spec.model_copy(update={"name": short})
        specs.append(spec)
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelSpecError(f"{where}: candidate names must be unique, repeated: {dupes}")
    return specs


def resolve_model_specs(
    params_path: str | Path | None,
    candidates: list[Any] | None,
    task: str,
    *,
    dataset: DatasetSpec | None = None,
) -> list[ModelSpec]:
    """The candidates of a training run: the flow's `candidates` parameter (modules looked for in the working
    directory, then on sys.path), else the params file, else the task's default model. With `dataset`, factories
    are called on it to check what they build."""
    if candidates is not None and params_path is not None:
        raise ModelSpecError("give either a params file or a candidates list, not both")
    if candidates is not None:
        return model_specs_from(list(candidates), task, "candidates parameter", source_dir=Path.cwd(), dataset=dataset)
    return load_model_specs(params_path, task, dataset=dataset)


def selection_metric(task: str, configured: str | None = None) -> str:
    """The holdout metric that picks the best candidate: the configured one, else the task's primary metric (F1 for
    binary, macro F1 for multiclass, RMSE for regression)."""
    known = TASK_METRICS[task]
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


def check_model_spec(model: ModelSpec, task: str, dataset: DatasetSpec | None = None) -> None:
    """Fail early, with ModelSpecError, on a model that cannot train for `task`: an estimator that is unknown, not
    importable, not of the task's kind or not taking its parameters; a factory that cannot be imported or called
    with its parameters, or, called on `dataset` when given, raises or returns no estimator of the task's kind."""
    if model.factory is not None:
        if dataset is None:
            resolve_factory(model)
        else:
            model_from_factory(dataset, model)
        return
    cls = resolve_estimator(model)
    _check_kind(_instantiate(cls, model.params), task, cls.__name__)


def resolve_estimator(spec: ModelSpec) -> type:
    """The estimator class a spec names (a short name or a class path, its module looked for in the spec's
    directory, then on sys.path), checked to have scikit-learn's API and to take the spec's parameters."""
    if spec.factory is not None:
        raise ModelSpecError(f"'{spec.factory}' is a factory, not an estimator class")
    path = spec.class_path
    module, _, name = path.rpartition(".")
    if not module:
        known = ", ".join(sorted(ESTIMATORS))
        raise ModelSpecError(
            f"unknown estimator '{spec.estimator}': use one of {known}, or the class path (package.module.Class) "
            "of an estimator with scikit-learn's API"
        )
    try:
        mod = _import(module, spec.source_dir)[0]
    except ModelSpecError as exc:
        raise ModelSpecError(f"estimator '{path}' cannot be imported: {exc}") from exc
    cls = getattr(mod, name, None)
    if cls is None:
        raise ModelSpecError(f"estimator '{path}' cannot be imported: {module} has no '{name}'{_hint(name, dir(mod))}")
    if not (inspect.isclass(cls) and _has_estimator_api(cls)):
        raise ModelSpecError(f"'{path}' is not a scikit-learn estimator class (with fit, predict and get_params)")
    _check_params(cls, spec.params)
    return cls


def _has_estimator_api(obj: Any) -> bool:
    return all(callable(getattr(obj, method, None)) for method in ("fit", "predict", "get_params"))


def _hint(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _param_names(cls: type) -> tuple[set[str], bool]:
    """An estimator's parameter names (its __init__'s, and its default instance's get_params() keys) and whether
    its __init__ takes **kwargs."""
    parameters = inspect.signature(cls).parameters.values()
    names = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        names |= set(cls().get_params())
    except Exception:  # an estimator without defaults for every parameter: its signature says enough
        pass
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _check_params(cls: type, params: dict[str, Any]) -> None:
    """Refuse parameters the estimator does not take. One whose __init__ takes **kwargs (LightGBM, XGBoost) passes
    the library's own parameters through (`max_bin`, `min_data_in_leaf`), so only a near miss of a known name is
    refused there: a typo (`n_estimator`)."""
    known, takes_kwargs = _param_names(cls)
    unknown = sorted(set(params) - known)
    if not takes_kwargs and unknown:
        hints = "".join(_hint(k, known) for k in unknown)
        raise ModelSpecError(f"estimator {cls.__name__} has no parameter(s) {unknown}{hints}")
    typos = {k: close[0] for k in unknown if (close := difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.85))}
    if typos:
        said = ", ".join(f"'{k}' (did you mean '{v}'?)" for k, v in typos.items())
        raise ModelSpecError(f"estimator {cls.__name__}: parameter(s) {said} look like typos of its own")


def _instantiate(cls: type, params: dict[str, Any]) -> Any:
    try:
        return cls(**params)
    except Exception as exc:
        raise ModelSpecError(f"{cls.__name__}(**{params}) fails: {type(exc).__name__}: {exc}") from exc


def _check_kind(estimator: Any, task: str, what: str) -> None:
    """A regressor for regression, else (binary, multiclass) a classifier: by scikit-learn's estimator tags, which
    LightGBM and XGBoost set too, and which a Pipeline takes from its last step."""
    is_kind, noun = (is_regressor, "regressor") if task == "regression" else (is_classifier, "classifier")
    try:
        ok = is_kind(estimator)
    except (AttributeError, TypeError):  # no scikit-learn tags at all
        ok = False
    if not ok:
        raise ModelSpecError(f"{what} is not a {noun} (task '{task}')")


def resolve_factory(model: ModelSpec) -> Callable[..., Any]:
    """The factory function a spec names (`package.module:function`), checked to be callable with the dataset spec
    and the spec's params as keyword arguments."""
    ref = model.factory
    module, _, attr = ref.partition(":")
    try:
        found: Any = _import(module, model.source_dir)[0]
    except ModelSpecError as exc:
        raise ModelSpecError(f"factory '{ref}' cannot be imported: {exc}") from exc
    for part in attr.split("."):
        parent, found = found, getattr(found, part, None)
        if found is None:
            raise ModelSpecError(f"factory '{ref}': {module} has no '{attr}'{_hint(part, dir(parent))}")
    if not callable(found):
        raise ModelSpecError(f"factory '{ref}' is not a function: it is a {type(found).__name__}")
    try:
        inspect.signature(found).bind(None, **model.params)
    except TypeError as exc:
        raise ModelSpecError(
            f"factory '{ref}' cannot be called as {attr}(dataset_spec, **params) with params {sorted(model.params)}: "
            f"{exc}"
        ) from exc
    except ValueError:  # no signature to check (a builtin): calling it will tell
        pass
    return found


def model_from_factory(dataset: DatasetSpec, model: ModelSpec) -> Any:
    """What a factory builds, called with (a copy of) the dataset spec and the spec's params: an estimator with
    scikit-learn's API (fit, predict, get_params) or a Pipeline, of the task's kind."""
    factory = resolve_factory(model)
    try:
        built = factory(dataset.model_copy(deep=True), **model.params)
    except Exception as exc:
        raise ModelSpecError(f"factory '{model.factory}' raised {type(exc).__name__}: {exc}") from exc
    if inspect.isclass(built) or not _has_estimator_api(built):
        what = f"the class {built.__name__} (not an instance)" if inspect.isclass(built) else type(built).__name__
        raise ModelSpecError(
            f"factory '{model.factory}' returned {what}: it must return an estimator or a Pipeline "
            "(with fit, predict and get_params)"
        )
    _check_kind(built, dataset.task, f"what factory '{model.factory}' returned ({type(built).__name__})")
    return built


def build_estimator(model: ModelSpec, dataset: DatasetSpec, seed: int) -> Any:
    """What a spec builds, seeded: its estimator class instantiated with its params (`random_state` set to `seed`
    where the estimator takes one and the spec gives none), or what its factory returns (an estimator or a
    Pipeline) with every `random_state` left unset in it seeded."""
    if model.factory is not None:
        return _seed_unset(model_from_factory(dataset, model), seed)
    cls = resolve_estimator(model)
    params = dict(model.params)
    if "random_state" in _param_names(cls)[0]:
        params.setdefault("random_state", seed)
    return _instantiate(cls, params)


def _seed_unset(estimator: Any, seed: int) -> Any:
    unset = {
        key: seed
        for key, value in estimator.get_params(deep=True).items()
        if (key == "random_state" or key.endswith("__random_state")) and value is None
    }
    return estimator.set_params(**unset) if unset else estimator
