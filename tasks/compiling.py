"""Compiling: a registered scikit-learn version converted to ONNX, checked for parity, kept with its run.

`compile_version` (called when a version is packaged) loads the version as `mlflow.pyfunc` does, converts the
scikit-learn pipeline with skl2onnx, and runs both on the version's own held-out sample (or the champion's when the
version has none), sent through the same JSON → inputs codec the model server uses. The compiled form may serve only
when every label is identical (regression: within 1e-6 relative; probabilities within 1e-5). The result — always —
is written to the version's run (`compiled/compiled.json`, with `compiled/model.onnx` when it passed) and tagged on
the version (`compiled`), so every model server that loads the version reads the same verdict; when it failed, the
version serves through pyfunc and the reason says why (e.g. "compiled: no (2 of 5000 labels differ)").

The runtime half, `CompiledModel`, is what the model server predicts with: it turns a parsed JSON body straight into
the ONNX inputs (no DataFrame; one input matrix per dtype) for the plain, unambiguous cases — every schema column
present, each value of the type its column takes (`double` or a number column: int or float; `long`: int; `string`:
str; a null where the pipeline takes one) — and answers None for anything else, which the server then scores
through MLflow's own parsing and pyfunc, so errors and odd inputs get exactly MLflow's answers. A leading step that
only coerces raw inputs (numbers to float64, labels kept, a null to NaN or to one label — the train flow's raw-input
step) is not converted: it is checked on the held-out rows and on probe values, and applied by the codec. Labels of
classifiers whose `predict` is the argmax of `predict_proba` are taken from the compiled probabilities; rows whose
top two probabilities are closer than the model's margin (20× the largest difference parity saw) are marked unsure
and scored by pyfunc, so float32 rounding never flips a label near the boundary.

Precision: skl2onnx writes tree thresholds, leaf values and baselines as float32, and onnxruntime then compares in
float32. The plan keeps the preprocessing in float64, exactly as scikit-learn computes it (imputing, scaling); a
HistGradientBoosting model gets its own float64 thresholds, leaves and baseline back (`*_as_tensor`, ai.onnx.ml 3),
any other tree model its features rounded to float32 at its input. Measured on the flights model: the all-float32
graph flips ~1 label in 800, float32 trees on float64 features 1 in 100,000 (a value two ulps from a threshold),
this plan none.

Nothing here imports skl2onnx, scikit-learn, MLflow or Prefect at module level: the model server imports this
module for `CompiledModel`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


# --------------------------------------------------------------------------------------------------- runtime
@dataclass
class Encoded:
    """A request's rows as ONNX inputs, and what the request log keeps of them."""

    feeds: dict[str, np.ndarray]
    n: int
    log: Any


class InputCodec:
    """A request's JSON values → the compiled model's inputs, by the plan (see `encode`)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.columns = plan.columns
        self._groups = [(g.name, list(g.columns)) for g in plan.inputs]
        self._rules = {c.name: _Rule.of(c) for c in plan.columns}
        checked = [c for c in plan.columns if self._rules[c.name].source != "anything"]
        self._double_block = [c for c in checked if self._rules[c.name].source == "number" and c.dtype == "float64"]
        self._string_block = [c for c in checked if self._rules[c.name].source == "text" and c.dtype == "object"]
        blocked = {c.name for c in self._double_block + self._string_block}
        self._other_columns = [c for c in checked if c.name not in blocked]

    # ------------------------------------------------------------------ JSON → inputs
    def encode(self, fmt: str, value: Any) -> Encoded | None:
        """The ONNX inputs for one input-format value of a JSON body, or None when the request is not a plain,
        unambiguous one (then MLflow's own parsing scores it, with its own answers and errors)."""
        if fmt == "dataframe_split":
            got = self._split(value)
        elif fmt == "dataframe_records":
            got = self._records(value, strict_extras=False)
        elif fmt in ("instances", "inputs"):
            if isinstance(value, list):
                got = self._records(value, strict_extras=True)
            elif isinstance(value, dict):
                got = self._columnar(value)
            else:
                return None
        else:
            return None
        if got is None:
            return None
        values, n, log = got
        feeds = self._feeds(values, n)
        return None if feeds is None else Encoded(feeds, n, log)

    def _split(self, value: Any) -> tuple[dict, int, Any] | None:
        if type(value) is not dict or len(value) != 2 or "columns" not in value or "data" not in value:
            return None  # an "index" (or anything else) goes the long way
        columns, data = value["columns"], value["data"]
        if type(columns) is not list or type(data) is not list or not data:
            return None
        pos: dict[str, int] = {}
        for i, c in enumerate(columns):
            if type(c) is not str or c in pos:
                return None
            pos[c] = i
        width = len(columns)
        for row in data:
            if type(row) is not list or len(row) != width:
                return None
        values = {}
        transposed = None
        for col in self.columns:
            i = pos.get(col.name)
            if i is None:
                if col.required or col.feed:
                    return None
                continue
            if len(data) == 1:
                values[col.name] = [data[0][i]]
            else:
                if transposed is None:
                    transposed = list(zip(*data, strict=True))
                values[col.name] = transposed[i]
        return values, len(data), value

    def _records(self, records: Any, *, strict_extras: bool) -> tuple[dict, int, Any] | None:
        if not records:
            return None
        for r in records:
            if type(r) is not dict:
                return None
        if strict_extras:  # instances/inputs go through numpy per column: plain scalars and one key set only
            keys = records[0].keys()
            for r in records:
                if r.keys() != keys or not all(isinstance(v, _SIMPLE) for v in r.values()):
                    return None
        values = {}
        for col in self.columns:
            try:
                values[col.name] = [r[col.name] for r in records]
            except KeyError:
                if col.required or col.feed or any(col.name in r for r in records):
                    return None
        return values, len(records), records

    def _columnar(self, value: dict) -> tuple[dict, int, Any] | None:
        n = None
        for v in value.values():
            if type(v) is not list or not v or (n is not None and len(v) != n):
                return None
            n = len(v)
            if not all(isinstance(x, _SIMPLE) for x in v):
                return None
        if n is None:
            return None
        values = {}
        for col in self.columns:
            if col.name in value:
                values[col.name] = value[col.name]
            elif col.required or col.feed:
                return None
        names = [c for c in value]
        log = {"columns": names, "data": [list(row) for row in zip(*(value[c] for c in names), strict=True)]}
        return values, n, log

    def _feeds(self, values: dict, n: int) -> dict[str, np.ndarray] | None:
        arrays: dict[str, np.ndarray] = {}
        blocks: dict[tuple, np.ndarray] = {}  # (columns…) → their (columns × rows) array
        for block in (self._double_block, self._string_block):  # the common columns: one array per kind
            present = [c for c in block if c.name in values]
            if not present:
                continue
            got = _block_arrays(present, [self._rules[c.name] for c in present], values, arrays)
            if got is None:
                return None
            blocks[tuple(c.name for c in present)] = got
        for col in self._other_columns:
            raw = values.get(col.name)
            if raw is None:
                continue
            arr = _column_array(col, self._rules[col.name], raw)
            if arr is None:
                return None
            arrays[col.name] = arr
        feeds = {}
        for name, cols in self._groups:
            block = blocks.get(tuple(cols))
            if block is not None:
                feeds[name] = block.reshape(1, -1) if n == 1 else np.ascontiguousarray(block.T)
            elif len(cols) == 1:
                feeds[name] = arrays[cols[0]].reshape(n, 1)
            else:
                feeds[name] = np.stack([arrays[c] for c in cols], axis=1)
        return feeds

    @staticmethod
    def merge(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Inputs of several requests as one batch (row order kept)."""
        if len(feeds) == 1:
            return feeds[0]
        return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


class CompiledModel:
    """An ONNX Runtime session with its plan: JSON values in (`encode`), predictions of pyfunc's dtype and shape out
    (`predict`)."""

    def __init__(self, onnx_bytes: bytes, plan: Plan, threads: int | None = None) -> None:
        import os

        # One intra-op thread (its own threads made a 10,000-row batch 2× slower here); a big batch is cut into a
        # part per core instead, run side by side on the same session.
        self.session = _session(onnx_bytes, 1)
        self.threads = threads if threads is not None else (os.cpu_count() or 1)
        self._pool = None
        self.plan = plan
        self.codec = InputCodec(plan)
        self.encode = self.codec.encode
        self.merge = InputCodec.merge
        out = plan.output
        self._classes = np.array(out.classes, dtype=np.dtype(out.classes_dtype)) if out.classes is not None else None
        self._label_index = {_label_key(c): i for i, c in enumerate(out.classes)} if out.classes is not None else {}

    # ------------------------------------------------------------------ inputs → predictions
    def predict(self, feeds: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions as pyfunc gives them, rows that must be scored by pyfunc instead or None)."""
        out = self.plan.output
        results = self._run(out.names, feeds, n)
        if out.kind == "value":
            values = np.asarray(results[0], dtype=np.float64)
            return (values.reshape(n) if out.ndim == 1 else values.reshape(n, -1)), None
        if out.kind == "proba":
            return np.asarray(results[0], dtype=np.float64).reshape(n, -1), None
        if out.label_from == "label":
            labels = np.asarray(results[0]).reshape(n)
            try:
                idx = np.fromiter((self._label_index[_label_key(v)] for v in labels.tolist()), np.int64, n)
            except KeyError:
                return np.empty(0), np.ones(n, dtype=bool)
            return self._classes.take(idx), None
        proba = np.asarray(results[0]).reshape(n, -1)
        if n == 1:  # one row: plain Python is faster than numpy on a handful of numbers
            row = proba[0].tolist()
            best = max(range(len(row)), key=row.__getitem__)
            second = max((p for i, p in enumerate(row) if i != best), default=-math.inf)
            unsure = row[best] - second < out.margin
            return self._classes[best : best + 1], (np.ones(1, dtype=bool) if unsure else None)
        idx = proba.argmax(axis=1)
        if proba.shape[1] == 2:
            gap = np.abs(proba[:, 1].astype(np.float64) - proba[:, 0])
        else:
            top = np.partition(proba, -2, axis=1)
            gap = top[:, -1].astype(np.float64) - top[:, -2]
        unsure = gap < out.margin
        return self._classes.take(idx), (unsure if unsure.any() else None)

    def _run(self, names: list[str], feeds: dict[str, np.ndarray], n: int) -> list:
        parts = min(self.threads, n // (WIDE_ROWS // 2)) if n >= WIDE_ROWS else 1
        if parts <= 1:
            return self.session.run(names, feeds)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="flywheel-onnx")
        bounds = np.linspace(0, n, parts + 1).astype(int)
        chunks = [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        futures = [self._pool.submit(self.session.run, names, c) for c in chunks[1:]]
        first = self.session.run(names, chunks[0])
        results = [first] + [f.result() for f in futures]
        return [np.concatenate([r[i] for r in results]) for i in range(len(names))]


def _session(onnx_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _label_key(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return str(value)


@dataclass(frozen=True)
class _Rule:
    """Which JSON values of a column are served compiled, and how they become its ONNX input."""

    source: str  # number (int/float → float64), text (str), int, bool, anything (an untyped column the model ignores)
    types: frozenset
    bound: int = 2**63  # |int| < bound (exactly representable where it goes)

    @classmethod
    def of(cls, col: ColumnPlan) -> _Rule:
        kind, dtype = col.kind, np.dtype(col.dtype)
        if kind in ("double", "float") or (kind == "any" and dtype.kind == "f"):
            types = {int, float} | ({_NONE} if col.nan_ok else set())
            return cls("number", frozenset(types), 2**24 if kind == "float" or dtype == np.float32 else 2**63)
        if kind == "string" or (kind == "any" and dtype.kind == "O" and col.feed):
            return cls("text", frozenset({str} | ({_NONE} if col.null_fill is not None else set())))
        if kind in ("long", "integer"):
            return cls("int", frozenset({int}), 2**63 if kind == "long" else 2**31)
        if kind == "boolean":
            return cls("bool", frozenset({bool}))
        return cls("anything", frozenset())


def _plain(rule: _Rule, values: Any) -> bool:
    """Whether every value is of a type served compiled for the column (ints within range)."""
    types = set(map(type, values))
    if not types <= rule.types:
        return False
    if int in types:
        bound = rule.bound
        for v in values:
            if type(v) is int and not -bound <= v < bound:
                return False
    return True


def _block_arrays(cols: list[ColumnPlan], rules: list[_Rule], values: dict, arrays: dict) -> np.ndarray | None:
    """float64 (or text) columns converted as one (columns × rows) array, each column a row of it; None when a
    value is not plain."""
    raws = [values[c.name] for c in cols]
    if len(raws[0]) == 1:  # one row: check the scalars themselves
        for rule, raw in zip(rules, raws, strict=True):
            v = raw[0]
            if type(v) not in rule.types or (type(v) is int and not -rule.bound <= v < rule.bound):
                return None
    else:
        for rule, raw in zip(rules, raws, strict=True):
            if not _plain(rule, raw):
                return None
    if rules[0].source == "number":
        try:
            block = np.array(raws, dtype=np.float64)  # None → NaN, as pandas makes of it
        except (TypeError, ValueError, OverflowError):
            return None
        if not np.isfinite(block).all():
            if np.isinf(block).any():
                return None
            for col, has_nan in zip(cols, np.isnan(block).any(axis=1), strict=True):
                if has_nan and not col.nan_ok:
                    return None
    else:
        block = np.array(raws, dtype=object)
        if block.ndim != 2:
            return None
        for j, col in enumerate(cols):
            if col.null_fill is not None and _NONE in set(map(type, raws[j])):
                block[j][block[j] == None] = col.null_fill  # noqa: E711 (elementwise)
    for j, col in enumerate(cols):
        arrays[col.name] = block[j]
    return block


def _column_array(col: ColumnPlan, rule: _Rule, values: Any) -> np.ndarray | None:
    """A column's JSON values as the array MLflow's schema cast (and the coercion step) make of them; None when a
    value is not of the plain kind served compiled (wrong type, out of range, a missing value where the pipeline
    refuses one)."""
    if not _plain(rule, values):
        return None
    try:
        if rule.source == "number":
            arr = np.array(values, dtype=np.float64)  # None → NaN, as pandas makes of it
            if not np.isfinite(arr).all():
                if not col.nan_ok or np.isinf(arr).any():
                    return None
            if col.kind == "float":
                arr = arr.astype(np.float32)  # MLflow's cast, before any coercion step's
        elif rule.source == "text":
            arr = np.array(values, dtype=object)
            if col.null_fill is not None:
                arr[arr == None] = col.null_fill  # noqa: E711 (elementwise)
        else:
            arr = np.array(values, dtype=_NUMPY_DTYPE[col.kind])
    except (TypeError, ValueError, OverflowError):
        return None
    target = np.dtype(col.dtype)
    return arr if arr.dtype == target else arr.astype(target)


# --------------------------------------------------------------------------------------------------- compiling
def compile_model(pyfunc_model: Any, sample: Any, *, sample_source: str) -> Verdict:
    """Convert a loaded pyfunc (scikit-learn flavor) model to ONNX and check parity on `sample` (a frame with at
    least the signature's columns). Never raises for a model that cannot be compiled: the verdict says why."""
    try:
        return _compile(pyfunc_model, sample, sample_source)
    except CompileRefused as exc:
        return Verdict.refused(str(exc))


def _compile(pyfunc_model: Any, sample: Any, sample_source: str) -> Verdict:
    meta = pyfunc_model.metadata
    pyfunc_conf = meta.flavors.get("python_function", {})
    if "sklearn" not in meta.flavors or pyfunc_conf.get("loader_module") != "mlflow.sklearn":
        raise CompileRefused("not a scikit-learn model")
    predict_fn = pyfunc_conf.get("predict_fn", "predict")
    if predict_fn not in SUPPORTED_PREDICT_FNS:
        raise CompileRefused(f"pyfunc predicts with {predict_fn!r}, which is not compiled")
    schema = meta.get_input_schema()
    columns = _signature_columns(schema)
    missing = [c.name for c in columns if c.name not in sample.columns]
    if missing:
        raise CompileRefused(f"{sample_source} lacks the signature's columns {missing}")
    model = pyfunc_model.get_raw_model()

    records, accepts_null, probe_of = _parity_records(pyfunc_model, schema, sample, columns)
    reference, frame = _reference(pyfunc_model, schema, records)
    enforced = _enforced(frame, schema)
    casts, order, rest = _split_coercion(model, enforced, columns, records, schema)
    for col in columns:
        if casts is not None:
            info = casts.get(col.name)
            col.feed = info is not None  # the coercion step drops the others: the model never sees them
            if info is not None:
                col.dtype, col.null_fill = info["dtype"], info.get("null_fill")
        number = col.kind in ("double", "float") or (col.kind == "any" and np.dtype(col.dtype).kind == "f")
        col.nan_ok = accepts_null.get(col.name, False) and number
        if col.null_fill is not None and not accepts_null.get(col.name, False):
            col.null_fill = None
    servable = {c.name: c.nan_ok or c.null_fill is not None or (not c.feed and c.kind == "any") for c in columns}
    keep = [i for i, r in enumerate(records) if all(v is not None or servable[k] for k, v in r.items())]
    if all(probe_of[i] is not None for i in keep):
        raise CompileRefused("no held-out row fits the compiled inputs")
    probe_of = [probe_of[i] for i in keep]
    proba_ref = None
    if predict_fn == "predict" and _is_classifier(model) and hasattr(model, "predict_proba"):
        proba_ref = np.asarray(model.predict_proba(enforced), dtype=np.float64)[keep]
    records, reference = [records[i] for i in keep], reference[keep]

    failures: list[Verdict] = []  # the first one is reported: the most exact typing's
    for strategy in ("float64", "int64", "float32"):
        plan_columns = _typed_columns(columns, strategy)
        if plan_columns is None:
            continue
        try:
            onnx_bytes, plan = _convert(rest, plan_columns, predict_fn, strategy, model, order)
        except CompileRefused as exc:
            failures.append(Verdict.refused(str(exc)))
            continue
        verdict = _parity(onnx_bytes, plan, records, reference, proba_ref, sample_source, probe_of)
        narrowed = verdict.parity.get("bad_probe_columns")
        if narrowed:  # it differs only on nulls in these columns: serve those through pyfunc, check the rest
            for col in plan.columns:
                if col.name in narrowed:
                    col.nan_ok, col.null_fill = False, None
            sel = [i for i, p in enumerate(probe_of) if p not in narrowed]
            verdict = _parity(onnx_bytes, plan, [records[i] for i in sel], reference[sel],
                              None if proba_ref is None else proba_ref[sel], sample_source,
                              [probe_of[i] for i in sel])  # fmt: skip
            if verdict.ok:
                verdict.parity["nulls_to_pyfunc"] = narrowed
                verdict.reason = verdict.reason[:-1] + f"; a null in {', '.join(narrowed)} is scored by pyfunc)"
        if verdict.ok:
            return verdict
        failures.append(verdict)
    return failures[0] if failures else Verdict.refused("no input typing fits the signature")


def _signature_columns(schema: Any) -> list[ColumnPlan]:
    from mlflow.types.schema import AnyType, DataType

    if schema is None or not schema.has_input_names() or schema.is_tensor_spec():
        raise CompileRefused("the signature does not name its columns")
    names = {DataType.double: "double", DataType.float: "float", DataType.long: "long",
             DataType.integer: "integer", DataType.string: "string", DataType.boolean: "boolean"}  # fmt: skip
    out = []
    for spec in schema.inputs:
        kind = "any" if isinstance(spec.type, AnyType) else names.get(spec.type)
        if kind is None:
            raise CompileRefused(f"input column {spec.name!r} is of type {spec.type}, which is not compiled")
        out.append(ColumnPlan(name=spec.name, kind=kind, required=spec.required, dtype=_NUMPY_DTYPE[kind]))
    return out


def json_records(frame: Any) -> list[dict]:
    """Rows as a client sends them in JSON: plain Python values, missing values as null."""
    values = frame.astype(object).where(frame.notna(), None).to_numpy().tolist()
    cols = list(frame.columns)
    return [dict(zip(cols, row, strict=True)) for row in values]


def _parity_records(
    pyfunc_model: Any, schema: Any, sample: Any, columns: list[ColumnPlan]
) -> tuple[list[dict], dict[str, bool], list[str | None]]:
    """(held-out rows — at most PARITY_ROWS — followed by, per column, NAN_PROBE_ROWS rows with it null; which
    columns pyfunc takes a null in; per row, the column it is a null probe of, or None). Probes are kept only for
    columns where pyfunc predicts them, and held-out rows only with nulls where pyfunc takes them."""
    from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

    names = [c.name for c in columns]
    frame = sample[names]
    if len(frame) > PARITY_ROWS:
        frame = frame.sample(n=PARITY_ROWS, random_state=0)
    if len(frame) == 0:
        raise CompileRefused("the held-out sample is empty")
    base = json_records(frame.reset_index(drop=True))
    complete = [r for r in base if None not in r.values()] or base
    accepts: dict[str, bool] = {}
    probes: list[tuple[str, dict]] = []
    for col in columns:
        if col.kind in ("long", "integer", "boolean"):
            accepts[col.name] = False  # MLflow's cast refuses it there
            continue
        rows = [{**r, col.name: None} for r in complete[:NAN_PROBE_ROWS]]
        try:
            pyfunc_model.predict(dataframe_from_parsed_json(rows, "records", schema))
        except Exception:
            accepts[col.name] = False
            continue
        accepts[col.name] = True
        probes.extend((col.name, r) for r in rows)

    def fits(r: dict) -> bool:
        return all(v is not None or accepts[k] for k, v in r.items())

    kept = [r for r in base if fits(r)]
    if not kept:
        raise CompileRefused("no held-out row fits the model")
    probes = [(c, r) for c, r in probes if fits(r)]
    return kept + [r for _, r in probes], accepts, [None] * len(kept) + [c for c, _ in probes]


def _reference(pyfunc_model: Any, schema: Any, records: list[dict]) -> tuple[np.ndarray, Any]:
    """What `mlflow models serve` answers for these records: MLflow's parsing, then pyfunc's predict."""
    from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

    try:
        frame = dataframe_from_parsed_json(records, "records", schema)
        preds = pyfunc_model.predict(frame)
    except Exception as exc:
        raise CompileRefused(f"pyfunc cannot predict the held-out sample: {_first_line(exc)}") from None
    if not isinstance(preds, np.ndarray):
        raise CompileRefused(f"pyfunc answers a {type(preds).__name__}, not an array")
    return preds, frame


def _enforced(frame: Any, schema: Any) -> Any:
    """The frame as pyfunc hands it to the model (MLflow's schema enforcement: the signature's columns, in order)."""
    from mlflow.models.utils import _enforce_schema

    return _enforce_schema(frame, schema)


def _is_classifier(model: Any) -> bool:
    from sklearn.base import is_classifier

    return bool(is_classifier(model))


def _final_estimator(model: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return model.steps[-1][1] if isinstance(model, Pipeline) else model


# Values a coercion step must pass through as a plain cast besides the sample's (a step that clips, scales or
# maps values would change some of them): numbers for number columns, unseen labels for text columns.
_PROBE_NUMBERS = (0, 1, -1, 7, 0.5, -2.75, 3.14159e-7, 1e6, -1e9, 123456789, 2.5e15)
_PROBE_TEXTS = ("", "0", "__flywheel_probe__", "an unseen label")


def _split_coercion(
    model: Any, enforced: Any, columns: list[ColumnPlan], records: list[dict], schema: Any
) -> tuple[dict[str, dict] | None, list[str], Any]:
    """A pipeline whose first step only casts raw inputs (numbers to float64, labels kept, nulls to NaN or to one
    label — the raw-input coercion a training pipeline may start with; skl2onnx converts none of it): ({column:
    {"dtype", "null_fill"}} of the columns it passes on, their order after it, the pipeline after it). Checked on
    the held-out rows, their null probes and extra values (`_PROBE_NUMBERS`, `_PROBE_TEXTS`). (None, the signature's
    order, the model) when there is no such step — then an untyped (`Any`) signature column cannot be compiled."""
    from sklearn.pipeline import Pipeline

    names = [c.name for c in columns]
    untyped = [c.name for c in columns if c.kind == "any"]
    if not isinstance(model, Pipeline) or len(model.steps) < 2:
        if untyped:
            raise CompileRefused(f"the signature leaves {untyped} untyped and the model has no coercion step")
        return None, names, model
    name, step = model.steps[0]
    casts, why = _casts_of(step, enforced, records, columns)
    if casts is not None:
        casts, why = _check_probe_values(step, casts, records[0], columns, schema)
    if casts is None:
        if untyped:
            raise CompileRefused(
                f"the signature leaves {untyped} untyped and the first step {name!r} ({type(step).__name__}) is not a "
                f"plain cast of them ({why})"
            )
        return None, names, model
    rest = Pipeline(model.steps[1:]) if len(model.steps) > 2 else model.steps[1][1]
    return casts, list(casts), rest


def _casts_of(step: Any, enforced: Any, records: list[dict], columns: list[ColumnPlan]) -> tuple[dict | None, str]:
    """What `step` does to each column it passes on, if it is a plain cast on these rows: ({column: {"dtype",
    "null_fill"}}, "") or (None, why not)."""
    import pandas as pd

    try:
        out = step.transform(enforced)
    except Exception as exc:
        return None, f"it fails on the held-out rows: {_first_line(exc)}"
    names = {c.name for c in columns}
    if not isinstance(out, pd.DataFrame) or len(out) != len(records):
        return None, "its output is not a frame of the same rows"
    if not set(out.columns) <= names or len(set(out.columns)) != len(out.columns):
        return None, "its output columns are not input columns"
    casts: dict[str, dict] = {}
    for c in out.columns:
        got = _cast_of([r[c] for r in records], out[c])
        if isinstance(got, str):
            return None, f"column {c!r}: {got}"
        casts[c] = got
    return casts, ""


def _cast_of(values: list, out: Any) -> dict | str:
    """{"dtype", "null_fill"} when `out` is `values` cast plainly (numbers → float64, labels kept, every null → NaN
    or one label), else why not."""
    dtype = out.dtype
    result = out.tolist()
    if dtype.kind == "f":
        for v, o in zip(values, result, strict=True):
            if v is None:
                if not (isinstance(o, float) and math.isnan(o)):
                    return "a null does not become NaN"
            elif type(v) not in (int, float) or not (o == float(v) or (math.isnan(o) and math.isnan(float(v)))):
                return f"{v!r} becomes {o!r}"
        return {"dtype": str(dtype)}
    if dtype.kind == "O":
        fills = set()
        for v, o in zip(values, result, strict=True):
            if v is None:
                if type(o) is not str:
                    return f"a null becomes {o!r}"
                fills.add(o)
            elif type(v) is not str:
                return f"it turns the number {v!r} into {o!r}"
            elif o != v or type(o) is not str:
                return f"{v!r} becomes {o!r}"
        if len(fills) > 1:
            return "nulls become different labels"
        return {"dtype": "object", "null_fill": fills.pop() if fills else None}
    return f"it makes {dtype}"


def _check_probe_values(
    step: Any, casts: dict[str, dict], template: dict, columns: list[ColumnPlan], schema: Any
) -> tuple[dict | None, str]:
    """The coercion step on rows that differ from `template` in one column each, by a value it must pass through."""
    from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

    kinds = {c.name: c.kind for c in columns}
    rows = []
    for c, info in casts.items():
        if info["dtype"] == "object":
            values = _PROBE_TEXTS
        elif kinds[c] in ("long", "integer"):
            values = tuple(v for v in _PROBE_NUMBERS if type(v) is int)
        else:
            values = _PROBE_NUMBERS
        rows.extend((c, {**template, c: v}) for v in values)
    if not rows:
        return casts, ""
    try:
        frame = _enforced(dataframe_from_parsed_json([r for _, r in rows], "records", schema), schema)
    except Exception as exc:
        return None, f"MLflow refuses its probe values: {_first_line(exc)}"
    got, why = _casts_of(step, frame, [r for _, r in rows], columns)
    if got is None:
        return None, why
    for c in casts:
        if got.get(c, {}).get("dtype") != casts[c]["dtype"]:
            return None, f"column {c!r} changes dtype on other values"
    return casts, ""


def _typed_columns(columns: list[ColumnPlan], strategy: str) -> list[ColumnPlan] | None:
    """The columns with the ONNX input dtype of `strategy`: float64 (integers as float64, as scikit-learn's
    numeric steps cast them), int64 (integers kept) or float32 (every number float32)."""
    out = []
    for col in columns:
        c = copy.copy(col)
        if c.feed:
            if c.dtype in ("int64", "int32") and strategy == "float64":
                c.dtype = "float64"
            if c.dtype in ("float64", "int64", "int32") and strategy == "float32":
                c.dtype = "float32"
            if c.dtype == "bool":
                return None
        out.append(c)
    if strategy == "int64" and not any(c.feed and c.dtype in ("int64", "int32") for c in out):
        return None  # the same as float64
    return out


def _convert(
    model: Any, columns: list[ColumnPlan], predict_fn: str, strategy: str, full_model: Any, order: list[str]
) -> tuple[bytes, Plan]:
    """skl2onnx conversion of `model` (the pipeline after any coercion step, which passes on `order`) for inputs
    typed as `columns`."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import (
        BooleanTensorType,
        DoubleTensorType,
        FloatTensorType,
        Int32TensorType,
        Int64TensorType,
        StringTensorType,
    )
    from sklearn.impute import SimpleImputer

    tensor = {"float64": DoubleTensorType, "float32": FloatTensorType, "int64": Int64TensorType,
              "int32": Int32TensorType, "object": StringTensorType, "bool": BooleanTensorType}  # fmt: skip
    fed = {c.name: c for c in columns if c.feed}
    model = _without_string_imputers(model, {n for n, c in fed.items() if c.dtype == "object"})
    first = model.steps[0][1] if hasattr(model, "steps") else model
    by_name = hasattr(first, "transformers")  # a ColumnTransformer picks its columns by name
    final = _final_estimator(model)
    classifier = _is_classifier(full_model)
    matrix_order = [str(n) for n in getattr(first, "feature_names_in_", order)]
    dtypes = {fed[n].dtype for n in matrix_order if n in fed}
    one_matrix = not by_name and not set(matrix_order) - set(fed) and len(dtypes) == 1 and dtypes.isdisjoint(
        {"object", "bool"})  # fmt: skip
    if not one_matrix:  # a ColumnTransformer picks its columns by name (anything else: skl2onnx says why not)
        layout, matrix_input, order = "columns", None, []
        initial = [(n, tensor[c.dtype]([None, 1])) for n, c in fed.items()]
    else:
        order = matrix_order
        layout, matrix_input = "matrix", "X"
        initial = [("X", tensor[dtypes.pop()]([None, len(order)]))]
        for c in columns:
            c.feed = c.name in order
    options = {id(final): {"zipmap": False}} if classifier else None
    try:
        onx = convert_sklearn(
            model, initial_types=initial, options=options, target_opset={"": 17, "ai.onnx.ml": 3},
            custom_conversion_functions={SimpleImputer: _convert_imputer},
        )  # fmt: skip
    except Exception as exc:
        steps = " → ".join(type(step).__name__ for _, step in getattr(model, "steps", [("", model)]))
        raise CompileRefused(f"skl2onnx cannot convert {steps}: {_first_line(exc)}") from None
    if strategy != "float32":
        _fix_tree_ensembles(onx, final)
    outputs = [o.name for o in onx.graph.output]
    if classifier and predict_fn == "predict":
        classes = getattr(full_model, "classes_", None)
        if classes is None:
            raise CompileRefused(f"{type(final).__name__} has no classes_")
        classes = np.asarray(classes)
        if classes.dtype.kind not in "biufUO" or (classes.dtype == object and not all(
                isinstance(c, str) for c in classes)):  # fmt: skip
            raise CompileRefused(f"class labels of dtype {classes.dtype} are not compiled")
        from_proba = type(final).__name__ in ARGMAX_PROBA_CLASSIFIERS and len(outputs) > 1
        output = OutputPlan(
            kind="label", names=[outputs[1] if from_proba else outputs[0]],
            label_from="probabilities" if from_proba else "label",
            classes=classes.tolist(), classes_dtype=classes.dtype.str,
        )  # fmt: skip
    elif classifier:
        if len(outputs) < 2:
            raise CompileRefused(f"the compiled {type(final).__name__} gives no probabilities")
        output = OutputPlan(kind="proba", names=[outputs[1]])
    else:
        output = OutputPlan(kind="value", names=[outputs[0]])
    if layout == "matrix":
        inputs = [InputGroup(matrix_input, fed[order[0]].dtype, list(order))]
    else:
        inputs = _group_inputs(onx, [c for c in columns if c.feed])
    plan = Plan(columns=columns, inputs=inputs, output=output, strategy=strategy)
    return onx.SerializeToString(), plan


_ONNX_DTYPES = {1: "float32", 11: "float64", 7: "int64", 6: "int32", 8: "object", 9: "bool"}


def _group_inputs(onx: Any, fed: list[ColumnPlan]) -> list[InputGroup]:
    """One graph input per dtype instead of one per column: a (rows × columns) matrix split back into the columns
    inside the graph (onnxruntime's cost per input, ~1 µs, is most of a one-row prediction's)."""
    from onnx import TensorProto, helper

    graph = onx.graph
    by_dtype: dict[str, list[str]] = {}
    declared = {i.name: i for i in graph.input}
    for col in fed:
        if col.name in declared:
            dtype = _ONNX_DTYPES.get(declared[col.name].type.tensor_type.elem_type)
            if dtype is None:
                raise CompileRefused(f"input {col.name!r} has an ONNX type this server does not feed")
            by_dtype.setdefault(dtype, []).append(col.name)
    groups, keep, nodes, inits = [], [], [], []
    for dtype, names in by_dtype.items():
        if len(names) == 1:
            groups.append(InputGroup(names[0], dtype, names))
            keep.append(declared[names[0]])
            continue
        name = f"flywheel_{dtype}_columns"
        elem = declared[names[0]].type.tensor_type.elem_type
        keep.append(helper.make_tensor_value_info(name, elem, [None, len(names)]))
        inits.append(helper.make_tensor(name + "_split", TensorProto.INT64, [len(names)], [1] * len(names)))
        nodes.append(helper.make_node("Split", [name, name + "_split"], names, axis=1, name=name + "_split_node"))
        groups.append(InputGroup(name, dtype, names))
    unfed = [i for i in graph.input if i.name not in {n for g in groups for n in g.columns}]
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    del graph.input[:]
    graph.input.extend(keep + unfed)
    graph.initializer.extend(inits)
    return groups


def _without_string_imputers(model: Any, string_columns: set[str]) -> Any:
    """A copy of the pipeline without the SimpleImputers that fill missing strings in a ColumnTransformer: on
    strings (nulls are not served compiled) they are the identity, and without them skl2onnx's OneHotEncoder
    gets one input per column, the form in which it converts infrequent categories."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    first = model.steps[0][1] if isinstance(model, Pipeline) else model
    if not hasattr(first, "transformers_"):
        return model

    def fills_strings(step: Any, cols: Any) -> bool:
        marker = getattr(step, "missing_values", 0)
        nan_marker = marker is None or (isinstance(marker, float) and math.isnan(marker))
        return (isinstance(step, SimpleImputer) and nan_marker and not step.add_indicator
                and isinstance(cols, list) and bool(cols) and set(cols) <= string_columns)  # fmt: skip

    changed = []
    for name, trans, cols in first.transformers_:
        if isinstance(trans, Pipeline) and len(trans.steps) > 1 and fills_strings(trans.steps[0][1], cols):
            rest = trans.steps[1:]
            trans = rest[0][1] if len(rest) == 1 else Pipeline(rest)
        elif fills_strings(trans, cols):
            trans = "passthrough"
        changed.append((name, trans, cols))
    if changed == list(first.transformers_):
        return model
    model = copy.deepcopy(model)
    first = model.steps[0][1] if isinstance(model, Pipeline) else model
    first.transformers_ = [(n, copy.deepcopy(t) if not isinstance(t, str) else t, c) for n, t, c in changed]
    return model


def _convert_imputer(scope: Any, operator: Any, container: Any) -> None:
    """SimpleImputer as scikit-learn computes it: on strings where the missing marker is NaN, the identity (a
    string input never holds NaN: nulls in string columns are not served compiled); on float64, NaN replaced by
    the float64 statistics (skl2onnx's own converter rounds them to float32, and ONNX Runtime has no float64
    Imputer). Everything else goes to skl2onnx's converter."""
    from skl2onnx.common.data_types import DoubleTensorType, StringTensorType
    from skl2onnx.operator_converters.common import concatenate_variables
    from skl2onnx.operator_converters.imputer_op import convert_sklearn_imputer
    from skl2onnx.proto import onnx_proto

    op = operator.raw_operator
    marker = op.missing_values
    nan_marker = marker is None or (isinstance(marker, float) and math.isnan(marker))
    in_type = operator.inputs[0].type
    plain = nan_marker and not getattr(op, "add_indicator", False)
    stats = np.asarray(op.statistics_)
    if plain and isinstance(in_type, StringTensorType):
        x = concatenate_variables(scope, operator.inputs, container)
        container.add_node("Identity", [x], [operator.outputs[0].full_name], name=scope.get_unique_operator_name("Id"))
        return
    if plain and isinstance(in_type, DoubleTensorType) and stats.dtype.kind == "f" and np.isfinite(stats).all():
        x = concatenate_variables(scope, operator.inputs, container)
        fill = scope.get_unique_variable_name("impute_values")
        container.add_initializer(fill, onnx_proto.TensorProto.DOUBLE, [1, stats.size], stats.astype(np.float64))
        isnan = scope.get_unique_variable_name("impute_isnan")
        container.add_node("IsNaN", [x], [isnan], name=scope.get_unique_operator_name("IsNaN"))
        container.add_node("Where", [isnan, fill, x], [operator.outputs[0].full_name],
                           name=scope.get_unique_operator_name("Where"))  # fmt: skip
        return
    convert_sklearn_imputer(scope, operator, container)


def _fix_tree_ensembles(onx: Any, final: Any) -> None:
    """ONNX Runtime's tree ensembles output float32 scores and, as skl2onnx writes them, compare in float32
    thresholds. A HistGradientBoosting model gets its exact float64 thresholds, leaf values and baseline back
    (`*_as_tensor` attributes, ai.onnx.ml 3), so it takes the float64 features as scikit-learn does; another
    tree model gets its features rounded to float32 at its input, the rounding its own thresholds were made for.
    Either way the scores are handed on as float64."""
    from onnx import TensorProto, helper

    new_nodes = []
    exact = False
    for node in list(onx.graph.node):
        if node.domain != "ai.onnx.ml" or node.op_type not in ("TreeEnsembleClassifier", "TreeEnsembleRegressor"):
            new_nodes.append(node)
            continue
        if _exact_hist_gradient_boosting(node, final):
            exact = True
        else:
            x32 = node.input[0] + "_as_float32"
            new_nodes.append(helper.make_node("Cast", [node.input[0]], [x32], to=TensorProto.FLOAT,
                                              name=node.name + "_cast_in"))  # fmt: skip
            node.input[0] = x32
        score = 1 if node.op_type == "TreeEnsembleClassifier" else 0
        out = node.output[score]
        node.output[score] = out + "_float32"
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Cast", [out + "_float32"], [out], to=TensorProto.DOUBLE,
                                          name=node.name + "_cast_out"))  # fmt: skip
    del onx.graph.node[:]
    onx.graph.node.extend(new_nodes)
    cast = {n.output[0] for n in new_nodes if n.op_type == "Cast" and n.name.endswith("_cast_out")}
    for value in list(onx.graph.output) + list(onx.graph.value_info):
        if value.name in cast:  # some converters declare the scores float32: they are float64 now
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    if exact:
        for imp in onx.opset_import:
            if imp.domain == "ai.onnx.ml" and imp.version < 3:
                imp.version = 3


def _exact_hist_gradient_boosting(node: Any, est: Any) -> bool:
    """Replace a HistGradientBoosting tree node's float32 thresholds, leaf values and baseline by the model's own
    float64 ones; False (node untouched) unless every float32 value skl2onnx wrote matches the model's."""
    from onnx import numpy_helper

    if type(est).__name__ not in ("HistGradientBoostingClassifier", "HistGradientBoostingRegressor"):
        return False
    attrs = {a.name: a for a in node.attribute}
    kind = "class" if node.op_type == "TreeEnsembleClassifier" else "target"
    needed = ("nodes_treeids", "nodes_nodeids", "nodes_values", f"{kind}_treeids", f"{kind}_nodeids",
              f"{kind}_weights", "base_values")  # fmt: skip
    if not all(k in attrs for k in needed):
        return False
    per_iteration = int(est.n_trees_per_iteration_)

    def tree_node(tree_id: int, node_id: int):
        it, cl = (tree_id, 0) if per_iteration == 1 else divmod(tree_id, per_iteration)
        return est._predictors[it][cl].nodes[node_id]

    try:
        thresholds = np.array([0.0 if tree_node(t, i)["is_leaf"] else float(tree_node(t, i)["num_threshold"])
                               for t, i in zip(attrs["nodes_treeids"].ints, attrs["nodes_nodeids"].ints,
                                               strict=True)])  # fmt: skip
        leaves = np.array([float(tree_node(t, i)["value"]) for t, i in zip(
            attrs[f"{kind}_treeids"].ints, attrs[f"{kind}_nodeids"].ints, strict=True)])  # fmt: skip
    except (IndexError, KeyError, ValueError):
        return False
    base = np.asarray(est._baseline_prediction, dtype=np.float64).ravel()
    written = (np.array(attrs["nodes_values"].floats, dtype=np.float32),
               np.array(attrs[f"{kind}_weights"].floats, dtype=np.float32),
               np.array(attrs["base_values"].floats, dtype=np.float32))  # fmt: skip
    for mine, theirs in zip((thresholds, leaves, base), written, strict=True):
        if mine.shape != theirs.shape or not np.array_equal(mine.astype(np.float32), theirs):
            return False
    keep = [a for a in node.attribute if a.name not in ("nodes_values", f"{kind}_weights", "base_values")]
    del node.attribute[:]
    node.attribute.extend(keep)
    for name, values in (("nodes_values_as_tensor", thresholds), (f"{kind}_weights_as_tensor", leaves),
                         ("base_values_as_tensor", base)):  # fmt: skip
        attr = node.attribute.add()
        attr.name = name
        attr.type = attr.TENSOR
        attr.t.CopyFrom(numpy_helper.from_array(values.astype(np.float64), name=name))
    return True


def _parity(
    onnx_bytes: bytes, plan: Plan, records: list[dict], reference: np.ndarray, proba_ref: np.ndarray | None,
    sample_source: str, probe_of: list[str | None],
) -> Verdict:  # fmt: skip
    """Run the compiled model on the parity records through the server's codec, as served (unsure rows by pyfunc),
    and compare with pyfunc: labels identical, values within 1e-6 relative, probabilities within 1e-5. When only
    rows with a missing value differ, `parity["bad_probe_columns"]` names their columns (nulls there can go to
    pyfunc instead)."""
    try:
        compiled = CompiledModel(onnx_bytes, plan)
    except Exception as exc:
        return Verdict.refused(f"onnxruntime cannot load the compiled model: {_first_line(exc)}")
    encoded = compiled.encode("dataframe_records", records)
    if encoded is None:
        return Verdict.refused("the held-out rows do not fit the compiled inputs")
    n = len(records)
    is_probe = np.array([p is not None for p in probe_of], dtype=bool)
    probes = int(is_probe.sum())
    rows = f"{n - probes:,} rows of {sample_source}" + (f" and {probes:,} with a missing value" if probes else "")
    parity: dict[str, Any] = {"rows": n, "probe_rows": probes, "sample": sample_source, "strategy": plan.strategy}
    out = plan.output
    row_dp = None  # per row: the largest probability difference
    try:
        if out.kind == "label" and out.label_from == "probabilities":
            proba = np.asarray(compiled.session.run(out.names, encoded.feeds)[0], dtype=np.float64).reshape(n, -1)
            if proba_ref is None or proba_ref.shape != proba.shape:
                return Verdict.refused("the compiled probabilities do not match the model's classes")
            row_dp = np.abs(proba - proba_ref).max(axis=1)
            good = row_dp <= PROBA_TOLERANCE
            max_dp = float(row_dp[good].max()) if good.any() else float(row_dp.max())
            out.margin = max(MIN_MARGIN, MARGIN_SAFETY * 2 * max_dp)
        got, unsure = compiled.predict(encoded.feeds, encoded.n)
    except Exception as exc:
        return Verdict.refused(f"onnxruntime fails on the held-out rows: {_first_line(exc)}")
    if got.shape != reference.shape or got.dtype != reference.dtype:
        return Verdict.refused(
            f"the compiled output is {got.dtype}{list(got.shape)}, pyfunc's {reference.dtype}{list(reference.shape)}",
            parity,
        )  # fmt: skip
    if out.kind == "label":
        served = got.copy()
        if unsure is not None:
            served[unsure] = reference[unsure]  # served by pyfunc
        differ = served != reference
        off = np.zeros(n, dtype=bool) if row_dp is None else row_dp > PROBA_TOLERANCE
        if off.any():  # probabilities beyond the tolerance: no margin guards these rows, count them as computed
            differ |= off & (got != reference)
        bad = differ | off
        parity.update(labels_differ=int(differ.sum()), unsure_rows=int(unsure.sum()) if unsure is not None else 0,
                      margin=out.margin)  # fmt: skip
        if row_dp is not None:
            parity["max_abs_proba_diff"] = float(row_dp.max())
        why = f"{int(differ.sum())} of {n} labels differ" if differ.any() else ""
        if not why and bad.any():
            why = f"probabilities differ by up to {float(row_dp.max()):.1g} (> {PROBA_TOLERANCE:g})"
        detail = f"labels identical on {rows}" + (f", max |Δp| {row_dp.max():.1g}" if row_dp is not None else "")
    elif out.kind == "proba":
        row_dp = np.abs(got - reference).max(axis=1)
        bad = row_dp > PROBA_TOLERANCE
        parity["max_abs_proba_diff"] = float(row_dp.max())
        why = f"probabilities differ by up to {float(row_dp.max()):.1g} (> {PROBA_TOLERANCE:g})" if bad.any() else ""
        detail = f"probabilities within {row_dp.max():.1g} on {rows}"
    else:
        ref = reference.astype(np.float64)
        err = np.abs(got - ref)
        bad = err > REGRESSION_RTOL * np.abs(ref) + REGRESSION_ATOL
        if bad.ndim > 1:
            bad = bad.any(axis=1)
        rel = float((err / np.maximum(np.abs(ref), 1e-300)).max())
        parity.update(max_rel_diff=rel, values_differ=int(bad.sum()))
        why = f"{int(bad.sum())} of {n} values differ by more than {REGRESSION_RTOL:g} relative" if bad.any() else ""
        detail = f"values within {rel:.1g} relative on {rows}"
    if why:
        if not bad[~is_probe].any():
            parity["bad_probe_columns"] = sorted({probe_of[i] for i in np.flatnonzero(bad)})
        return Verdict.refused(why, parity)
    parity["ok"] = True
    return Verdict(True, f"compiled: yes (onnxruntime; {detail})", plan=plan, onnx=onnx_bytes, parity=parity)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------------- registry I/O
def versions() -> dict[str, str]:
    """The library versions a compiled artefact depends on (a different set recompiles)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("skl2onnx", "onnxruntime", "onnx", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = ""
    return out


def fingerprint(source: str, sample_source: str) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "versions": versions(), "source": source, "sample": sample_source},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_has(mlflow_client: Any, run_id: str | None, artifact: str) -> bool:
    """Whether the run holds `artifact` (as flywheel.tasks.registry.has_run_artifact, without importing the
    registry module and Prefect with it: the model server calls this)."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    try:
        listed = mlflow_client.list_artifacts(run_id, str(Path(artifact).parent))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return False
        raise
    return any(f.path == artifact for f in listed)


def read_meta(mlflow_client: Any, run_id: str | None, dst: str | None = None) -> dict | None:
    """The `compiled/compiled.json` of a run, or None when it has none."""
    if not _run_has(mlflow_client, run_id, META_ARTIFACT):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow_client.download_artifacts(run_id, META_ARTIFACT, dst or tmp)
        return json.loads(Path(local).read_text())


def parity_sample(mlflow_client: Any, model_name: str, mv: Any) -> tuple[Any | None, str]:
    """(the held-out sample parity runs on, where it comes from): the version's own, else the champion's."""
    from flywheel.tasks import registry

    own = registry.find_sample(mlflow_client, mv, registry.HOLDOUT_ARTIFACT)
    if own is not None:
        return own, f"v{mv.version}'s holdout sample"
    champion = registry.get_alias_version(mlflow_client, model_name, registry.CHAMPION)
    if champion is not None and champion.version != mv.version:
        theirs = registry.find_sample(mlflow_client, champion, registry.HOLDOUT_ARTIFACT)
        if theirs is not None:
            return theirs, f"the champion v{champion.version}'s holdout sample"
    return None, ""


def compile_version(mlflow_client: Any, model_name: str, version: str, *, enabled: bool = True) -> Verdict:
    """Compile `model_name` v`version` and keep the result with its run (see the module docstring). An artefact
    already there for the same model, libraries and sample is reused. Registry errors propagate (the caller's
    retries); everything about the model itself ends in a verdict."""
    import mlflow.artifacts
    import mlflow.pyfunc

    from flywheel.tasks import registry

    mv = mlflow_client.get_model_version(model_name, str(version))

    def tagged(verdict: Verdict) -> Verdict:
        tag = verdict.reason.removeprefix("compiled: ")[:5000]
        registry.set_version_tags(mlflow_client, model_name, mv.version, {TAG_COMPILED: tag})
        return verdict

    if not enabled:
        return tagged(Verdict(False, "compiled: off (FLYWHEEL_COMPILE_MODELS=false)"))
    if not mv.run_id:
        return tagged(Verdict.refused("the version has no run to keep a compiled model with"))
    sample, sample_source = parity_sample(mlflow_client, model_name, mv)
    existing = read_meta(mlflow_client, mv.run_id)
    if existing and existing.get("fingerprint") == fingerprint(str(mv.source), sample_source):
        return tagged(Verdict(bool(existing.get("ok")), str(existing.get("reason")),
                              parity=existing.get("parity") or {}, meta=existing))  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if sample is None:
            verdict = Verdict.refused("no held-out sample to check parity on (the version's or the champion's)")
        else:
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=mlflow_client.get_model_version_download_uri(model_name, mv.version),
                    tracking_uri=mlflow_client._tracking_client.tracking_uri, dst_path=tmp,
                )  # fmt: skip
                pyfunc_model = mlflow.pyfunc.load_model(local)
            except Exception as exc:
                verdict = Verdict.refused(f"pyfunc cannot load it: {_first_line(exc)}")
            else:
                verdict = compile_model(pyfunc_model, sample, sample_source=sample_source)
    meta = {
        "format": FORMAT_VERSION,
        "ok": verdict.ok,
        "reason": verdict.reason,
        "engine": verdict.engine,
        "model_name": model_name,
        "version": str(mv.version),
        "source": str(mv.source),
        "fingerprint": fingerprint(str(mv.source), sample_source),
        "versions": versions(),
        "parity": verdict.parity,
        "plan": verdict.plan.as_dict() if verdict.plan else None,
        "onnx_sha256": hashlib.sha256(verdict.onnx).hexdigest() if verdict.onnx else None,
        "compile_seconds": round(time.perf_counter() - started, 3),
    }
    verdict.meta = meta
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / COMPILED_DIR
        folder.mkdir()
        if verdict.onnx:
            (folder / ONNX_FILE).write_bytes(verdict.onnx)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        mlflow_client.log_artifacts(mv.run_id, str(folder), COMPILED_DIR)
    return tagged(verdict)


def load_compiled(mlflow_client: Any, run_id: str | None, source: str, dst: str) -> tuple[CompiledModel | None, str]:
    """(the compiled model of a version, or None, and the reason) for a model server: only an artefact that
    passed parity, was made from this very model and checks out (hash, onnxruntime version) is used."""
    if not run_id:
        return None, "compiled: no (the version has no run, so no compiled model)"
    meta = read_meta(mlflow_client, run_id, dst)
    if meta is None:
        return None, "compiled: no (no compiled model with the version: it was not packaged by deploy-model)"
    if meta.get("format") != FORMAT_VERSION:
        return None, f"compiled: no (compiled artefact format {meta.get('format')}, this server reads {FORMAT_VERSION})"
    if meta.get("source") != source:
        return None, "compiled: no (the run's compiled model is of another model than this version's)"
    if not meta.get("ok"):
        return None, str(meta.get("reason") or "compiled: no")
    here = versions().get("onnxruntime")
    if meta.get("versions", {}).get("onnxruntime") != here:
        return None, (f"compiled: no (parity was checked with onnxruntime {meta['versions'].get('onnxruntime')}, "
                      f"this server has {here})")  # fmt: skip
    local = Path(mlflow_client.download_artifacts(run_id, ONNX_ARTIFACT, dst))
    data = local.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("onnx_sha256"):
        return None, "compiled: no (the compiled model does not match its recorded hash)"
    return CompiledModel(data, Plan.from_dict(meta["plan"])), str(meta["reason"])
