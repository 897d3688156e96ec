"""Compiling a loaded pyfunc model: the signature's columns, parity records, and the parity check."""

from __future__ import annotations

from typing import Any

import numpy as np

from flywheel.tasks.compiling.coercion import _split_coercion, _typed_columns
from flywheel.tasks.compiling.convert import _convert
from flywheel.tasks.compiling.plan import (
    _NUMPY_DTYPE,
    MARGIN_SAFETY,
    MIN_MARGIN,
    NAN_PROBE_ROWS,
    PARITY_ROWS,
    PROBA_TOLERANCE,
    REGRESSION_ATOL,
    REGRESSION_RTOL,
    SUPPORTED_PREDICT_FNS,
    ColumnPlan,
    CompileRefused,
    Plan,
    Verdict,
    first_line,
    is_classifier,
    schema_enforced,
)
from flywheel.tasks.compiling.runtime import CompiledModel


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
    enforced = schema_enforced(frame, schema)
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
    if predict_fn == "predict" and is_classifier(model) and hasattr(model, "predict_proba"):
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
        raise CompileRefused(f"pyfunc cannot predict the held-out sample: {first_line(exc)}") from None
    if not isinstance(preds, np.ndarray):
        raise CompileRefused(f"pyfunc answers a {type(preds).__name__}, not an array")
    return preds, frame


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
        return Verdict.refused(f"onnxruntime cannot load the compiled model: {first_line(exc)}")
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
        return Verdict.refused(f"onnxruntime fails on the held-out rows: {first_line(exc)}")
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
