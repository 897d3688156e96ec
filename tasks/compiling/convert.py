"""scikit-learn → ONNX with skl2onnx, with float64 trees for HistGradientBoosting and string imputers handled."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from flywheel.tasks.compiling.plan import (
    ARGMAX_PROBA_CLASSIFIERS,
    ColumnPlan,
    CompileRefused,
    InputGroup,
    OutputPlan,
    Plan,
    final_estimator,
    first_line,
    is_classifier,
)


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
    final = final_estimator(model)
    classifier = is_classifier(full_model)
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
        raise CompileRefused(f"skl2onnx cannot convert {steps}: {first_line(exc)}") from None
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
