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

Modules: `plan` (the plan, the verdict, constants), `runtime` (the codec and `CompiledModel`), `compile` (parity
and the compile entry point), `coercion` (a leading raw-input step), `convert` (skl2onnx), `registry_io` (a
registered version's verdict and artefacts).
"""

from flywheel.tasks.compiling.compile import compile_model, json_records
from flywheel.tasks.compiling.plan import (
    COMPILED_DIR,
    ENGINE_COMPILED,
    ENGINE_PYFUNC,
    META_ARTIFACT,
    META_FILE,
    ONNX_ARTIFACT,
    ONNX_FILE,
    PROBA_TOLERANCE,
    TAG_COMPILED,
    ColumnPlan,
    CompileRefused,
    InputGroup,
    OutputPlan,
    Plan,
    Verdict,
)  # fmt: skip
from flywheel.tasks.compiling.registry_io import (
    compile_version,
    fingerprint,
    load_compiled,
    parity_sample,
    read_meta,
    versions,
)  # fmt: skip
from flywheel.tasks.compiling.runtime import CompiledModel, InputCodec

__all__ = [
    "COMPILED_DIR", "ENGINE_COMPILED", "ENGINE_PYFUNC", "META_ARTIFACT", "META_FILE", "ONNX_ARTIFACT", "ONNX_FILE",
    "PROBA_TOLERANCE", "TAG_COMPILED", "ColumnPlan", "CompileRefused", "CompiledModel", "InputCodec", "InputGroup",
    "OutputPlan", "Plan", "Verdict", "compile_model", "compile_version", "fingerprint", "json_records",
    "load_compiled", "parity_sample", "read_meta", "versions",
]  # fmt: skip
