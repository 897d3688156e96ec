"""Versions registered outside Flywheel, on a real `flywheel up` stack (issue 14, item 6).

A notebook's model — `mlflow.sklearn.log_model(..., serialization_format="cloudpickle", input_example=...,
registered_model_name=...)` on scikit-learn's wine data, with no run, no Flywheel tag and no holdout sample — made
`champion` through MlflowClient is deployed by the webhook path like any version: smoke-tested on its own input
example, served, scoring over HTTP. A version whose predict raises is then tried on the rows the model server
served (neither it nor the champion has a holdout sample) and refused for its own failure, the ledger naming the
prediction error and the rows, while v1 keeps serving every request.

The tests run in order and build on each other's registry state.
"""

from __future__ import annotations

import json
import re
import textwrap
import time

import httpx
import pandas as pd
import pytest
from stacks import Traffic, ledger_rows, running_stack, served_version, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "wine-notebook-it"

BROKEN_MODEL = textwrap.dedent(
    """
    import mlflow.pyfunc
    from mlflow.models import set_model


    class Broken(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            raise RuntimeError("this model is broken on purpose")


    set_model(Broken())
    """
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack"), MODEL) as started:
        yield started


@pytest.fixture(scope="module")
def client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack[1]["mlflow_url"])


@pytest.fixture(scope="module")
def wine():
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True, as_frame=True)
    return X, y


@pytest.fixture(scope="module")
def notebook(stack):
    """MLflow as a notebook user has it: the stack's tracking server, an experiment of their own, no active run."""
    import mlflow

    mlflow.set_tracking_uri(stack[1]["mlflow_url"])
    mlflow.set_experiment("a-notebook")
    return mlflow


def deploy_runs(urls, version: str) -> list[dict]:
    """The finished deploy-model runs of `version`, as the Prefect API has them."""
    resp = httpx.post(
        urls["prefect_api_url"] + "/flow_runs/filter",
        json={"flows": {"name": {"any_": ["deploy-model"]}},
              "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}, "limit": 50},
        timeout=10,
    )  # fmt: skip
    resp.raise_for_status()
    return [r for r in resp.json() if str(r["parameters"].get("version")) == version]


def score(urls, frame: pd.DataFrame) -> httpx.Response:
    split = json.loads(frame.to_json(orient="split", index=False))
    return httpx.post(urls["model_url"] + "/invocations", json={"dataframe_split": split}, timeout=30)


def test_a_notebook_model_made_champion_is_deployed_and_serves(stack, client, notebook, wine):
    from sklearn.ensemble import RandomForestClassifier

    _, urls, _ = stack
    X, y = wine
    model = RandomForestClassifier(n_estimators=50, random_state=0).fit(X, y)
    notebook.sklearn.log_model(model, name="model", input_example=X.head(5), registered_model_name=MODEL,
                               serialization_format="cloudpickle")  # fmt: skip
    v1 = client.get_model_version(MODEL, "1")
    assert not v1.run_id and not v1.tags  # no run, none of Flywheel's tags

    client.set_registered_model_alias(MODEL, "champion", "1")
    runs = wait_for("v1's deploy-model run to finish", lambda: deploy_runs(urls, "1"), timeout=300, interval=2)
    assert runs[0]["state_type"] == "COMPLETED", runs[0]["state"]
    wait_for("the model server to serve v1", lambda: served_version(urls) == "1", timeout=60)
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["deploy_outcome"] == "serving", tags.get("deploy_reason")
    assert tags["deploy_trigger"] == "event"  # the webhook → bridge → Prefect event path
    assert tags["deploy_reason"].startswith(
        "smoke test passed on 5 rows of v1's input example (none found: v1's holdout sample, the latest served rows)"
    )
    rows = wait_for("the ledger artifact", lambda: ledger_rows(urls, MODEL))
    assert rows[0]["version"] == "1" and rows[0]["outcome"] == "serving"

    for start in range(0, len(X), 30):  # traffic, recorded in the request log for the next test
        resp = score(urls, X.iloc[start : start + 30])
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Flywheel-Model-Version"] == "1"
        assert resp.json()["predictions"] == model.predict(X.iloc[start : start + 30]).tolist()


def test_a_version_whose_predict_raises_is_refused_for_it_and_v1_keeps_serving(stack, client, notebook, wine,
                                                                               tmp_path):  # fmt: skip
    st, urls, _ = stack
    X, _ = wine
    wait_for("the served rows in the request log",
             lambda: list((st.root / "serving" / "production").rglob("part-*.parquet")), timeout=30)  # fmt: skip
    code = tmp_path / "broken.py"
    code.write_text(BROKEN_MODEL)
    notebook.pyfunc.log_model(name="model", python_model=str(code), registered_model_name=MODEL)
    records = X.head(40).to_dict(orient="records")

    with Traffic(urls["model_url"], records) as traffic:
        client.set_registered_model_alias(MODEL, "champion", "2")
        outcome = wait_for("v2's deployment to fail", lambda: client.get_model_version(MODEL, "2").tags.get(
            "deploy_outcome"), timeout=300)  # fmt: skip
        time.sleep(2)
    assert outcome == "failed-smoke"
    reason = client.get_model_version(MODEL, "2").tags["deploy_reason"]
    assert re.match(
        r"smoke test failed on \d+ rows of the latest served rows \(none found: v2's holdout sample, "
        r"the champion v1's holdout sample\); the serving version fails 0 of them: predictions that error: ", reason
    ), reason
    assert "RuntimeError: this model is broken on purpose" in reason and "moved back to v1" in reason
    assert "Failed to download" not in reason
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert served_version(urls) == "1"
    assert traffic.statuses and set(traffic.statuses) == {200}, f"failed requests: {set(traffic.statuses)}"
    assert set(traffic.versions) == {"1"}
    rows = wait_for("v2's ledger row", lambda: [r for r in ledger_rows(urls, MODEL) if r["version"] == "2"])
    assert rows[0]["outcome"] == "failed-smoke" and "broken on purpose" in rows[0]["reason"]
