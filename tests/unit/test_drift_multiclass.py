"""Drift of a multiclass model (issue 14, item 3) on the real Palmer penguins: the predicted species mix is a
(categorical) drift column, and with late labels Evidently's classification preset measures the champion's quality
then and now (F1, precision and recall macro-averaged). Binary and regression checks are unchanged.

The reference is half of the penguins with a classifier's predictions on them; the current data the other half,
as served (steady), or resampled to a Gentoo-heavy mix (shifted). Below 1,000 reference rows Evidently tests
categories with chi-square p-values.
"""

from __future__ import annotations

import pandas as pd
import pytest
from sklearn.metrics import f1_score

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import drift, monitoring, retrain_policy
from flywheel.tasks.drift import class_labels, compute_drift

NUMERIC = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
CATEGORICAL = ["island", "sex"]
COLUMNS = NUMERIC + CATEGORICAL
SHARE = drift.DEFAULT_DRIFT_SHARE


@pytest.fixture(scope="module")
def penguins() -> pd.DataFrame:
    from palmerpenguins import load_penguins

    return load_penguins().dropna(subset=NUMERIC).reset_index(drop=True)


@pytest.fixture(scope="module")
def halves(penguins):
    """(reference, served) halves with a species classifier's predictions, trained on the reference half."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    ref = penguins.sample(frac=0.5, random_state=3)
    cur = penguins.drop(index=ref.index)
    pre = ColumnTransformer([
        ("num", StandardScaler(), NUMERIC),
        ("cat", make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
         CATEGORICAL),
    ])  # fmt: skip
    model = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=1000))]).fit(ref[COLUMNS], ref["species"])
    predicted = [f.assign(prediction=model.predict(f[COLUMNS])).reset_index(drop=True) for f in (ref, cur)]
    return predicted[0], predicted[1]


@pytest.fixture(scope="module")
def shifted(halves) -> pd.DataFrame:
    """The served half resampled to mostly Gentoo (the class mix moves, and the features with it)."""
    cur = halves[1]
    weights = cur["species"].map({"Gentoo": 8.0, "Adelie": 1.0, "Chinstrap": 1.0})
    return cur.sample(n=300, replace=True, weights=weights, random_state=5).reset_index(drop=True)


def multiclass(reference, current, **kw):
    return compute_drift(reference, current, COLUMNS, drift_share=SHARE, task="multiclass", prediction="prediction",
                         categorical=CATEGORICAL, min_rows=100, **kw)  # fmt: skip


def test_the_predicted_class_mix_is_a_categorical_drift_column(halves):
    result = multiclass(*halves)
    assert [c.column for c in result.columns] == [*COLUMNS, "prediction"]
    predicted = result.column("prediction")
    assert predicted.kind == "categorical" and predicted.direction == "p_value"
    assert not predicted.drifted and not result.dataset_drift  # the other half of the same penguins
    assert result.quality is None  # no labels: no quality


def test_a_shifted_class_mix_drifts_in_the_predictions(halves, shifted):
    result = multiclass(halves[0], shifted)
    predicted = result.column("prediction")
    assert predicted.drifted and predicted.score < 1e-6
    assert "prediction" in [c.column for c in result.drifted_columns]
    assert result.dataset_drift  # Gentoo are bigger birds on one island: most columns move with them


def test_late_labels_give_macro_quality_then_and_now(halves, shifted):
    ref, cur = halves[0], shifted.copy()
    wrong = cur.index % 3 == 0  # a third of the late labels disagree with what the model saw
    cur.loc[wrong, "species"] = cur.loc[wrong, "species"].map({"Adelie": "Gentoo", "Gentoo": "Chinstrap",
                                                              "Chinstrap": "Adelie"})  # fmt: skip
    result = multiclass(ref, cur, target="species")
    assert result.quality_metric == "f1_macro"  # named as the training run's metric
    assert {"accuracy", "precision_macro", "recall_macro", "f1_macro"} <= set(result.quality["current"])
    expected = {side: f1_score(frame["species"], frame["prediction"], average="macro")
                for side, frame in (("reference", ref), ("current", cur))}  # fmt: skip
    assert result.quality["reference"]["f1_macro"] == pytest.approx(expected["reference"], abs=1e-9)
    assert result.quality["current"]["f1_macro"] == pytest.approx(expected["current"], abs=1e-9)
    assert result.quality_decay > drift.DEFAULT_MAX_QUALITY_DECAY
    assert [c.column for c in result.columns] == [*COLUMNS, "prediction"]  # the target is not drift-checked
    decision = retrain_policy.should_retrain(result, now_event_time="2009-12-31", last_retrain_event_time=None,
                                             cooldown=7, min_rows=100, in_flight=False)  # fmt: skip
    assert decision.retrain and any(r.startswith("quality decay: f1_macro") for r in decision.reasons)


def test_labels_and_predictions_of_other_dtypes_compare_as_the_same_classes(halves):
    """Late labels read from a CSV with a gap come as floats, predictions as ints: 2.0 and 2 are one class."""
    codes = {"Adelie": 0, "Chinstrap": 1, "Gentoo": 2}
    ref, cur = (f.assign(species=f["species"].map(codes).astype("float64"), prediction=f["prediction"].map(codes))
                for f in halves)  # fmt: skip
    result = multiclass(ref, cur, target="species")
    assert result.quality["current"]["f1_macro"] == pytest.approx(
        f1_score(cur["species"].astype(int), cur["prediction"], average="macro"), abs=1e-9
    )
    assert class_labels(pd.Series([2.0, 1.0, None])).tolist() == ["2", "1", None]
    assert class_labels(pd.Series(["Adelie", None])).tolist() == ["Adelie", None]
    assert class_labels(pd.Series([True, False])).tolist() == ["True", "False"]


def test_binary_and_regression_do_not_drift_check_the_prediction(halves):
    ref, cur = (f.assign(prediction=(f["species"] == "Gentoo").astype(int)) for f in halves)
    binary = compute_drift(ref, cur, COLUMNS, drift_share=SHARE, task="binary", prediction="prediction",
                           categorical=CATEGORICAL, min_rows=100)  # fmt: skip
    assert [c.column for c in binary.columns] == COLUMNS
    assert any("no quality metrics" in w for w in binary.warnings)  # as before: a prediction alone adds nothing
    regression = compute_drift(ref, cur, NUMERIC[:3], drift_share=SHARE, task="regression", target="body_mass_g",
                               prediction="prediction", min_rows=100)  # fmt: skip
    assert [c.column for c in regression.columns] == NUMERIC[:3] and regression.quality_metric == "rmse"


@pytest.fixture
def small_floor(monkeypatch):
    """The drift check's settings with a row floor the penguins clear."""
    from flywheel.core.settings import get_settings

    monkeypatch.setenv("FLYWHEEL_DRIFT_MIN_ROWS", "100")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_check_drift_steps_add_the_champions_predictions_for_a_multiclass_spec(
    halves, shifted, tmp_path, small_floor
):
    """measure_drift on a multiclass spec drift-checks the served predictions against the champion's own on its
    reference (a reference that already carries them, as a served one does, is left as it is)."""
    spec = DatasetSpec(name="penguins", source="unused", target="species", task="multiclass", numeric=NUMERIC,
                       categorical=CATEGORICAL)  # fmt: skip
    reference = monitoring.champion_predictions(halves[0], spec, champion=None)  # has them: no model is loaded
    assert reference is halves[0]
    result = monitoring.measure_drift(reference, shifted, spec, tmp_path / "drift.html", labelled=False)
    assert result.column("prediction").drifted and result.quality is None
    labelled = monitoring.measure_drift(reference, shifted, spec, tmp_path / "drift.html", labelled=True)
    assert labelled.quality_metric == "f1_macro" and "f1_macro" in labelled.quality["reference"]
