"""`flywheel rollback` creates its `rollback/manual` run through Prefect's REST API (no Prefect import on the
command's clock) and waits for a final state. Prefect's API is a mock transport here; no server starts."""

from __future__ import annotations

import json

import httpx
import pytest

from flywheel.cli import rollback
from flywheel.core.errors import UserError


def mock_api(monkeypatch, states: list[str], deployment: bool = True,
             create_answers: list[int] | None = None) -> list[tuple[str, str, dict | None]]:  # fmt: skip
    """Prefect's API as a mock transport; `create_answers`: the statuses create_flow_run answers first."""
    calls: list[tuple[str, str, dict | None]] = []
    pending = list(states)
    busy = list(create_answers or [])

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        calls.append((request.method, request.url.path, body))
        if request.url.path.endswith("/create_flow_run") and busy:
            status = busy.pop(0)
            return httpx.Response(status, json={"detail": "database is locked"})
        if request.url.path.endswith("/deployments/name/rollback/manual"):
            return httpx.Response(200, json={"id": "dep-1"}) if deployment else httpx.Response(404, json={})
        state = pending.pop(0) if len(pending) > 1 else pending[0]
        run_state = {"type": state, "name": state.title(), "message": "done"}
        return httpx.Response(200, json={"id": "run-1", "name": "brave-otter", "state": run_state})

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handle), **kw))
    monkeypatch.setattr(rollback, "POLL_SECONDS", 0.0)
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    return calls


def test_the_run_is_created_with_its_parameters_and_waited_for(monkeypatch):
    calls = mock_api(monkeypatch, ["SCHEDULED", "RUNNING", "COMPLETED"])
    run = rollback._run_deployment("http://prefect.test/api", {"name": "m", "reason": "bad"}, timeout=10)
    assert run["state"]["type"] == "COMPLETED"
    method, path, body = calls[1]
    assert (method, path, body["parameters"]) == ("POST", "/api/deployments/dep-1/create_flow_run",
                                                  {"name": "m", "reason": "bad"})  # fmt: skip
    assert body["idempotency_key"].startswith("flywheel-rollback-")
    assert [c[1] for c in calls[2:]] == ["/api/flow_runs/run-1", "/api/flow_runs/run-1"]


def test_a_missing_deployment_says_so(monkeypatch):
    mock_api(monkeypatch, ["COMPLETED"], deployment=False)
    with pytest.raises(UserError, match="rollback/manual is not on the Prefect server"):
        rollback._run_deployment("http://prefect.test/api", {}, timeout=1)


def test_a_run_that_never_ends_is_returned_as_it_stands_at_the_deadline(monkeypatch):
    mock_api(monkeypatch, ["RUNNING"])
    assert rollback._run_deployment("http://prefect.test/api", {}, timeout=0.05)["state"]["type"] == "RUNNING"


def test_a_busy_server_is_retried_with_one_idempotency_key(monkeypatch):
    """Prefect on SQLite answers 503 while its database is locked; Prefect's own client retries, and so does this
    (the same key each time: one run)."""
    calls = mock_api(monkeypatch, ["COMPLETED"], create_answers=[503, 503])
    assert (
        rollback._run_deployment("http://prefect.test/api", {"name": "m"}, timeout=10)["state"]["type"] == "COMPLETED"
    )
    creates = [c[2] for c in calls if c[1].endswith("/create_flow_run")]
    assert len(creates) == 3 and len({c["idempotency_key"] for c in creates}) == 1


def test_a_refusal_is_a_clear_error(monkeypatch):
    mock_api(monkeypatch, ["COMPLETED"], create_answers=[500])
    with pytest.raises(UserError, match=r"refused to start a run of rollback/manual: HTTP 500"):
        rollback._run_deployment("http://prefect.test/api", {"name": "m"}, timeout=10)
