"""The alias watch of the deployments process (deployments/executor.py): quiet when aliases and serving agree, one
deploy-model run when they differ (and stay different past the grace), nothing while a deployment is in flight. The
registry, the serving targets and Prefect are replaced by recorders; no server starts."""

from __future__ import annotations

import pytest

from flywheel.deployments import definitions, executor, serve
from flywheel.tasks import events, reconciler, registry, runs


class Recorder:
    def __init__(self, statuses: dict[str, dict], stage: bool = False, in_flight: bool = False) -> None:
        self.statuses, self.stage, self.in_flight = statuses, stage, in_flight
        self.pending = False
        self.emitted: list[tuple] = []
        self.looks = 0


@pytest.fixture
def world(monkeypatch):
    rec = Recorder({})

    def status(client, name, alias):
        rec.looks += 1
        return rec.statuses[alias]

    monkeypatch.setattr(registry, "client", lambda *a, **k: object())
    monkeypatch.setattr(reconciler, "alias_status", status)
    monkeypatch.setattr(reconciler, "stage_needs_sync", lambda client, name: rec.stage)
    monkeypatch.setattr(runs, "deploy_in_flight", lambda name: rec.in_flight)
    monkeypatch.setattr(reconciler, "alias_event_pending", lambda name, alias, version, s: rec.pending)
    monkeypatch.setattr(events, "announce_alias_move", lambda *a, **k: pytest.fail("the watch emits no event"))
    monkeypatch.setattr(executor, "start_deploy_run", lambda *a, **k: rec.emitted.append((a, k)) or "a-run")
    return rec


def synced(v: str) -> dict:
    return {"want": v, "have": v, "deployed": True}


def test_in_sync_emits_nothing_and_starts_no_run(world):
    world.statuses = {"champion": synced("3"), "challenger": {"want": None, "have": None, "deployed": False}}
    watch = executor.AliasWatch("m", interval=10, grace=0)
    assert watch.check_once() == []
    assert world.emitted == []


def test_a_difference_that_stays_starts_one_deploy_run(world):
    world.statuses = {"champion": {"want": "4", "have": "3", "deployed": False}, "challenger": synced("4")}
    watch = executor.AliasWatch("m", interval=10, grace=0)
    done = watch.check_once()
    assert [d["alias"] for d in done] == ["champion"]
    assert world.emitted == [(("m", "champion", "4"), {})]  # a deploy-model run for v4, started directly
    assert world.looks == 3  # both aliases, then the one behind again after the grace


def test_nothing_is_emitted_while_a_deployment_is_in_flight(world):
    world.statuses = {"champion": {"want": "4", "have": "3", "deployed": False}, "challenger": synced("4")}
    world.in_flight = True
    assert executor.AliasWatch("m", interval=10, grace=0).check_once() == []
    assert world.emitted == []


def test_nothing_is_emitted_while_the_moves_own_event_is_on_its_way(world):
    world.statuses = {"champion": {"want": "4", "have": "3", "deployed": False}, "challenger": synced("4")}
    world.pending = True
    assert executor.AliasWatch("m", interval=10, grace=0).check_once() == []
    assert world.emitted == []


def test_out_of_sync_ignores_a_removed_alias():
    assert not reconciler.out_of_sync({"want": None, "have": "3", "deployed": False})
    assert reconciler.out_of_sync({"want": "3", "have": "3", "deployed": False})  # served, but not the right way


def test_serve_leaves_the_reconcile_schedule_to_the_watch_and_keeps_the_deployment():
    built = {f"{d.flow_name}/{d.name}": d for d in definitions.build_deployments(unscheduled=(serve.RECONCILE,))}
    assert serve.RECONCILE in built and not built[serve.RECONCILE].schedules
    assert built["check-drift/cron"].schedules
    assert set(executor.WARM_DEPLOYMENTS) <= set(definitions.DEPLOYMENT_NAMES)


def test_the_legacy_stage_is_looked_at_once_a_minute(world, monkeypatch):
    import prefect.deployments

    started = []
    monkeypatch.setattr(prefect.deployments, "run_deployment", lambda name, **kw: started.append(name))
    world.statuses = {"champion": synced("3"), "challenger": synced("3")}
    world.stage = True
    watch = executor.AliasWatch("m", interval=10, grace=0)
    for _ in range(12):
        watch.check_once()
    assert started == [serve.RECONCILE, serve.RECONCILE]  # checks 1 and 7 of 12, at a 10 s interval


class Executor:
    """What the watch tells the executor."""

    def __init__(self) -> None:
        self.expected = 0
        self.prepared: list[tuple[str, dict]] = []

    def expect_run(self, seconds: float = 0.0) -> None:
        self.expected += 1

    def prepare_ahead(self, resource_id: str, payload: dict) -> None:
        self.prepared.append((resource_id, payload))

    def alias_event_seen(self, name, alias, version, within_seconds) -> bool:
        return False


def test_the_watch_tells_the_executor_a_run_is_on_its_way_only_when_it_emitted(world):
    world.statuses = {"champion": synced("3"), "challenger": synced("3")}
    warm = Executor()
    watch = executor.AliasWatch("m", interval=10, grace=0, executor=warm)
    watch.check_once()
    assert warm.expected == 0
    world.statuses["champion"] = {"want": "4", "have": "3", "deployed": False}
    watch.check_once()
    assert warm.expected == 1 and len(world.emitted) == 1
    assert warm.prepared == [("mlflow.registered_model.m", {"alias": "champion", "version": "4"})]  # loaded ahead


def test_a_move_whose_alias_event_the_subscription_delivered_is_left_to_its_webhook_run(world):
    """Prefect's event persister makes a just-emitted event readable seconds later; the subscription delivers it at
    once, so the watch starts no second run for a move the webhook already announced."""
    from flywheel.core.events import alias_event_resource

    world.statuses = {"champion": {"want": "4", "have": "3", "deployed": False}, "challenger": synced("3")}
    warm = executor.WarmExecutor.__new__(executor.WarmExecutor)  # no Prefect: only the event bookkeeping
    warm.alias_events, warm.wake, warm.burst_until = {}, executor.threading.Event(), 0.0
    warm.saw_alias_event(alias_event_resource("m", "champion")["prefect.resource.id"],
                         {"name": "m", "alias": "champion", "version": "4"})  # fmt: skip
    watch = executor.AliasWatch("m", interval=10, grace=0, executor=warm)
    assert watch.check_once() == [] and world.emitted == []
    warm.alias_events.clear()  # no event for the move: the watch deploys it
    assert [a["action"] for a in watch.check_once()] == ["started"] and len(world.emitted) == 1


def test_an_expected_run_makes_the_sweep_look_at_once_and_often_for_a_while():
    warm = executor.WarmExecutor.__new__(executor.WarmExecutor)  # no Prefect: only the burst bookkeeping
    warm.wake, warm.burst_until = executor.threading.Event(), 0.0
    warm.expect_run(seconds=5)
    assert warm.wake.is_set()
    assert warm.burst_until - executor.time.monotonic() == pytest.approx(5, abs=1)
    warm.expect_run(seconds=1)  # a shorter window never cuts a longer one short
    assert warm.burst_until - executor.time.monotonic() > 3


def test_warm_imports_name_the_modules_that_are_missing():
    from flywheel.core.imports import warm_imports

    assert warm_imports(("json", "flywheel_no_such_module")) == ["flywheel_no_such_module"]


class Submitted(list):
    def submit(self, fn, *args):
        self.append(args)


@pytest.mark.parametrize(
    ("model", "alias", "target", "prepared"),
    [("m", "champion", "local", [("m", "champion", "4")]),
     ("m", "challenger", "kubernetes", [("m", "challenger", "4")]),
     ("other-model", "champion", "local", []), ("m", "staging-only", "local", []), ("m", "champion", "docker", [])],
)  # fmt: skip
def test_an_alias_event_prepares_the_version_on_its_server_only_for_a_watched_alias_of_this_model(
    monkeypatch, model, alias, target, prepared
):
    from flywheel.core.events import alias_event_resource
    from flywheel.core.settings import get_settings

    monkeypatch.setenv("FLYWHEEL_MODEL_NAME", "m")
    monkeypatch.setenv("FLYWHEEL_DEPLOY_TARGET", target)
    get_settings.cache_clear()
    warm = executor.WarmExecutor.__new__(executor.WarmExecutor)  # no Prefect: only the event handling
    warm.preparer = Submitted()
    try:
        warm.prepare_ahead(alias_event_resource(model, alias)["prefect.resource.id"],
                           {"name": model, "alias": alias, "version": "4"})  # fmt: skip
    finally:
        get_settings.cache_clear()
    assert list(warm.preparer) == prepared
