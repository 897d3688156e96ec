"""The drift check's retraining schedule: the cooldown starts only once the drift event is known to be sent.

No servers: the registry is a fake that records what is written to it, the event sender a callable that succeeds or
raises, and `send_event` is pointed at a port nothing listens on.
"""

from __future__ import annotations

import socket

import pandas as pd
import pytest
from drift_results import drift_result

from flywheel.tasks import events, monitoring
from flywheel.tasks.drift import DriftResult
from flywheel.tasks.retrain_policy import RetrainDecision

HI = pd.Timestamp("2013-08-01", tz="UTC")


class FakeRegistry:
    """What the drift check writes to the registered model, in order, in a shared journal."""

    def __init__(self, journal: list):
        self.journal = journal
        self.tags: dict[str, str] = {}

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        self.journal.append(("tag", key))
        self.tags[key] = value


def drifted() -> DriftResult:
    return drift_result(dataset_drift=True, drift_share=0.7, n_drifted=7, n_columns=10)


def test_the_cooldown_starts_only_after_the_drift_event_is_sent():
    journal: list = []
    client = FakeRegistry(journal)

    def send(name, start, end, drift_share):
        journal.append(("event", name, start, end))

    plan = monitoring.schedule_retraining(client, "m", drifted(), HI, send=send)
    assert plan.scheduled and (plan.start, plan.end) == ("2013-05-03T00:00:00", "2013-08-01T00:00:00")
    assert journal == [("event", "m", plan.start, plan.end), ("tag", monitoring.TAG_LAST_RETRAIN)]
    assert client.tags[monitoring.TAG_LAST_RETRAIN] == HI.isoformat()


def test_an_event_that_cannot_be_sent_starts_no_cooldown_and_the_verdict_says_so():
    """Set before a send that fails, the tag would block retraining for the whole 30-day cooldown."""
    client = FakeRegistry([])

    def send(name, start, end, drift_share):
        raise ConnectionRefusedError("[Errno 111] Connect call failed")

    plan = monitoring.schedule_retraining(client, "m", drifted(), HI, send=send)
    assert not plan.scheduled and "ConnectionRefusedError" in plan.error
    assert monitoring.TAG_LAST_RETRAIN not in client.tags

    decision = RetrainDecision(True, ["dataset drift: 7/10 columns drifted"])
    verdict = monitoring.verdict("m", "1", HI - pd.Timedelta(days=30), HI, drifted(), decision, "run-id", plan)
    assert verdict["retrain"] is False
    assert verdict["reasons"][0] == decision.reasons[0]
    assert any("not sent" in r and "ConnectionRefusedError" in r for r in verdict["reasons"]), verdict["reasons"]


def test_a_sent_retraining_keeps_the_verdict_as_decided():
    decision = RetrainDecision(True, ["dataset drift"])
    plan = monitoring.Retraining("2013-05-03T00:00:00", "2013-08-01T00:00:00")
    verdict = monitoring.verdict("m", "1", HI, HI, drifted(), decision, "run-id", plan)
    assert verdict["retrain"] is True and verdict["reasons"] == ["dataset drift"]
    assert monitoring.verdict("m", "1", HI, HI, drifted(), RetrainDecision(False, ["x"]), "", None)["retrain"] is False


def test_send_event_raises_when_the_server_cannot_be_reached(monkeypatch):
    """`emit_event` would return the Event here and drop it in its background worker; `send_event` must raise."""
    import prefect.events
    from prefect.events.clients import PrefectEventsClient

    with socket.socket() as sock:  # a free port, closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/api"
    monkeypatch.setattr(prefect.events, "get_events_client", lambda: PrefectEventsClient(dead, reconnection_attempts=0))
    with pytest.raises(OSError):
        events.send_event("flywheel.test", {"prefect.resource.id": "flywheel.model.m"}, {})
