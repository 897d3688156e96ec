"""The runtime half: JSON values → ONNX inputs (`InputCodec`) and the compiled model the server predicts with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flywheel.tasks.compiling.plan import _NONE, _NUMPY_DTYPE, _SIMPLE, WIDE_ROWS, ColumnPlan, Plan


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
