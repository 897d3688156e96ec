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


def test_serve_applies_the_alias_trigger_as_the_fallback_of_the_runs_the_executor_creates():
    from flywheel.core.events import ALIAS_EVENT, ALIAS_RUN_CREATED_EVENT

    built = {f"{d.flow_name}/{d.name}": d for d in definitions.build_deployments(
        unscheduled=(serve.RECONCILE,), runs_created_for=(executor.DEPLOY_DEPLOYMENT,))}  # fmt: skip
    (fallback,) = built[executor.DEPLOY_DEPLOYMENT].triggers
    # Prefect's "expect X after Y": fires only when no run-created event follows the alias event in time, for the
    # same model and alias, with the parameters the reactive trigger renders.
    assert fallback.posture == "Proactive" and fallback.after == {ALIAS_EVENT}
    assert fallback.expect == {ALIAS_RUN_CREATED_EVENT} and fallback.threshold == 1
    assert fallback.for_each == {"prefect.resource.id", "mlflow.alias"}
    assert fallback.within.total_seconds() == definitions.FALLBACK_SECONDS
    plain = {f"{d.flow_name}/{d.name}": d for d in definitions.build_deployments()}
    (reactive,) = plain[executor.DEPLOY_DEPLOYMENT].triggers  # without the executor: every event starts a run
    assert reactive.posture == "Reactive" and reactive.expect == {ALIAS_EVENT}
    assert fallback.name == reactive.name and fallback.parameters == reactive.parameters
    assert fallback.match == reactive.match
    with pytest.raises(ValueError, match="no created_event"):
        definitions.DRIFT_TRIGGER.to_prefect(fallback=True)


class FakeClient:
    """Prefect's sync client as `_start_from_event` uses it: the deployment by name, then the run."""

    def __init__(self, deployment_exists: bool = True) -> None:
        self.deployment_exists = deployment_exists
        self.created: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_deployment_by_name(self, name):
        if not self.deployment_exists:
            raise LookupError(name)
        return type("D", (), {"id": f"id-of-{name}"})()

    def create_flow_run_from_deployment(self, deployment_id, parameters, idempotency_key):
        self.created.append({"deployment_id": deployment_id, "parameters": parameters, "key": idempotency_key})
        return type("R", (), {"id": "run-1", "name": "brave-run"})()


@pytest.fixture
def starting(monkeypatch):
    import prefect.client.orchestration as orchestration

    client, said = FakeClient(), []
    monkeypatch.setattr(orchestration, "get_client", lambda **k: client)
    monkeypatch.setattr(events, "announce_run_created", lambda *a: said.append(a))
    warm = executor.WarmExecutor.__new__(executor.WarmExecutor)  # no Prefect server: only the run creation
    warm.flows, warm.deployment_ids, warm.submitted = {executor.DEPLOY_DEPLOYMENT: None}, {}, []
    warm.rollbacks = {}
    warm.submit = warm.submitted.append
    return warm, client, said


def test_an_alias_event_becomes_its_deploy_run_claimed_at_once_with_the_triggers_parameters(starting):
    from flywheel.core.events import alias_event_resource

    warm, client, said = starting
    resource = alias_event_resource("m", "champion")
    warm._start_from_event("ev-1", resource, {"name": "m", "alias": "champion", "version": 4, "delivery_id": "d"})
    assert client.created == [{
        "deployment_id": f"id-of-{executor.DEPLOY_DEPLOYMENT}", "key": "alias event ev-1",  # one run per event
        "parameters": {"name": "m", "version": "4", "alias": "champion", "trigger": "event", "event_id": "ev-1"},
    }]  # fmt: skip
    assert set(client.created[0]["parameters"]) == set(definitions.ALIAS_TRIGGER.parameters)
    assert warm.submitted == ["run-1"]  # claimed by this process, no sweep waited for
    assert said == [("ev-1", resource, {"name": "m", "alias": "champion", "version": 4, "delivery_id": "d"}, "run-1")]


def test_no_run_and_no_stand_down_when_the_deployment_or_the_version_is_missing(starting):
    warm, client, said = starting
    warm._start_from_event("ev-2", {}, {"name": "m", "alias": "champion"})  # an event naming no version
    client.deployment_exists = False  # `serve` has not applied it yet: the fallback trigger will start the run
    warm._start_from_event("ev-3", {}, {"name": "m", "alias": "champion", "version": "5"})
    assert client.created == [] and warm.submitted == [] and said == []


def test_the_move_a_rollback_running_here_made_is_left_to_it(starting, monkeypatch):
    from flywheel.core.events import alias_event_resource
    from flywheel.core.settings import get_settings

    monkeypatch.setenv("FLYWHEEL_MODEL_NAME", "m")
    get_settings.cache_clear()
    warm, client, said = starting
    warm.rollbacks = {"rb-1": {"name": None, "alias": "champion", "to_version": None}}  # the flow's defaults
    try:
        assert warm.rollback_moving("m", "challenger") is None and warm.rollback_moving("other", "champion") is None
        warm._start_from_event("ev-4", alias_event_resource("m", "champion"),
                               {"name": "m", "alias": "champion", "version": "3"})  # fmt: skip
    finally:
        get_settings.cache_clear()
    # No second run to race the rollback's own deployment (which has no post-switch watch); the fallback trigger
    # is told the rollback run deploys the move.
    assert client.created == [] and warm.submitted == []
    assert [run for *_, run in said] == ["rb-1"]
