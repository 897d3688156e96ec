"""What a `deploy-model` run's log says: the smoke test's figures (rows, error rate, p50) and the post-switch watch's
result. No server: the registry lookups are replaced by a frame of rows, the model server by a fake that answers the
smoke test and counts the watch's requests."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pandas as pd
from test_deploy_verdicts import FakeTarget, quick_watch, record  # noqa: F401 - quick_watch is a fixture

from flywheel.tasks import rollout, serving
from flywheel.tasks.verdicts import Counts


class SmokingTarget(FakeTarget):
    def smoke(self, records, max_error_rate: float, max_p50_ms: float, slot: str = "standby") -> serving.SmokeResult:
        return serving.SmokeResult(ok=True, rows=len(records), error_rate=0.0, p50_ms=4.25)


def test_the_smoke_test_logs_its_rows_error_rate_and_p50(monkeypatch, fresh_settings, caplog):
    frame = pd.DataFrame({"x": range(30)})
    monkeypatch.setattr(rollout.registry, "client", lambda *a: object())
    monkeypatch.setattr(rollout, "_inputs_of", lambda c, n, v: SimpleNamespace(columns=["x"], example=None))
    monkeypatch.setattr(rollout, "smoke_sources", lambda *a: [("v2's holdout sample", lambda: frame)])
    target = SmokingTarget(active="1", standby="2", before=Counts(), per_read=Counts())
    with caplog.at_level(logging.INFO):
        result = rollout.smoke_test.fn(target, "m", "2", "1")
    assert result.ok
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("smoke test of v2")]
    assert "30 rows (v2's holdout sample)" in line and "error rate 0.0%" in line and "p50 4.2 ms" in line, line
    assert line.endswith("passed")


def test_the_post_switch_watch_logs_what_it_saw_and_its_outcome(quick_watch, caplog):  # noqa: F811
    target = FakeTarget(active="2", standby="1", before=Counts(100, 0), per_read=Counts(5, 0))
    with caplog.at_level(logging.INFO):
        rec = rollout.watch(record(previous="1"), target, seconds=0.05)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("post-switch watch of v2")]
    assert rec.watch in line and line.endswith("→ serving") and "rule: " in line, line
