"""The plan a compiled version serves by, its verdict, and the constants both halves share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

COMPILED_DIR = "compiled"
ONNX_FILE = "model.onnx"
META_FILE = "compiled.json"
ONNX_ARTIFACT = f"{COMPILED_DIR}/{ONNX_FILE}"
META_ARTIFACT = f"{COMPILED_DIR}/{META_FILE}"
TAG_COMPILED = "compiled"  # version tag: the verdict ("yes (…)", "no (…)", "off (…)")
FORMAT_VERSION = 1

ENGINE_COMPILED = "onnxruntime"
ENGINE_PYFUNC = "pyfunc"

PARITY_ROWS = 5_000  # held-out rows the compiled model must agree on
WIDE_ROWS = 2_048  # batches at least this big are split over a thread per core (ORT releases the GIL)
NAN_PROBE_ROWS = 20  # rows per numeric column sent with that column missing (what a pipeline does with nulls)
PROBA_TOLERANCE = 1e-5
REGRESSION_RTOL = 1e-6
REGRESSION_ATOL = 1e-12
MARGIN_SAFETY = 10.0  # label margin = this × the largest gap error parity saw (the gap moves by ≤ 2 max|Δp|)
MIN_MARGIN = 1e-6

# Classifiers whose `predict` is `classes_[argmax(predict_proba)]`: their labels come from the compiled
# probabilities (with the margin guard); any other classifier's from the compiled label output.
ARGMAX_PROBA_CLASSIFIERS = frozenset(
    {
        "HistGradientBoostingClassifier",
        "GradientBoostingClassifier",
        "RandomForestClassifier",
        "ExtraTreesClassifier",
        "DecisionTreeClassifier",
        "LogisticRegression",
        "GaussianNB",
    }
)
SUPPORTED_PREDICT_FNS = ("predict", "predict_proba")

_NONE = type(None)
# signature type → the dtype MLflow's schema cast gives its values ("any": MLflow passes the values as they are)
_NUMPY_DTYPE = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32", "string": "object",
                "boolean": "bool", "any": "object"}  # fmt: skip
_SIMPLE = (int, float, str, bool, _NONE)


# --------------------------------------------------------------------------------------------------- the plan
@dataclass
class ColumnPlan:
    """One signature column: how its JSON values become (part of) an ONNX input."""

    name: str
    kind: str  # the signature's type: double, float, long, integer, string, boolean, or any (untyped)
    required: bool = True
    feed: bool = True  # an input of the ONNX graph (False: the model ignores it; a typed one is still checked)
    dtype: str = "float64"  # the ONNX input's dtype (a coercion step's cast, if any, applied)
    nan_ok: bool = False  # null/NaN is served compiled in a number column (the pipeline takes it; checked)
    null_fill: str | None = None  # a text column's null is served as this label (what the coercion step makes)


@dataclass
class OutputPlan:
    kind: str  # label | proba | value
    names: list[str]  # ONNX outputs to fetch: [probabilities] or [label] or [value]
    label_from: str = "probabilities"  # label: probabilities | label
    classes: list | None = None
    classes_dtype: str | None = None
    margin: float = 0.0  # label from probabilities: rows whose top-two gap is below it are unsure
    ndim: int = 1  # value: 1 (one target) or 2


@dataclass
class InputGroup:
    """One ONNX input: a (rows × columns) matrix of one dtype (a Split in the graph hands on its columns)."""

    name: str
    dtype: str
    columns: list[str]


@dataclass
class Plan:
    """What the compiled model takes and gives; stored as `compiled/compiled.json` with the parity result."""

    columns: list[ColumnPlan]
    inputs: list[InputGroup]
    output: OutputPlan
    strategy: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        data["columns"] = [ColumnPlan(**c) for c in data["columns"]]
        data["inputs"] = [InputGroup(**g) for g in data["inputs"]]
        data["output"] = OutputPlan(**data["output"])
        return cls(**data)


@dataclass
class Verdict:
    """The outcome of compiling a version: `ok` → it may serve compiled; `reason` is said in the ledger, the
    version's `compiled` tag and the model server's /version."""

    ok: bool
    reason: str
    plan: Plan | None = None
    onnx: bytes | None = field(default=None, repr=False)
    parity: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def engine(self) -> str:
        return ENGINE_COMPILED if self.ok else ENGINE_PYFUNC

    @classmethod
    def refused(cls, why: str, parity: dict | None = None) -> Verdict:
        return cls(False, f"compiled: no ({why})", parity=parity or {})


class CompileRefused(Exception):
    """The version cannot serve compiled; the message says why (it becomes "compiled: no (<message>)")."""


# --------------------------------------------------------------------------------------------------- helpers
def schema_enforced(frame: Any, schema: Any) -> Any:
    """The frame as pyfunc hands it to the model (MLflow's schema enforcement: the signature's columns, in order)."""
    from mlflow.models.utils import _enforce_schema

    return _enforce_schema(frame, schema)


def is_classifier(model: Any) -> bool:
    from sklearn.base import is_classifier

    return bool(is_classifier(model))


def final_estimator(model: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return model.steps[-1][1] if isinstance(model, Pipeline) else model


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text
    return text if len(text) <= limit else text[: limit - 1] + "…"
