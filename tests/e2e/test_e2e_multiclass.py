"""A user's own multiclass table through the whole loop (issue 14): `flywheel train --spec` on the Palmer penguins
(three species, an int64 column, missing values in features and labels), the gate promotes, the alias move deploys
it on a running `flywheel up`, and raw rows of the table — int64 columns, NaN, and the target and extra columns
still in them — score over HTTP with class labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from stacks import running_stack, wait_for  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODEL = "penguins-e2e"


def test_multiclass_table_trains_deploys_and_scores_raw_rows(tmp_path):
    import palmerpenguins

    table = palmerpenguins.load_penguins()
    table["id"] = range(len(table))
    table.loc[table.index[::10], "species"] = None  # rows without a label
    data = tmp_path / "penguins.csv"
    table.to_csv(data, index=False)
    spec = tmp_path / "penguins.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "penguins", "source": str(data), "target": "species", "task": "multiclass",
        "numeric": ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"],
        "categorical": ["island", "sex"], "drop": ["id"],
    }))  # fmt: skip

    with running_stack(tmp_path / "state", MODEL, FLYWHEEL_MIN_ROWS="100") as (_, urls, env):
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("flywheel")), "train", "--spec", str(spec)],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "rows without a label" in proc.stdout + proc.stderr

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=urls["mlflow_url"])
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert "f1_macro" in champion.tags.get("gate_reasons", "")

        def serving_champion():
            info = httpx.get(urls["model_url"] + "/version", timeout=5).json()
            return str(info.get("model_version")) == str(champion.version)

        wait_for("the champion serving", serving_champion, timeout=300, interval=1)

        raw = table.sample(40, random_state=0)  # int64 year, NaN features, the target and id still in
        records = raw.astype(object).where(raw.notna(), None).to_dict(orient="split")
        resp = httpx.post(
            urls["model_url"] + "/invocations",
            json={"dataframe_split": {"columns": records["columns"], "data": records["data"]}}, timeout=30,
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
        predictions = resp.json()["predictions"]
        assert len(predictions) == len(raw)
        assert set(predictions) <= {"Adelie", "Chinstrap", "Gentoo"} and len(set(predictions)) >= 2
