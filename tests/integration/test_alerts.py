"""Alerts: Prefect automations post Slack-compatible JSON to a webhook receiver on loopback.

A real Prefect server evaluates the triggers and sends the notifications itself: a failed `train` run, a
deployment that did not stay deployed, and a drift verdict with dataset drift (and not one without).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            got.append({"content_type": self.headers.get("Content-Type"), "json": json.loads(body)})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    server.shutdown()
    server.server_close()


def _wait_for(got: list[dict], needle: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in got:
            if needle in message["json"].get("text", ""):
                return message
        time.sleep(0.5)
    raise AssertionError(f"no alert containing {needle!r} within {timeout:.0f}s; got {[m['json'] for m in got]}")


def test_failed_run_rollback_and_drift_are_notified(prefect_server, receiver):
    from prefect import flow
    from prefect.events import emit_event

    from flywheel.core.events import DRIFT_CHECKED_EVENT, ROLLED_BACK_EVENT
    from flywheel.deployments.alerts import ensure_alerts

    url, got = receiver
    names = ensure_alerts(url)
    assert ensure_alerts(url) == names  # idempotent: re-created, not duplicated
    from prefect.automations import Automation

    for name in names:
        assert Automation.read(name=name).enabled

    @flow(name="train")
    def failing_train():
        raise RuntimeError("the data source is gone")

    with pytest.raises(RuntimeError):
        failing_train()

    resource = {"prefect.resource.id": "flywheel.model.alert-test", "prefect.resource.name": "alert-test"}
    emit_event(event=ROLLED_BACK_EVENT, resource=resource,
               payload={"name": "alert-test", "version": "7", "alias": "champion", "outcome": "failed-smoke",
                        "reason": "smoke test failed: error rate 100%"})  # fmt: skip
    emit_event(
        event=DRIFT_CHECKED_EVENT,
        resource={**resource, "flywheel.dataset_drift": "false"},
        payload={"model_name": "alert-test", "drift_share": 0.1, "start": "a", "end": "b", "retrain": False},
    )
    emit_event(event=DRIFT_CHECKED_EVENT, resource={**resource, "flywheel.dataset_drift": "true"},
               payload={"model_name": "alert-test", "drift_share": 0.67, "start": "2013-06-01", "end": "2013-07-01",
                        "retrain": True})  # fmt: skip

    failed = _wait_for(got, "train run")
    assert "Failed" in failed["json"]["text"] and "the data source is gone" in failed["json"]["text"]
    assert failed["content_type"].startswith("application/json")
    rolled = _wait_for(got, "v7 not deployed")
    assert "failed-smoke" in rolled["json"]["text"] and "error rate 100%" in rolled["json"]["text"]
    drift = _wait_for(got, "drift in alert-test")
    assert "0.67" in drift["json"]["text"] and "2013-06-01" in drift["json"]["text"]
    time.sleep(3)
    assert not any("0.1 " in m["json"]["text"] for m in got), "a verdict without drift must not alert"
