"""A user's own table through the real `train` flow (real MLflow and Prefect servers): the Palmer penguins as a
multiclass task, with labels blanked, integer columns, missing values and columns the model does not use; the
registered model then predicts the user's raw rows in process (issue 14)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration

SPECIES = {"Adelie", "Chinstrap", "Gentoo"}


@pytest.fixture
def flow_env(tracking, prefect_server, fresh_settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking)


@pytest.fixture
def penguins() -> pd.DataFrame:
    """The real penguins as a user's table: an id, `year` as an int64 number, the island as an int64 code (a number
    used as a category), a free-text column the spec drops, NaN in numeric and categorical columns, and 12 % of the
    species missing (NaN or blank text)."""
    from palmerpenguins import load_penguins

    df = load_penguins().reset_index(names="penguin_id")
    df["island_code"] = df["island"].map({"Biscoe": 1, "Dream": 2, "Torgersen": 3}).astype("int64")
    df["note"] = "field season " + df["year"].astype(str)
    blank = df.sample(frac=0.12, random_state=0).index
    df["species"] = df["species"].astype(object)
    df.loc[blank[::2], "species"] = np.nan
    df.loc[blank[1::2], "species"] = ""
    assert df["year"].dtype == "int64" and df["island_code"].dtype == "int64"
    return df


def test_penguins_as_multiclass_through_the_train_flow(flow_env, model_name, penguins, tmp_path):
    import mlflow.pyfunc

    from flywheel.flows.train import train

    client = flow_env
    data = tmp_path / "penguins.csv"
    penguins.to_csv(data, index=False)
    spec = {
        "name": "penguins",
        "source": str(data),
        "target": "species",
        "task": "multiclass",
        "numeric": ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"],
        "categorical": ["island_code", "sex"],
        "drop": ["penguin_id", "note", "island"],
        "gate": {"min_f1_macro": 0.5},  # a floor for this model only (no FLYWHEEL_GATE_* is set)
    }
    spec_path = tmp_path / "penguins.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    unlabeled = int(penguins["species"].isna().sum() + (penguins["species"] == "").sum())

    result = train(spec_path=str(spec_path), model_name=model_name)

    assert result["status"] == "registered" and result["promoted"] is True, result
    assert result["rows_unlabeled"] == unlabeled and result["rows"] == len(penguins) - unlabeled
    metrics = result["metrics"]
    assert {"accuracy", "f1_macro", "f1_weighted"} <= set(metrics) and metrics["f1_macro"] > 0.9
    assert {f"{m}_{s.lower()}" for s in SPECIES for m in ("precision", "recall")} <= set(metrics)
    split, *reasons = result["gate"]["reasons"]  # the first reason states the split
    assert split.startswith("random holdout of ") and "no event time" in split, split
    assert reasons[0].startswith(f"f1_macro {metrics['f1_macro']:.4f} vs majority class baseline")
    assert "(margin +0.02) ok" in reasons[0]
    assert f"f1_macro {metrics['f1_macro']:.4f} >= 0.5 ok" in reasons
    assert result["gate"]["baseline"]["f1_macro"] < 0.3

    version = client.get_model_version(model_name, result["version"])
    assert version.tags["rows_unlabeled"] == str(unlabeled) and version.tags["gate_passed"] == "true"
    run = client.get_run(version.run_id)
    assert "holdout_f1_macro" in run.data.metrics and "holdout_precision_gentoo" in run.data.metrics
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(version.run_id)}
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.params["rows_unlabeled"] == str(unlabeled)
    assert parent.data.params["rows"] == str(len(penguins) - unlabeled)

    # The registered model takes the user's raw rows: int64 columns, NaN features, and the target, the id and the
    # dropped columns still there (ignored as MLflow ignores extra columns).
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    gaps = penguins.loc[penguins[["bill_length_mm", "sex"]].isna().any(axis=1)]
    rows = pd.concat([gaps, penguins.sample(n=200, random_state=1)])
    assert rows["year"].dtype == "int64" and rows["bill_length_mm"].isna().any() and rows["sex"].isna().any()
    preds = model.predict(rows)
    assert len(preds) == len(rows) and set(preds) <= SPECIES
    labelled = rows["species"].isin(SPECIES)
    assert (preds[labelled.to_numpy()] == rows.loc[labelled, "species"].to_numpy()).mean() > 0.9

    # An integer column with a missing value arrives as float; a float column of whole numbers as int64.
    odd = rows.head(20).copy()
    odd["year"] = odd["year"].astype(float)
    odd.iloc[0, odd.columns.get_loc("year")] = np.nan
    odd["body_mass_g"] = odd["body_mass_g"].fillna(4000).round().astype("int64")
    odd["island_code"] = odd["island_code"].astype(str)
    assert set(model.predict(odd)) <= SPECIES
    assert list(model.predict(odd.drop(columns=["species", "penguin_id", "note", "island"]))) == list(
        model.predict(odd)
    )
