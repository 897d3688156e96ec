"""Alerts: Prefect automations post Slack-compatible JSON to a webhook receiver on loopback.

A real Prefect server evaluates the triggers and sends the notifications itself, for events the real emitters send:
a `train` flow run that fails (its data source is gone), and the `check-drift` flow's verdicts on the session's
trained champion — March (no drift: no alert) and July (drift: an alert). The rollback alert comes from a real
failed deployment on a `flywheel up` stack: test_deploy.py's broken version.
"""

from __future__ import annotations

import time

import pytest
from stacks import Receiver

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def _log_as_served(frame, model_name) -> None:
    """Rows as the model server records them, in the request log the drift check reads."""
    from flywheel.serving.request_log import RequestLogWriter
    from flywheel.tasks.monitoring import serving_log_dir

    writer = RequestLogWriter(serving_log_dir(), model_name)
    writer.start()
    inputs = frame.drop(columns=["late"]).reset_index(drop=True)
    writer.append(inputs, [0] * len(inputs), version="1", request_ids=[f"r{i}" for i in range(len(inputs))],
                  ts=time.time())  # fmt: skip
    writer.close()


def test_failed_run_and_drift_are_notified(tracking, prefect_server, fresh_settings, model_name, tmp_path, receiver,
                                           champion_copy):  # fmt: skip
    from mlflow import MlflowClient
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from flywheel.core.spec import load_spec
    from flywheel.deployments.alerts import ensure_alerts
    from flywheel.flows.check_drift import check_drift
    from flywheel.flows.train import train
    from flywheel.tasks import data

    fresh_settings.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
    names = ensure_alerts(receiver.url)
    assert ensure_alerts(receiver.url) == names  # idempotent: re-created, not duplicated
    for name in names:
        assert Automation.read(name=name).enabled

    # A real failing run: the train flow, its data source gone.
    state = train(data_uri=str(tmp_path / "gone.csv"), model_name=f"{model_name}-gone", return_state=True)
    assert state.is_failed(), state
    with get_client(sync_client=True) as prefect:
        run_name = prefect.read_flow_run(state.state_details.flow_run_id).name
    failed = receiver.wait_text(f"train run {run_name}")
    assert "Failed" in failed["json"]["text"] and "gone.csv" in failed["json"]["text"], failed["json"]
    assert failed["content_type"].startswith("application/json")

    # Real drift verdicts: March does not drift (no alert), then July drifts (an alert).
    assert champion_copy(MlflowClient(tracking), model_name) == "1"
    spec = load_spec(None)
    march = tmp_path / "march.parquet"
    data.pull_dataset(spec, "2013-03-01", "2013-04-01").to_parquet(march)
    calm = check_drift(model_name=model_name, current_uri=str(march))
    assert not calm["dataset_drift"], calm
    _log_as_served(data.pull_dataset(spec, "2013-07-01", "2013-08-01"), model_name)
    drifted = check_drift(model_name=model_name, start="2013-07-01", end="2013-08-01")
    assert drifted["dataset_drift"], drifted
    drift = receiver.wait_text(f"drift in {model_name}")
    text = drift["json"]["text"]
    assert f"{round(drifted['drift_share'], 4)}" in text and "2013-07-01" in text, text
    # July's alert came after March's verdict: a March alert would be here by now.
    mine = [t for t in receiver.texts() if model_name in t and "drift share" in t]
    assert len(mine) == 1, mine
