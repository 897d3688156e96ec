"""A leading raw-input coercion step: split off, checked on held-out rows and probe values, applied by the codec."""

from __future__ import annotations

import copy
import math
from typing import Any

from flywheel.tasks.compiling.plan import ColumnPlan, CompileRefused, first_line, schema_enforced

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
        return None, f"it fails on the held-out rows: {first_line(exc)}"
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
        frame = schema_enforced(dataframe_from_parsed_json([r for _, r in rows], "records", schema), schema)
    except Exception as exc:
        return None, f"MLflow refuses its probe values: {first_line(exc)}"
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
