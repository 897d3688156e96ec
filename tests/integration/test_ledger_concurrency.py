"""The deployment ledger on a real Prefect server: writers that overlap (a model's champion and challenger
deployments run at the same time, under different deployment locks) all land in its table artifact, because each
append holds the model's ledger lock, a Prefect global concurrency limit of 1."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_overlapping_writers_all_land_in_the_table(prefect_server, monkeypatch):
    from flywheel.tasks import ledger

    model = f"ledger-{uuid.uuid4().hex[:8]}"
    read = ledger._previous_rows

    async def slow_read(key: str) -> list[dict]:
        rows = await read(key)
        await asyncio.sleep(1.0)  # without the lock, every writer reads the table before any of them writes it
        return rows

    monkeypatch.setattr(ledger, "_previous_rows", slow_read)
    errors: list[BaseException] = []

    def write(alias: str, version: str) -> None:
        rec = ledger.DeploymentRecord(model_name=model, version=version, alias=alias, target="local", url="u",
                                      trigger="event", outcome="serving")  # fmt: skip
        try:
            ledger.record_in_prefect(rec)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    writers = [
        threading.Thread(target=write, args=(alias, version))
        for version in ("1", "2")
        for alias in ("champion", "challenger")
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert not errors, errors

    resp = httpx.post(
        prefect_server.url + "/api/artifacts/latest/filter",
        json={"artifacts": {"key": {"any_": [ledger.artifact_key(model)]}}, "limit": 1},
        timeout=10,
    )
    resp.raise_for_status()
    data = resp.json()[0]["data"]
    rows = json.loads(data) if isinstance(data, str) else data
    assert sorted((r["version"], r["alias"]) for r in rows) == [
        ("1", "challenger"), ("1", "champion"), ("2", "challenger"), ("2", "champion"),
    ]  # fmt: skip
