"""A user's own tables (issue 14) on real data shipped with packages — palmerpenguins and scikit-learn's sets:
rows without a label, raw dtypes the logged model must take (in process and over HTTP), multiclass through the
loop, and a gate that fits any dataset (a trivial baseline by default, floors per model in the spec)."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from palmerpenguins import load_penguins
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine

from flywheel.core.spec import DatasetSpec, GateSpec, SpecError, load_spec
from flywheel.tasks import evaluation, model_specs, registry, training, validation
from flywheel.tasks.gate import GateThresholds, promotion_gate, thresholds_from_settings
from flywheel.tasks.validation import DataValidationError, labelled_rows, validate_dataset

SEED = 42
NUMERIC = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]


# --------------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def penguins() -> pd.DataFrame:
    """The real penguins with an id column, 15 % of the species blanked (some NaN, some empty text); `year` is int64,
    numeric and categorical columns hold NaN."""
    df = load_penguins().reset_index(names="id")
    rng = np.random.default_rng(SEED)
    blank = rng.choice(len(df), size=int(len(df) * 0.15), replace=False)
    df["species"] = df["species"].astype(object)
    df.loc[blank[: len(blank) // 2], "species"] = np.nan
    df.loc[blank[len(blank) // 2 :], "species"] = "  "
    return df


@pytest.fixture(scope="module")
def penguin_spec() -> DatasetSpec:
    """Species from the measurements, island, sex and year (a number used as a category)."""
    return DatasetSpec(
        name="penguins", source="unused.csv", target="species", task="multiclass", numeric=NUMERIC,
        categorical=["island", "sex", "year"], drop=["id"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def penguin_model(penguins, penguin_spec):
    """The default multiclass model on the labelled penguins, and the model as it is logged (raw-input step first)."""
    labelled = labelled_rows(penguins, penguin_spec)
    parts = training.split_dataset(labelled, penguin_spec, seed=SEED)
    fitted = training.train_model(parts, penguin_spec, model_specs.default_model_spec("multiclass"), SEED)
    return labelled, parts, fitted, training.servable_model(fitted, labelled, penguin_spec)


def raw_rows(penguins: pd.DataFrame) -> pd.DataFrame:
    """Rows as a user has them: the whole table's columns (target, id), int64 `year`, NaN in features."""
    gaps = penguins.loc[penguins[[*NUMERIC, "sex"]].isna().any(axis=1)].head(6)
    rest = penguins.drop(index=gaps.index).sample(n=54, random_state=3)
    rows = pd.concat([gaps, rest]).sample(frac=1, random_state=4)
    assert rows[NUMERIC].isna().any().any() and rows["sex"].isna().any() and rows["year"].dtype == "int64"
    return rows


def sklearn_frame(loader, target: str = "target") -> pd.DataFrame:
    return loader(as_frame=True).frame.rename(columns={"target": target})


# --------------------------------------------------------------------------------------------------- 1. unlabeled rows
def test_rows_without_a_label_are_counted_and_left_out(penguins, penguin_spec):
    report = validate_dataset(penguins, penguin_spec)
    blanks = int(len(penguins) * 0.15)
    assert (report.rows, report.rows_unlabeled, report.rows_labeled) == (len(penguins), blanks, len(penguins) - blanks)
    labelled = labelled_rows(penguins, penguin_spec)
    assert len(labelled) == report.rows_labeled and labelled["species"].str.strip().ne("").all()
    assert report.class_counts == labelled["species"].value_counts().to_dict()
    complete = load_penguins()
    assert labelled_rows(complete, penguin_spec) is complete  # nothing to leave out: the same frame (same hash)


def test_validation_fails_only_when_too_few_labelled_rows_remain(penguins, penguin_spec):
    report = validate_dataset(penguins, penguin_spec, min_rows=0)
    assert validate_dataset(penguins, penguin_spec, min_rows=report.rows_labeled).rows_unlabeled > 0
    with pytest.raises(DataValidationError) as err:
        validate_dataset(penguins, penguin_spec, min_rows=report.rows_labeled + 1)
    assert err.value.problems == [
        f"too few labelled rows: {report.rows_labeled} < {report.rows_labeled + 1} ({report.rows_unlabeled} of "
        f"{len(penguins)} rows have no value in target 'species')"
    ]


def test_labelled_rows_holding_a_single_class_fail(penguin_spec):
    df = load_penguins()
    df.loc[df["species"] != "Adelie", "species"] = None  # every other label blanked: one class is left
    with pytest.raises(DataValidationError) as err:
        validate_dataset(df, penguin_spec, min_rows=100)
    assert err.value.problems == ["target 'species' has a single class ['Adelie']: cannot train"]


def test_binary_table_with_blank_labels():
    df = sklearn_frame(load_breast_cancer, "malignant").assign(malignant=lambda d: (d["malignant"] == 0).astype(float))
    df.loc[df.sample(frac=0.16, random_state=SEED).index, "malignant"] = np.nan
    spec = DatasetSpec(
        source="x", target="malignant", positive_class=1, numeric=[c for c in df.columns if c != "malignant"]
    )
    report = validate_dataset(df, spec)
    assert report.rows_unlabeled == round(len(df) * 0.16)
    labelled = labelled_rows(df, spec)
    assert 0.3 < report.positive_share < 0.45 and report.positive_share == pytest.approx(labelled["malignant"].mean())


def test_a_training_run_states_the_rows_it_left_out(penguins, penguin_spec, tmp_path, sqlite_mlflow, fresh_settings):
    """The train flow's composition (without Prefect, on a SQLite registry): rows without a label are dropped
    after validation, counted in the result, the parent run's params and the version's tags; the data hash is of
    the labelled rows, so a table that only gains unlabeled rows trains nothing new."""
    from flywheel.flows.train import TrainSteps, run_train
    from flywheel.tasks.data import data_hash, pull_dataset

    data = tmp_path / "penguins.csv"
    penguins.to_csv(data, index=False)
    spec_path = tmp_path / "penguins.yaml"
    spec_path.write_text(yaml.safe_dump({**penguin_spec.model_dump(exclude={"gate"}), "source": str(data)}))
    trained_on = labelled_rows(pull_dataset(load_spec(spec_path)), penguin_spec)
    client = sqlite_mlflow
    log = logging.getLogger("test.user_tables")
    result = run_train(TrainSteps().bare(), log, spec_path=str(spec_path), model_name="penguins")
    more = pd.concat([penguins, penguins.head(5).assign(species=np.nan)], ignore_index=True)
    more.to_csv(data, index=False)
    again = run_train(TrainSteps().bare(), log, spec_path=str(spec_path), model_name="penguins")

    blanks = int(len(penguins) * 0.15)
    assert result["status"] == "registered" and result["promoted"], result
    assert (result["rows"], result["rows_unlabeled"]) == (len(penguins) - blanks, blanks)
    assert result["data_hash"] == data_hash(trained_on) and len(trained_on) == result["rows"]
    assert again["status"] == "unchanged" and again["rows_unlabeled"] == blanks + 5
    version = client.get_model_version("penguins", result["version"])
    assert version.tags["rows_unlabeled"] == str(blanks)
    runs = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id])
    assert [r.data.params["rows_unlabeled"] for r in runs if "rows_unlabeled" in r.data.params] == [str(blanks)]
    assert any("baseline" in r for r in result["gate"]["reasons"])


# --------------------------------------------------------------------------------------------------- 2. raw dtypes
def test_raw_input_step_makes_the_training_features_from_any_raw_form(penguins, penguin_spec, penguin_model):
    labelled, parts, _, _ = penguin_model
    step = training.raw_input_step(penguin_spec, training.numbers_coded(labelled, penguin_spec)).fit(labelled)
    assert training.numbers_coded(labelled, penguin_spec) == ["year"]
    X = training.feature_frame(labelled, penguin_spec)
    assert X.columns.tolist() == [*NUMERIC, "year", "island", "sex"]
    assert X.dtypes.astype(str).tolist() == ["float64"] * 4 + ["object"] * 3
    pd.testing.assert_frame_equal(step.transform(labelled).set_index(labelled.index), X, check_dtype=False)
    pd.testing.assert_frame_equal(step.transform(X).set_index(X.index), X, check_dtype=False)  # idempotent
    row = labelled.dropna().head(1)
    forms = {
        "int64 year": row,
        "float year (an int column with a gap)": row.assign(year=row["year"].astype(float)),
        "text": row.astype(str),
        "objects": row.astype(object),
        "nullable": row.convert_dtypes(),
        "int64 mass": row.assign(body_mass_g=row["body_mass_g"].astype("int64")),
    }
    for name, frame in forms.items():
        assert step.transform(frame).iloc[0].tolist() == X.loc[row.index].iloc[0].tolist(), name
    missing = row.assign(sex=None, year=np.nan, body_mass_g=pd.NA).astype(object)
    out = step.transform(missing).iloc[0]
    assert (out["sex"], out["year"]) == ("missing", "nan") and math.isnan(out["body_mass_g"])


def test_signature_takes_raw_rows(penguin_model):
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, DataType

    labelled, parts, _, served = penguin_model
    example = labelled.loc[parts.X_test.index[:100], list(parts.X_test.columns)]
    signature = registry.raw_rows_signature(infer_signature(example, served.predict(example)))
    types = {c.name: c.type for c in signature.inputs.inputs}
    assert list(types) == list(parts.X_test.columns)
    assert all(isinstance(types[c], AnyType) for c in [*NUMERIC, "year"])
    assert types["island"] == DataType.string and types["sex"] == DataType.string
    assert all(c.required for c in signature.inputs.inputs)


@pytest.fixture(scope="module")
def logged(penguin_model, tmp_path_factory):
    """The penguin model logged and registered as the train flow does it, in a SQLite registry."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    labelled, parts, fitted, _ = penguin_model
    spec = DatasetSpec(
        name="penguins", source="x", target="species", task="multiclass", numeric=NUMERIC,
        categorical=["island", "sex", "year"],
    )  # fmt: skip
    plan_kwargs = _log_kwargs(labelled, parts, fitted, spec)
    root = tmp_path_factory.mktemp("penguin-registry")
    uri = f"sqlite:///{root}/mlflow.db"
    with _use_tracking_uri(uri):
        MlflowClient(uri).create_experiment("user-tables", artifact_location=str(root / "artifacts"))
        done = registry.log_candidate(**plan_kwargs)
        version = registry.register_version(registry.client(uri), "penguins-unit", done, {"data_hash": "x"})
        pyfunc = mlflow.pyfunc.load_model(f"models:/penguins-unit/{version.version}")
        yield {"uri": uri, "version": str(version.version), "pyfunc": pyfunc, "root": root}


def _log_kwargs(labelled, parts, fitted, spec) -> dict:
    from flywheel.tasks.candidates import CandidateResult
    from flywheel.tasks.training_run import TrainingPlan

    model_spec = model_specs.default_model_spec("multiclass")
    best = CandidateResult("hgb", model_spec, evaluation.evaluate_model(fitted, parts.X_test, parts.y_test, spec),
                           None, model=fitted)  # fmt: skip
    plan = TrainingPlan("penguins-unit", spec, [model_spec], "f1_macro", "p", None, None)
    settings = type("S", (), {"reference_sample_rows": 1000, "seed": SEED, "experiment_name": "user-tables"})()
    return plan.log_kwargs(labelled, parts, best, "abcdef0123456789", {}, settings)


def test_logged_model_predicts_raw_rows_in_process(logged, penguins, penguin_model, penguin_spec):
    _, _, fitted, _ = penguin_model
    rows = raw_rows(penguins)
    got = logged["pyfunc"].predict(rows)  # extra columns (species, id) ignored, int64 year, NaN features
    want = fitted.predict(training.feature_frame(rows, penguin_spec, ["year"]))
    assert list(got) == list(want) and set(got) <= {"Adelie", "Chinstrap", "Gentoo"}
    odd = rows.head(8).copy()
    odd["year"] = odd["year"].astype(float)
    odd.iloc[0, odd.columns.get_loc("year")] = np.nan  # an integer column with a missing value arrives as float
    odd["body_mass_g"] = odd["body_mass_g"].fillna(4000).astype("int64")  # a float column of whole numbers as int64
    assert len(logged["pyfunc"].predict(odd)) == 8
    assert len(logged["pyfunc"].predict(odd.convert_dtypes())) == 8  # pandas' nullable dtypes, pd.NA


def test_logged_model_predicts_raw_rows_over_http(logged, penguins, tmp_path):
    from starlette.testclient import TestClient

    from flywheel.serving.app import create_app

    rows = raw_rows(penguins)
    want = logged["pyfunc"].predict(rows).tolist()
    app = create_app(
        "penguins-unit", logged["uri"], admin_token="admin", scoring_token=None, request_log_dir=tmp_path,
        initial_version=logged["version"],
    )  # fmt: skip
    split = json.loads(rows.to_json(orient="split", index=False))
    records = json.loads(rows.to_json(orient="records"))
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/ping").status_code == 200:
                break
            time.sleep(0.1)
        for body in ({"dataframe_split": split}, {"dataframe_records": records}):
            resp = client.post("/invocations", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"predictions": want}  # class labels
        one = {**records[0], "year": None, "bill_length_mm": None, "sex": None}
        resp = client.post("/invocations", json={"dataframe_records": [one]})
        assert resp.status_code == 200 and resp.json()["predictions"][0] in {"Adelie", "Chinstrap", "Gentoo"}


def test_integer_columns_of_a_sklearn_table(tmp_path):
    """breast_cancer with some features as int64 and one coded category: the logged model takes the raw rows."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    df = sklearn_frame(load_breast_cancer, "benign")
    df["mean area"] = df["mean area"].round().astype("int64")
    df["grade"] = pd.qcut(df["worst radius"], 4, labels=False).astype("int64")  # a number used as a category
    numeric = [c for c in df.columns if c not in ("benign", "grade", "worst radius")]
    spec = DatasetSpec(source="x", target="benign", positive_class=1, numeric=numeric, categorical=["grade"])
    parts = training.split_dataset(df, spec, seed=SEED)
    fitted = training.train_model(parts, spec, model_specs.ModelSpec(estimator="logistic_regression",
                                                                  params={"max_iter": 2000}), SEED)  # fmt: skip
    served = training.servable_model(fitted, df, spec)
    with _use_tracking_uri(f"sqlite:///{tmp_path}/m.db"):
        MlflowClient().create_experiment("cancer", artifact_location=str(tmp_path / "a"))
        mlflow.set_experiment("cancer")
        from mlflow.models import infer_signature

        example = df.loc[parts.X_test.index[:50], list(parts.X_test.columns)]
        signature = registry.raw_rows_signature(infer_signature(example, served.predict(example)))
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(
                served, name="model", signature=signature, input_example=example.head(3),
                skops_trusted_types=registry.trusted_types(served), pip_requirements=["scikit-learn"],
            )  # fmt: skip
        model = mlflow.pyfunc.load_model(info.model_uri)
    rows = df.sample(n=200, random_state=1)
    assert rows["mean area"].dtype == "int64"
    np.testing.assert_array_equal(model.predict(rows), fitted.predict(training.feature_frame(rows, spec, ["grade"])))


# --------------------------------------------------------------------------------------------------- 3. multiclass
def test_multiclass_spec_needs_no_positive_class(tmp_path):
    path = tmp_path / "iris.yaml"
    path.write_text("source: x.csv\ntarget: species\ntask: multiclass\nnumeric: [a]\n")
    assert load_spec(path).task == "multiclass"
    assert (
        DatasetSpec(source="x", target="y", positive_class=1, numeric=["a"]).with_overrides(task="multiclass").task
        == "multiclass"
    )


def test_multiclass_validation_warns_about_a_rare_class():
    df = sklearn_frame(load_iris, "species")
    rare = df.drop(index=df.index[(df["species"] == 2)][5:])  # 5 rows of class 2 left
    spec = DatasetSpec(source="x", target="species", task="multiclass", numeric=list(df.columns[:4]))
    report = validate_dataset(rare, spec, min_rows=50)
    assert report.class_counts == {"0": 50, "1": 50, "2": 5}
    assert len(report.warnings) == 1 and report.warnings[0].startswith(
        "class '2' of target 'species' is rare: 5 of 105"
    )
    assert validate_dataset(df, spec, min_rows=50).warnings == ()
    single = df.drop(index=df.index[(df["species"] == 2)][1:])
    assert "split cannot be stratified" in validate_dataset(single, spec, min_rows=50).warnings[0]
    parts = training.split_dataset(single, spec, seed=SEED)  # a class of one row: split unstratified, no crash
    assert len(parts.X_test) == math.ceil(len(single) * 0.2)


def test_binary_task_on_three_classes_points_at_multiclass():
    df = sklearn_frame(load_wine)
    spec = DatasetSpec(source="x", target="target", positive_class=1, numeric=list(df.columns[:-1]))
    with pytest.raises(DataValidationError, match="needs two \\(or use 'multiclass'\\)"):
        validate_dataset(df, spec, min_rows=100)


@pytest.mark.parametrize("loader", [load_wine, load_iris], ids=["wine", "iris"])
def test_multiclass_trains_and_reports_its_metrics(loader):
    from mlflow.utils.validation import _validate_metric_name

    df = sklearn_frame(loader)
    df["target"] = df["target"].map(dict(enumerate(loader().target_names)))
    spec = DatasetSpec(source="x", target="target", task="multiclass", numeric=list(df.columns[:-1]))
    parts = training.split_dataset(df, spec, seed=SEED)
    assert parts.y_test.value_counts().min() >= 9  # stratified
    model = training.train_model(parts, spec, model_specs.default_model_spec("multiclass"), SEED)
    metrics = evaluation.evaluate_model(model, parts.X_test, parts.y_test, spec)
    keys = {f"{m}_{evaluation.class_keys([c])[c]}" for c in loader().target_names for m in ("precision", "recall")}
    assert {"accuracy", "f1_macro", "f1_weighted", "roc_auc_ovr"} | keys == set(metrics)
    for key in metrics:
        _validate_metric_name(f"holdout_{key}")
    assert metrics["f1_macro"] > 0.85 and metrics["accuracy"] > 0.85
    baseline = evaluation.baseline_metrics(parts.X_train, parts.y_train, parts.X_test, parts.y_test, spec)
    assert baseline["roc_auc_ovr"] == 0.5 and baseline["f1_macro"] < 0.25
    decision = promotion_gate(metrics, None, task="multiclass", thresholds=GateThresholds(), baseline=baseline,
                              baseline_model="majority class")  # fmt: skip
    assert decision.passed and decision.metric == "f1_macro"
    assert decision.reasons[0].startswith(f"f1_macro {metrics['f1_macro']:.4f} vs majority class baseline")


def test_multiclass_metrics_by_hand_and_class_keys():
    y = pd.Series(["a b", "a-b", "c", "c"])
    metrics = evaluation.multiclass_metrics(y, ["a b", "c", "c", "c"], None, None)
    assert metrics["accuracy"] == 0.75
    assert (metrics["precision_a_b"], metrics["recall_a_b"]) == (1.0, 1.0)
    assert (metrics["precision_a_b_2"], metrics["recall_a_b_2"]) == (0.0, 0.0)  # 'a-b' slugs alike: suffixed
    assert metrics["precision_c"] == pytest.approx(2 / 3, abs=1e-6) and metrics["recall_c"] == 1.0
    assert metrics["f1_macro"] == pytest.approx((1 + 0 + 0.8) / 3, abs=1e-6)
    assert evaluation.class_keys(["Adélie", 3, "?"]) == {"Adélie": "ad_lie", 3: "3", "?": "class"}


def test_multiclass_selection_metric_and_default_model():
    assert model_specs.selection_metric("multiclass") == "f1_macro"
    assert model_specs.selection_metric("multiclass", "ACCURACY") == "accuracy"
    with pytest.raises(model_specs.ModelSpecError, match="'f1' is not a multiclass metric"):
        model_specs.selection_metric("multiclass", "f1")
    assert model_specs.default_model_spec("multiclass").estimator == "gradient_boosting"


def test_multiclass_confusion_figure(penguin_model):
    import matplotlib.pyplot as plt

    _, parts, fitted, _ = penguin_model
    fig = evaluation.confusion_figure(fitted, parts.X_test, parts.y_test)
    try:
        assert sum(int(t.get_text()) for t in fig.axes[0].texts) == len(parts.y_test)
        assert len(fig.axes[0].texts) == 9
    finally:
        plt.close(fig)


def test_ci_report_and_demo_summary_of_a_multiclass_run():
    from flywheel.cli import ci
    from flywheel.cli.demo import MonthRow, live_score, summary_table

    candidate = {"accuracy": 0.97, "f1_macro": 0.96, "f1_weighted": 0.97, "precision_adelie": 1.0}
    baseline = {"accuracy": 0.44, "f1_macro": 0.20, "f1_weighted": 0.26, "precision_adelie": 0.44}
    decision = promotion_gate(candidate, None, task="multiclass", thresholds=GateThresholds(), baseline=baseline,
                              baseline_model="majority class")  # fmt: skip
    result = {
        "status": "registered", "model_name": "penguins", "version": "1", "promoted": True, "data_hash": "h",
        "rows": 292, "rows_unlabeled": 52, "metrics": candidate, "gate": decision.as_dict(), "window": [None, None],
    }  # fmt: skip
    md = ci.render_report(result)
    assert "| rows without a label (left out) | 52 |" in md
    assert "| **f1_macro** (primary) | 0.9600 | 0.2000 |" in md and "| metric | candidate | baseline (majority" in md
    assert "Champion: none (first model: held to the trivial baseline and the floors set)." in md
    assert ci.ci_summary(result)["rows_unlabeled"] == 52
    row = MonthRow("2013-03", 10, 0, 0.9, 0.1, False, False, None, False, "1", 0.95, metric="f1_macro")
    assert summary_table([row]).startswith(
        "| month | served by | live macro F1 | drift share | decided by | challenger gain | retrained? | promoted? "
        "| champion after "
        "| holdout macro F1"
    )
    spec = DatasetSpec(source="x", target="y", task="multiclass", numeric=["a"])
    assert live_score(["a", "b", "b", None], ["a", "b", "a", "a"], spec) == pytest.approx(2 / 3)
    binary = DatasetSpec(source="x", target="y", positive_class=1, numeric=["a"])
    assert live_score([1, 0, 1.0, 0], [1, 0, 0, 0], binary) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------------- 4. the gate
@pytest.fixture(scope="module")
def imbalanced():
    """Diabetes progression above 275 (7 % of the patients), a balanced logistic regression: a fine ranking (ROC-AUC
    0.78) with an F1 under the old fixed floor of 0.30 — the issue's case on real data."""
    df = load_diabetes(as_frame=True, scaled=False).frame
    df = df.assign(high=(df["target"] > 275).astype(int)).drop(columns="target")
    spec = DatasetSpec(source="x", target="high", positive_class=1, numeric=[c for c in df.columns if c != "high"])
    parts = training.split_dataset(df, spec, seed=SEED)
    lr = model_specs.ModelSpec(estimator="logistic_regression", params={"max_iter": 1000, "class_weight": "balanced"})
    model = training.train_model(parts, spec, lr, SEED)
    return spec, parts, evaluation.evaluate_model(model, parts.X_test, parts.y_test, spec, 1)


def test_by_default_a_model_must_beat_the_majority_class(imbalanced, fresh_settings):
    spec, parts, metrics = imbalanced
    assert metrics["f1"] < 0.30 < 0.7 < metrics["roc_auc"]
    baseline = evaluation.baseline_metrics(parts.X_train, parts.y_train, parts.X_test, parts.y_test, spec, 1)
    assert (baseline["f1"], baseline["roc_auc"]) == (0.0, 0.5)
    decision = promotion_gate(metrics, None, task="binary", thresholds=thresholds_from_settings(spec),
                              baseline=baseline, baseline_model="majority class")  # fmt: skip
    assert decision.passed, decision.reasons
    assert decision.reasons == [
        f"f1 {metrics['f1']:.4f} vs majority class baseline 0.0000: needs ≥ 0.0200 (margin +0.02) ok",
        f"roc_auc {metrics['roc_auc']:.4f} vs majority class baseline 0.5000: needs ≥ 0.5200 (margin +0.02) ok",
        "no champion yet: baseline and floors only",
    ]
    md = decision.markdown("m", "1")
    assert "| metric | candidate | champion | baseline (majority class) |" in md and "| f1 | " in md


def test_a_model_no_better_than_the_baseline_fails(imbalanced):
    spec, parts, _ = imbalanced
    never = evaluation.evaluate_model(evaluation.baseline_model("binary").fit(parts.X_train, parts.y_train),
                                      parts.X_test, parts.y_test, spec, 1)  # fmt: skip
    decision = promotion_gate(never, None, task="binary", thresholds=GateThresholds(), baseline=never,
                              baseline_model="majority class")  # fmt: skip
    assert not decision.passed
    assert [r.endswith("FAILED (baseline)") for r in decision.reasons[:2]] == [True, True]


def test_regression_must_beat_the_mean_by_a_relative_margin():
    df = sklearn_frame(load_diabetes)
    spec = DatasetSpec(source="x", target="target", task="regression", numeric=list(df.columns[:-1]))
    parts = training.split_dataset(df, spec, seed=SEED)
    model = training.train_model(parts, spec, model_specs.default_model_spec("regression"), SEED)
    metrics = evaluation.evaluate_model(model, parts.X_test, parts.y_test, spec)
    baseline = evaluation.baseline_metrics(parts.X_train, parts.y_train, parts.X_test, parts.y_test, spec)
    assert metrics["rmse"] < baseline["rmse"] * 0.98
    decision = promotion_gate(metrics, None, task="regression", thresholds=GateThresholds(), baseline=baseline,
                              baseline_model="mean")  # fmt: skip
    need = baseline["rmse"] * 0.98
    assert decision.passed and decision.reasons[0] == (
        f"rmse {metrics['rmse']:.4f} vs mean baseline {baseline['rmse']:.4f}: needs ≤ {need:.4f} (margin −2%) ok"
    )
    barely = {**metrics, "rmse": baseline["rmse"] * 0.99}
    assert not promotion_gate(barely, None, task="regression", thresholds=GateThresholds(), baseline=baseline).passed


def test_env_floors_still_apply_and_the_spec_wins_for_its_model(imbalanced, fresh_settings):
    spec, parts, metrics = imbalanced
    baseline = evaluation.baseline_metrics(parts.X_train, parts.y_train, parts.X_test, parts.y_test, spec, 1)
    fresh_settings.setenv("FLYWHEEL_GATE_MIN_F1", "0.30")
    fresh_settings.setenv("FLYWHEEL_GATE_BASELINE_MARGIN", "0.05")
    from flywheel.core.settings import get_settings

    get_settings.cache_clear()
    env_only = thresholds_from_settings(spec)
    assert (env_only.min_f1, env_only.baseline_margin, env_only.min_roc_auc) == (0.30, 0.05, None)
    decision = promotion_gate(metrics, None, task="binary", thresholds=env_only, baseline=baseline)
    assert not decision.passed and f"f1 {metrics['f1']:.4f} >= 0.3 FAILED (floor)" in decision.reasons

    own = spec.model_copy(update={"gate": GateSpec(min_f1=0.2, min_roc_auc=0.7)})
    mine = thresholds_from_settings(own)
    assert (mine.min_f1, mine.min_roc_auc, mine.baseline_margin) == (0.2, 0.7, 0.05)  # spec wins, the rest from env
    assert promotion_gate(metrics, None, task="binary", thresholds=mine, baseline=baseline).passed


def test_gate_section_of_a_spec_file(tmp_path):
    path = tmp_path / "churn.yaml"
    text = "source: x.csv\ntarget: y\npositive_class: 1\nnumeric: [a]\ngate:\n  min_f1: 0.25\n  baseline_margin: 0.1\n"
    path.write_text(text)
    assert load_spec(path).gate.overrides() == {"min_f1": 0.25, "baseline_margin": 0.1}
    path.write_text(text + "  min_f2: 0.3\n")
    with pytest.raises(SpecError, match="gate.min_f2"):
        load_spec(path)


def test_gate_task_fits_the_baseline_on_the_training_split(imbalanced, tmp_path, monkeypatch):
    """The flow's gate task: the baseline from the training split scored on the holdout; no champion yet."""
    import mlflow

    from flywheel.tasks.gate import gate

    spec, parts, metrics = imbalanced
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        decision = gate.fn(metrics, "nobody-yet", parts, spec, GateThresholds(min_f1=0.3))
    finally:
        mlflow.set_tracking_uri(previous)
    assert decision.baseline_model == "majority class" and decision.baseline["roc_auc"] == 0.5
    assert not decision.passed and decision.champion is None
    assert decision.as_dict()["baseline"] == decision.baseline


def test_the_wine_table_as_binary_keeps_working():
    df = sklearn_frame(load_wine)
    df["target"] = (df["target"] == 0).astype(int)
    spec = DatasetSpec(source="x", target="target", positive_class=1, numeric=list(df.columns[:-1]))
    parts = training.split_dataset(df, spec, seed=SEED)
    model = training.train_model(parts, spec, model_specs.default_model_spec("binary"), SEED)
    metrics = evaluation.evaluate_model(model, parts.X_test, parts.y_test, spec, 1)
    assert set(metrics) == {"accuracy", "precision", "recall", "f1", "roc_auc"} and metrics["f1"] > 0.9
    assert validation.validate_dataset(df, spec, min_rows=100).rows_unlabeled == 0
