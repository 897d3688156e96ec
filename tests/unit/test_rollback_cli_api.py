"""`flywheel rollback` creates its `rollback/manual` run through Prefect's REST API (no Prefect import on the
command's clock) and waits for a final state. Prefect's API is a mock transport here; no server starts."""

from __future__ import annotations

import json

import httpx
import pytest

from flywheel.cli import rollback
from flywheel.core.errors import UserError


def mock_api(monkeypatch, states: list[str], deployment: bool = True) -> list[tuple[str, str, dict | None]]:
    calls: list[tuple[str, str, dict | None]] = []
    pending = list(states)

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        calls.append((request.method, request.url.path, body))
        if request.url.path.endswith("/deployments/name/rollback/manual"):
            return httpx.Response(200, json={"id": "dep-1"}) if deployment else httpx.Response(404, json={})
        state = pending.pop(0) if len(pending) > 1 else pending[0]
        run_state = {"type": state, "name": state.title(), "message": "done"}
        return httpx.Response(200, json={"id": "run-1", "name": "brave-otter", "state": run_state})

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handle), **kw))
    monkeypatch.setattr(rollback, "POLL_SECONDS", 0.0)
    return calls


def test_the_run_is_created_with_its_parameters_and_waited_for(monkeypatch):
    calls = mock_api(monkeypatch, ["SCHEDULED", "RUNNING", "COMPLETED"])
    run = rollback._run_deployment("http://prefect.test/api", {"name": "m", "reason": "bad"}, timeout=10)
    assert run["state"]["type"] == "COMPLETED"
    created = ("POST", "/api/deployments/dep-1/create_flow_run", {"parameters": {"name": "m", "reason": "bad"}})
    assert calls[1] == created
    assert [c[1] for c in calls[2:]] == ["/api/flow_runs/run-1", "/api/flow_runs/run-1"]


def test_a_missing_deployment_says_so(monkeypatch):
    mock_api(monkeypatch, ["COMPLETED"], deployment=False)
    with pytest.raises(UserError, match="rollback/manual is not on the Prefect server"):
        rollback._run_deployment("http://prefect.test/api", {}, timeout=1)


def test_a_run_that_never_ends_is_returned_as_it_stands_at_the_deadline(monkeypatch):
    mock_api(monkeypatch, ["RUNNING"])
    assert rollback._run_deployment("http://prefect.test/api", {}, timeout=0.05)["state"]["type"] == "RUNNING"
