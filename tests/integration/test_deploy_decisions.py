"""The deploy side's decisions on a real `flywheel up` stack, checked by their end states.

One stack for the module; the tests run in order and build on each other's registry state. The versions are small
models-from-code (registered the way a notebook would, with an input example and no Flywheel artefact), so no
training is needed: `picky` refuses rows with x > 1000 (a client's bad input, which every picky version refuses
alike); `turns-bad` passes its smoke test and then fails every prediction.

- a first deployment under bad traffic breaches its watch, has nothing to roll back to, says so and keeps serving;
- a second picky version on the same bad traffic is not vetoed (compared with v1's own error rate);
- a version that turns bad after the switch is rolled back and its tags say so, by what and why;
- a newer move supersedes a deployment in its watch; a run for an older move ends at once as Superseded;
- `rollback/manual` (the CLI's module) moves champion back and records the rolled-back version and the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from stacks import Traffic, prefect_api, running_stack, served_version, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "deploy-decisions-it"
WATCH_SECONDS = "8"
GOOD = {"x": 1.0, "y": 0.5}
BAD = {"x": 5000.0, "y": 0.5}  # the picky versions refuse it (PREDICTION_FAILED), as every version of them does

PICKY = textwrap.dedent(
    """
    import pandas as pd
    import mlflow.pyfunc
    from mlflow.models import set_model


    class Picky(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            if (model_input["x"] > 1000).any():
                raise ValueError("x is out of range")
            return pd.Series([0] * len(model_input))


    set_model(Picky())
    """
)

TURNS_BAD = textwrap.dedent(
    """
    import pandas as pd
    import mlflow.pyfunc
    from mlflow.models import set_model


    class TurnsBad(mlflow.pyfunc.PythonModel):
        calls = 0

        def predict(self, context, model_input, params=None):
            TurnsBad.calls += 1
            if TurnsBad.calls > 150:  # after warm-up and the smoke test (100 rows alone + 1 batch)
                raise RuntimeError("this version turned bad after its smoke test")
            return pd.Series([0] * len(model_input))


    set_model(TurnsBad())
    """
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack"), MODEL, FLYWHEEL_DEPLOY_WATCH_SECONDS=WATCH_SECONDS) as st:
        yield st


@pytest.fixture(scope="module")
def client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack[1]["mlflow_url"])


@pytest.fixture(scope="module")
def register(stack, tmp_path_factory):
    """register(code) → the new version of MODEL, logged from `code` with an input example of good rows."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(stack[1]["mlflow_url"])
    mlflow.set_experiment("deploy-decisions")
    folder = tmp_path_factory.mktemp("models")

    def _register(code: str) -> str:
        path = folder / f"model_{time.monotonic_ns()}.py"
        path.write_text(code)
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(path), input_example=pd.DataFrame([GOOD, GOOD, GOOD]),
                registered_model_name=MODEL, pip_requirements=["mlflow", "pandas"],
            )  # fmt: skip
        return str(info.registered_model_version)

    return _register


def tags(client, version: str) -> dict:
    return client.get_model_version(MODEL, version).tags


def outcome_of(client, version: str) -> str | None:
    return tags(client, version).get("deploy_outcome")


def deploy_runs(urls, version: str) -> list[dict]:
    runs = prefect_api(urls, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["deploy-model"]}},
                                                                "limit": 200})  # fmt: skip
    return [r for r in runs if str(r["parameters"].get("version")) == version]


def final(run: dict) -> bool:
    return run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def test_a_first_deployment_under_bad_traffic_keeps_serving(stack, client, register):
    _, urls, _ = stack
    v1 = register(PICKY)
    with Traffic(urls["model_url"], [GOOD, BAD]) as traffic:
        client.set_registered_model_alias(MODEL, "champion", v1)
        wait_for("v1 to serve", lambda: served_version(urls) == v1, timeout=180)
        wait_for("v1's ledger tags", lambda: outcome_of(client, v1), timeout=120)
    t = tags(client, v1)
    assert t["deploy_outcome"] == "serving", t.get("deploy_reason")
    assert "breach" in t["deploy_reason"] and "a first deployment has nothing to roll back to" in t["deploy_reason"]
    assert "rule: requests refused as bad input never count" in t["deploy_watch"]
    assert served_version(urls) == v1  # it kept serving: no /admin/rollback with an empty standby
    (run,) = wait_for("v1's run to end", lambda: [r for r in deploy_runs(urls, v1) if final(r)], timeout=60)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert 400 in traffic.statuses and 200 in traffic.statuses
    model = client.get_registered_model(MODEL)
    assert model.tags["last_deployment"].startswith(f"v{v1} → champion (local): serving at ")
    assert "127.0.0.1" not in model.tags["last_deployment_json"] and "url" not in model.tags["last_deployment_json"]


def test_input_the_previous_version_also_refuses_does_not_veto_the_new_one(stack, client, register):
    _, urls, _ = stack
    v1 = served_version(urls)
    v2 = register(PICKY)
    with Traffic(urls["model_url"], [GOOD, BAD]):
        client.set_registered_model_alias(MODEL, "champion", v2)
        wait_for("v2 to serve", lambda: served_version(urls) == v2, timeout=180)
        wait_for("v2's ledger tags", lambda: outcome_of(client, v2), timeout=120)
    t = tags(client, v2)
    assert t["deploy_outcome"] == "serving", t.get("deploy_reason")
    assert "held: " in t["deploy_watch"] and f"v{v1} " in t["deploy_watch"], t["deploy_watch"]
    # Up to 100 rows: as many of the latest served rows as there are; the ledger states what that many rules out.
    found = re.search(r"smoke test passed on (\d+) rows of the latest served rows", t["deploy_reason"])
    assert found and 0 < int(found.group(1)) <= 100, t["deploy_reason"]
    assert re.search(rf"no error in {found.group(1)} rows rules out an error rate above [\d.]+% at 95% confidence",
                     t["deploy_reason"]), t["deploy_reason"]  # fmt: skip
    assert served_version(urls) == v2


def test_a_version_that_turns_bad_after_the_switch_is_rolled_back_and_says_so(stack, client, register):
    _, urls, _ = stack
    v2 = served_version(urls)
    v3 = register(TURNS_BAD)
    with Traffic(urls["model_url"], [GOOD]):
        client.set_registered_model_alias(MODEL, "champion", v3)
        outcome = wait_for("v3's ledger tags", lambda: outcome_of(client, v3), timeout=240)
    t = tags(client, v3)
    assert outcome == "rolled-back-live", t.get("deploy_reason")
    assert t["deploy_rolled_back_by"].startswith("the post-switch watch of deploy-model run ")
    assert "breach" in t["deploy_rolled_back_reason"] and t["deploy_rolled_back_to"] == v2
    assert served_version(urls) == v2
    assert client.get_model_version_by_alias(MODEL, "champion").version == v2


def test_a_newer_move_supersedes_a_watch_and_an_older_move_ends_at_once(stack, client, register):
    _, urls, _ = stack
    v4, v5, v6, v7 = (register(PICKY) for _ in range(4))
    client.set_registered_model_alias(MODEL, "champion", v4)
    wait_for("v4 to serve", lambda: served_version(urls) == v4, timeout=180)
    client.set_registered_model_alias(MODEL, "champion", v5)  # v4 is in its 8 s watch
    wait_for("v5 to serve", lambda: served_version(urls) == v5, timeout=180)
    t4 = wait_for("v4's ledger tags", lambda: outcome_of(client, v4) and tags(client, v4), timeout=60)
    assert t4["deploy_outcome"] == "superseded", t4.get("deploy_reason")
    assert "watch ended early after" in t4["deploy_reason"] and f"moved on to v{v5}" in t4["deploy_reason"]
    assert wait_for("v5's ledger tags", lambda: outcome_of(client, v5), timeout=60) == "serving"
    # Two moves at once: the run for v6 finds the alias at v7 and ends Superseded, without deploying or failing.
    client.set_registered_model_alias(MODEL, "champion", v6)
    client.set_registered_model_alias(MODEL, "champion", v7)
    wait_for("v7 to serve", lambda: served_version(urls) == v7, timeout=180)
    (run6,) = wait_for("v6's run to end", lambda: [r for r in deploy_runs(urls, v6) if final(r)], timeout=120)
    assert run6["state_type"] == "COMPLETED" and run6["state_name"] == "Superseded", run6["state"]
    assert f"moved on to v{v7}" in run6["state"]["message"]
    assert "deploy_outcome" not in tags(client, v6)
    assert wait_for("v7's ledger tags", lambda: outcome_of(client, v7), timeout=60) == "serving"


def test_rollback_runs_through_its_deployment_and_records_why(stack, client):
    _, urls, env = stack
    v7 = served_version(urls)
    code = (
        "from flywheel.cli.rollback import run_rollback\n"
        "from flywheel.core.settings import get_settings\n"
        "run_rollback(get_settings(), None, None, 'integration test: v7 misbehaves')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    v5 = "5"  # the newest version before v7 that served and stayed (v6 never served; v4 was superseded)
    assert f"v{v7} → v{v5}" in proc.stdout, proc.stdout
    assert served_version(urls) == v5 and client.get_model_version_by_alias(MODEL, "champion").version == v5
    t = tags(client, v7)
    assert t["deploy_outcome"] == "rolled-back" and t["deploy_rolled_back_reason"] == "integration test: v7 misbehaves"
    assert t["deploy_rolled_back_by"].endswith("(flywheel rollback)") and t["deploy_rolled_back_to"] == v5
    (run,) = prefect_api(urls, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["rollback"]}}})
    assert run["deployment_id"] and run["state_type"] == "COMPLETED"
    assert run["parameters"]["reason"] == "integration test: v7 misbehaves"
