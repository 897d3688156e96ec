"""The deployment's pure decisions (flywheel.tasks.verdicts) and the post-switch watch driven by them, on an
in-memory serving target: no server is started."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from flywheel.tasks import ledger, rollout, verdicts
from flywheel.tasks.verdicts import Counts


# ------------------------------------------------------------------------------------------------- watch verdict
def verdict(new: Counts, baseline: Counts | None, previous: str | None = "1") -> verdicts.WatchVerdict:
    return verdicts.watch_verdict(new, baseline, max_excess=0.05, min_requests=20, previous=previous)


def test_input_the_previous_version_also_refuses_does_not_count():
    # A client sends rows both versions fail on (PREDICTION_FAILED), at the same share of the traffic as before.
    assert not verdict(Counts(100, 30), Counts(200, 60)).breached
    # The same failures against a previous version that never failed: the new version breaches.
    broken = verdict(Counts(100, 30), Counts(200, 0))
    assert broken.breached and "excess 30.0% > 5.0%" in broken.note


def test_bad_input_refused_before_the_model_never_counts():
    held = verdict(Counts(requests=200, errors=0, rejected=180), Counts(100, 0))
    assert not held.breached and "180 refused as bad input (not counted)" in held.note
    # Refused requests leave the denominator too: 20 scored, 2 failed is 10 %, a breach against a 0 % baseline.
    assert verdict(Counts(requests=200, errors=2, rejected=180), Counts(100, 0)).breached


def test_too_few_scored_requests_never_breach():
    assert not verdict(Counts(19, 19), Counts(100, 0)).breached
    assert verdict(Counts(20, 20), Counts(100, 0)).breached


def test_a_first_deployment_is_held_to_the_absolute_limit():
    assert verdict(Counts(100, 6), None, previous=None).breached
    assert not verdict(Counts(100, 5), None, previous=None).breached


def test_the_baseline_is_the_traffic_just_before_the_switch_when_there_is_enough():
    window, lifetime = Counts(30, 3), Counts(1000, 3)
    assert verdicts.baseline_of(window, lifetime, 20) == (window, "just before the switch")
    assert verdicts.baseline_of(Counts(5, 0), lifetime, 20) == (lifetime, "while it served")
    assert verdicts.baseline_of(None, Counts(0, 0), 20) == (None, "")


def test_counts_subtract_and_rate_over_scored_requests():
    assert Counts(10, 4, 2).minus(Counts(4, 1, 1)) == Counts(6, 3, 1)
    assert Counts(10, 4, 2).rate() == 0.5 and Counts().rate() == 0.0


def test_the_rule_is_stated_with_its_numbers():
    rule = verdicts.watch_rule(0.05, 20)
    assert "at least 20 scored requests" in rule and "5.0%" in rule and "bad input never count" in rule


# ------------------------------------------------------------------------------------------------------- smoke
def test_smoke_sample_size_states_what_it_proves():
    assert verdicts.zero_failure_bound(100) == pytest.approx(0.0295, abs=1e-4)
    note = verdicts.smoke_sample_note(100)
    assert note.startswith("100 rows, each alone and all as one batch") and "3.0% at 95% confidence" in note


def test_smoke_errors_the_previous_version_shares_are_not_counted():
    assert verdicts.shared_smoke_errors(3, 3) == 0
    assert verdicts.shared_smoke_errors(5, 3) == 2
    assert verdicts.shared_smoke_errors(3, None) == 3  # nothing to compare with: all count


# ---------------------------------------------------------------------------------------------------- coalesce
@pytest.mark.parametrize(
    ("event", "alias_now", "serving", "trigger", "action"),
    [
        ("3", "3", "2", "event", "deploy"),
        ("3", "5", "2", "event", "superseded"),  # the alias moved on: the run for v5 deploys
        ("3", None, "2", "event", "superseded"),  # the alias was removed
        ("3", "3", "3", "event", "already-serving"),  # a duplicate of a move already deployed
        ("3", "5", "2", "manual", "deploy"),  # by hand: the asked version, whatever the alias says
        ("3", "3", "3", "manual", "already-serving"),
        ("3", "3", "2", "rollback", "deploy"),
    ],
)
def test_moves_of_one_alias_coalesce_latest_wins(event, alias_now, serving, trigger, action):
    move = verdicts.coalesce(event, alias_now, serving, alias="champion", trigger=trigger)
    assert move.action == action
    if action == "superseded":
        assert move.reason.startswith("superseded: ")


# ------------------------------------------------------------------------------------- the watch, end to end
class FakeTarget:
    """A model server's slots as the watch reads them: `live` errors are added per counters() read."""

    name = "local"

    def __init__(self, active: str, standby: str | None, before: Counts, per_read: Counts) -> None:
        self.slots = {"active": active, "standby": standby}
        self.standby_counts = before
        self.active_counts = Counts()
        self.per_read = per_read
        self.rollbacks = 0

    def counters(self, slot: str = "active") -> Counts:
        if slot == "standby":
            return self.standby_counts
        self.active_counts = Counts(*(a + b for a, b in zip(self.active_counts, self.per_read, strict=True)))
        return self.active_counts

    def slot_version(self, slot: str) -> str | None:
        return self.slots[slot]

    def active_version(self) -> str | None:
        return self.slots["active"]

    def rollback(self) -> dict:
        self.rollbacks += 1
        self.slots["active"], self.slots["standby"] = self.slots["standby"], self.slots["active"]
        return {}


@pytest.fixture
def quick_watch(monkeypatch, fresh_settings):
    fresh_settings.setenv("FLYWHEEL_DEPLOY_MAX_LIVE_ERROR_RATE", "0.05")
    monkeypatch.setattr(rollout, "WATCH_TICK_SECONDS", 0.01)
    taken: list[str] = []

    @contextmanager
    def held(lock: str, timeout_seconds: float):
        taken.append(lock)
        yield

    monkeypatch.setattr(rollout.locks, "held", held)
    return taken


def record(previous: str | None) -> ledger.DeploymentRecord:
    return ledger.DeploymentRecord(model_name="m", version="2", alias="champion", target="local", url="",
                                   trigger="event", previous_version=previous, reason="smoke test passed")  # fmt: skip


def test_a_first_deployment_that_breaches_keeps_serving_and_never_calls_rollback(quick_watch):
    target = FakeTarget(active="2", standby=None, before=Counts(), per_read=Counts(10, 10))
    rec = rollout.watch(record(previous=None), target, seconds=0.2)
    assert rec.outcome == "serving" and target.rollbacks == 0 and quick_watch == []
    assert "a first deployment has nothing to roll back to" in rec.reason
    assert "rule: " in rec.watch


def test_a_watch_superseded_by_a_newer_move_ends_early(quick_watch):
    target = FakeTarget(active="2", standby="1", before=Counts(100, 0), per_read=Counts(1, 0))
    rec = rollout.watch(record(previous="1"), target, seconds=60, newer_move=lambda: "'champion' moved on to v3")
    assert rec.outcome == "superseded" and target.rollbacks == 0
    assert "watch ended early after 0s: 'champion' moved on to v3" in rec.reason


def test_shared_bad_input_does_not_roll_back(quick_watch):
    # v1 failed 30 % of what it scored while it served; v2 fails as much: the same client's bad rows.
    target = FakeTarget(active="2", standby="1", before=None, per_read=Counts(10, 3))
    target.standby_counts = Counts(1000, 300)
    rec = rollout.watch(record(previous="1"), target, seconds=0.2, before=None)
    assert rec.outcome == "serving" and target.rollbacks == 0, rec.reason
    assert "v1 while it served: 300 of 1000 failed (30.0%)" in rec.reason


def test_a_real_breach_switches_back_under_the_deployment_lock(quick_watch, monkeypatch):
    target = FakeTarget(active="2", standby="1", before=Counts(), per_read=Counts(10, 10))
    target.standby_counts = Counts(500, 0)
    monkeypatch.setattr(rollout, "moved_on", lambda name, alias, version: None)
    moved, rolled = [], []
    monkeypatch.setattr(rollout, "move_alias_back", lambda *a: moved.append(a) or "'champion' moved back to v1")
    monkeypatch.setattr(rollout.ledger, "record_rolled_back", lambda *a, **k: rolled.append(k))
    monkeypatch.setattr(rollout.registry, "client", lambda: None)
    rec = rollout.watch(record(previous="1"), target, seconds=5)
    assert rec.outcome == "rolled-back-live" and target.rollbacks == 1
    assert quick_watch == [rollout.locks.deploy_lock("m", "champion")]
    assert rolled and rolled[0]["to"] == "1" and "post-switch watch" in rolled[0]["by"]
    assert rec.reason.endswith("'champion' moved back to v1")


def test_a_breach_after_a_newer_move_does_not_switch_back(quick_watch, monkeypatch):
    target = FakeTarget(active="2", standby="1", before=Counts(), per_read=Counts(10, 10))
    target.standby_counts = Counts(500, 0)
    monkeypatch.setattr(rollout, "moved_on", lambda name, alias, version: "'champion' moved on to v3")
    rec = rollout.watch(record(previous="1"), target, seconds=5)
    assert rec.outcome == "superseded" and target.rollbacks == 0
    assert "not switched back: 'champion' moved on to v3" in rec.reason


# ------------------------------------------------------------------------------------------------------ ledger
def test_the_ledger_row_leads_with_what_a_person_reads_and_carries_no_url():
    rec = ledger.DeploymentRecord(model_name="m", version="4", alias="champion", target="local",
                                  url="http://127.0.0.1:5080", trigger="event", outcome="serving", reason="ok",
                                  finished_at="2026-12-01T13:00:00+00:00")  # fmt: skip
    row = rec.public()
    assert list(row)[:5] == ["version", "outcome", "reason", "when", "trigger"]
    assert "url" not in row and "5080" not in str(row)
    assert rec.sentence() == "v4 → champion (local): serving at 2026-12-01T13:00:00+00:00, event — ok"


def test_a_rolled_back_version_stops_saying_serving_and_last_deployment_reads_as_text(tmp_path):
    """On a real MLflow registry (SQLite in tmp)."""
    import json

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("ledger", artifact_location=str(tmp_path / "artifacts")))
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    for version in ("1", "2"):
        ledger.record_in_registry(client, ledger.DeploymentRecord(
            model_name="m", version=version, alias="champion", target="local", url="http://127.0.0.1:5080",
            trigger="event", outcome="serving", reason="smoke test passed", context="packages/m-v1",
        ))  # fmt: skip
    model = client.get_registered_model("m")
    assert model.tags["last_deployment"].startswith("v2 → champion (local): serving at ")
    assert json.loads(model.tags["last_deployment_json"])["version"] == "2"
    assert (
        "5080" not in model.tags["last_deployment_json"] and "deploy_url" not in client.get_model_version("m", "2").tags
    )
    ledger.record_rolled_back(client, "m", "2", "champion", by="alice (flywheel rollback)", reason="bad", to="1")
    tags = client.get_model_version("m", "2").tags
    assert tags["deploy_outcome"] == "rolled-back" and tags["deploy_rolled_back_by"] == "alice (flywheel rollback)"
    assert tags["deploy_rolled_back_reason"] == "bad" and tags["deploy_rolled_back_to"] == "1"
    assert tags["deploy_rolled_back_at"]
    # A rolled-back version is no rollback target: the next rollback from v2 goes to v1, and from v1 nowhere.
    assert rollout.last_good_version(client, "m", before=client.get_model_version("m", "2")) == "1"
    with pytest.raises(rollout.NothingToRollBackTo, match="nothing to roll back to"):
        rollout.last_good_version(client, "m", before=client.get_model_version("m", "1"))


def test_rollback_parameters_default_the_reason_and_refuse_a_bad_version(fresh_settings):
    from flywheel.cli.rollback import DEFAULT_REASON, rollback_parameters
    from flywheel.core.errors import UserError
    from flywheel.core.settings import get_settings

    params = rollback_parameters(None, None, "  ", get_settings())
    assert params["reason"] == DEFAULT_REASON and "by hand" in DEFAULT_REASON
    assert params["by"].endswith("(flywheel rollback)") and params["alias"] == "champion"
    assert rollback_parameters("m", " 3 ", "why", get_settings())["to_version"] == "3"
    with pytest.raises(UserError, match="--to must be a version number"):
        rollback_parameters("m", "latest", None, get_settings())
