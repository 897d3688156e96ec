"""The warm deploy path: run `deploy-model` flow runs in this long-lived process, where prefect, mlflow and
scikit-learn are already imported, instead of waiting for a runner poll and a fresh interpreter (~10 s here).

Each run stays a real Prefect flow run of its deployment, with its logs, states, artifact and heartbeats. The
executor changes who creates and who starts it:

- an alias event's `deploy-model/on-alias` run is created here, from the event as the subscription delivers it,
  with the parameters Prefect's alias trigger would render and the event id as idempotency key
  (`start_from_event`). Prefect's automation took 0.4-14 s from event to run (bench/latency); this takes ~0.1 s.
  The trigger stays, as the fallback: in this process's deployments it is proactive and fires only when no
  `flywheel.alias-move.run-created` event follows the alias event within FALLBACK_SECONDS (the executor down,
  or Prefect's events lagging: that second run finds the move deployed). `prefect deployment run` works as ever;
- it subscribes to `prefect.flow-run.Scheduled` events of the deployments (after the alias watch started a run
  it reads the Scheduled runs every BURST_SECONDS for a few seconds; otherwise every `SWEEP_SECONDS`, in case an
  event was missed) and claims a due run by proposing Pending, exactly as Prefect's
  runner does (the server accepts one Pending proposal). Prefect's runner in the same process does not serve these
  deployments (deployments/serve.py applies them itself): it would race the executor for a run and, when it won,
  start it in a cold interpreter;
- it runs the claimed run with `prefect.flow_engine.run_flow(flow, flow_run=…)` on a thread of this process
  (threads, never a fork: Prefect's engine deadlocks in a forked child, PrefectHQ/prefect#16802). Runs of
  different aliases run side by side; the flow's own lock keeps moves of one model and alias in series.

If this process dies mid-run, its heartbeats stop and the run is marked Crashed (deployments/alerts.py,
tasks/runs.py); the model server keeps what it served. The same process runs the reconciler's cheap check
(`AliasWatch`): aliases vs what serves every FLYWHEEL_RECONCILE_SECONDS, with no flow run unless they differ.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

logger = logging.getLogger("flywheel.executor")

# The alias-triggered deployment, and the two a person starts by hand and waits for (both only talk to MLflow,
# Prefect and the model servers). Training and the drift check stay with the runner: heavy, and not waited on.
WARM_DEPLOYMENTS = ("deploy-model/on-alias", "rollback/manual", "reconcile/every-minute")
SWEEP_SECONDS = 5.0  # the Scheduled runs are read this often too, for an event the subscription missed
SCHEDULED_EVENT = "prefect.flow-run.Scheduled"
# A run someone else is about to create (the alias watch's `start_deploy_run`, `expect_run`): from then on the
# Scheduled runs are read every BURST_SECONDS for BURST_WINDOW_SECONDS, so the run is claimed the moment it exists
# even when its Scheduled event comes late or not at all (the 5 s sweep was the wait seen in bench/latency's "flow
# run started" stage). An alias event's own run is created and claimed here (`start_from_event`).
BURST_SECONDS = 0.2
BURST_WINDOW_SECONDS = 8.0
GRACE_SECONDS = 1.5  # an alias found behind is looked at again after this: the webhook's event may be on its way
# Imported once at start (flywheel.core.imports), off the claim path: the first deployment's packaging compiles
# (skl2onnx, onnx, onnxruntime) and reads the model (mlflow.pyfunc, sklearn), ~20 s of cold imports on a busy machine.
DEPLOY_IMPORTS = ("prefect.flow_engine", "mlflow.pyfunc", "mlflow.sklearn", "mlflow.models.flavor_backend_registry",
                "sklearn.pipeline", "sklearn.compose", "sklearn.ensemble", "pyarrow.parquet", "skl2onnx", "onnx",
                "onnxruntime", "flywheel.tasks.compiling.convert", "flywheel.tasks.rollout")  # fmt: skip
STAGE_CHECK_SECONDS = 60.0  # how often the watch looks for versions moved to the legacy Production stage
PREPARE_LOCK_SECONDS = 300.0  # a packaging holding the lock longer: the run compiles and loads without a head start
RECENT_EVENT_SECONDS = 30.0  # an alias event this recent for the same move is still on its way to a run


class WarmExecutor:
    """Claims and runs the Scheduled runs of `deployments` (full names) in this process."""

    def __init__(self, deployments: tuple[str, ...] = WARM_DEPLOYMENTS, max_runs: int = 4,
                 sweep_seconds: float = SWEEP_SECONDS) -> None:  # fmt: skip
        from flywheel.deployments.definitions import DEPLOYMENTS, load_flow

        by_name = {d.full_name: d for d in DEPLOYMENTS}
        self.flows = {name: load_flow(by_name[name].entrypoint) for name in deployments}
        self.deployment_ids: dict[UUID, str] = {}
        self.sweep_seconds = sweep_seconds
        self.pool = ThreadPoolExecutor(max_workers=max_runs, thread_name_prefix="warm-run")
        self.preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-prepare")
        self.starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-start")  # one: moves in order
        self.claimed: set[UUID] = set()
        self.rollbacks: dict[UUID, dict] = {}  # the rollback runs running here now: their parameters
        self.stopping = threading.Event()
        self.wake = threading.Event()  # set by an alias event: sweep now, then every BURST_SECONDS for a while
        self.burst_until = 0.0
        self.ran = 0
        # Alias events as the subscription delivered them ((resource, alias, version) → when): the alias watch asks
        # here first, because Prefect's event persister writes them to what `read_events` reads seconds later.
        self.alias_events: dict[tuple[str, str, str], float] = {}

    # ------------------------------------------------------------------------------------------- discovery
    def _resolve_deployments(self, client) -> None:
        for full_name in self.flows:
            if full_name not in self.deployment_ids.values():
                try:
                    self.deployment_ids[client.read_deployment_by_name(full_name).id] = full_name
                except Exception as exc:  # noqa: BLE001 - `serve` may not have created it yet
                    logger.debug("deployment %s not there yet: %s", full_name, exc)

    def _due_scheduled(self, client) -> list:
        """The due Scheduled runs of the deployments, read the way Prefect's runner reads them (this call also
        marks the deployments Ready in the UI: the executor is what serves them)."""
        if not self.deployment_ids:
            return []
        return client.get_scheduled_flow_runs_for_deployments(
            deployment_ids=list(self.deployment_ids), scheduled_before=datetime.now(UTC) + timedelta(seconds=1),
            limit=20,
        )  # fmt: skip

    def sweep(self, client=None) -> None:
        """Claim every due Scheduled run of the deployments (the events' backstop, and the first look)."""
        if client is None:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                return self.sweep(client)
        self._resolve_deployments(client)
        for run in self._due_scheduled(client):
            self.submit(run.id)

    async def _subscribe(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

        from flywheel.core.events import ALIAS_EVENT

        while not self.stopping.is_set():
            try:
                since = EventOccurredFilter(since=datetime.now(UTC) - timedelta(seconds=5))
                flt = EventFilter(event=EventNameFilter(name=[SCHEDULED_EVENT, ALIAS_EVENT]), occurred=since)
                async with get_events_subscriber(filter=flt, reconnect_on_clean_close=True) as subscriber:
                    async for event in subscriber:
                        if event.event == ALIAS_EVENT:  # create its deploy-model run, and get the version ready
                            self.saw_alias_event(event.resource.id, event.payload)
                            self.start_from_event(event.id, dict(event.resource), event.payload,
                                                  received=getattr(event, "received", None))  # fmt: skip
                            self.prepare_ahead(event.resource.id, event.payload)
                            continue
                        related = {r.id for r in event.related}
                        if any(f"prefect.deployment.{d}" in related for d in self.deployment_ids):
                            self.submit(UUID(event.resource.id.removeprefix("prefect.flow-run.")))
                        if self.stopping.is_set():
                            return
            except Exception as exc:  # noqa: BLE001 - the sweep keeps runs moving while it reconnects
                logger.warning("events subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(2)

    # ------------------------------------------------------------------------------------------- running
    def submit(self, flow_run_id: UUID) -> None:
        if flow_run_id in self.claimed:
            return
        self.claimed.add(flow_run_id)
        self.pool.submit(self._claim_and_run, flow_run_id)

    def _claim_and_run(self, flow_run_id: UUID) -> None:
        from prefect.client.orchestration import get_client
        from prefect.flow_engine import run_flow
        from prefect.states import Pending

        try:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(flow_run_id)
                full_name = self.deployment_ids.get(run.deployment_id)
                if full_name is None or not run.state or not run.state.is_scheduled():
                    return
                # The runner's own claim: Scheduled → Pending, accepted once (a deployment concurrency limit
                # would answer AwaitingConcurrencySlot; the run then stays Scheduled and a later sweep retries).
                state = client.set_flow_run_state(flow_run_id, Pending()).state
                if state is None or not state.is_pending():
                    logger.info("flow run %s not claimed: %s", flow_run_id, state.type.value if state else "-")
                    return
                run = client.read_flow_run(flow_run_id)
            since = (datetime.now(UTC) - run.created).total_seconds() if run.created else float("nan")
            logger.info("running flow run %s (%s) warm, claimed %.2f s after it was created", run.name, full_name,
                        since)  # fmt: skip
            if full_name == ROLLBACK_DEPLOYMENT:
                self.rollbacks[flow_run_id] = dict(run.parameters or {})
            final = run_flow(self.flows[full_name], flow_run=run, return_type="state")
            self.ran += 1
            logger.info("flow run %s ended %s", run.name, getattr(final, "type", final))
        except Exception:
            logger.exception("warm run of %s failed outside the flow", flow_run_id)
        finally:
            self.rollbacks.pop(flow_run_id, None)
            self.claimed.discard(flow_run_id)

    def start_from_event(self, event_id: UUID, resource: dict[str, str], payload: dict,
                         received: datetime | None = None) -> None:  # fmt: skip
        """Create the `deploy-model/on-alias` run of an alias event and claim it at once, instead of waiting for
        Prefect's automation (0.4-14 s from event to run on this machine, most of a move's time). The run gets
        what the automation would render from the event (`deployments.definitions.ALIAS_TRIGGER`), and the event id
        as its idempotency key: an event delivered twice makes one run. The automation stays as the fallback: its
        trigger (proactive in this process's deployments) fires only when no `ALIAS_RUN_CREATED_EVENT` follows."""
        delivered = (datetime.now(UTC) - received).total_seconds() if received else None
        self.starter.submit(self._start_from_event, event_id, resource, payload, received, delivered)

    def _start_from_event(self, event_id: UUID, resource: dict[str, str], payload: dict,
                          received: datetime | None = None, delivered: float | None = None) -> None:  # fmt: skip
        from prefect.client.orchestration import get_client

        from flywheel.tasks.events import announce_run_created

        if payload.get("name") is None or payload.get("version") is None:
            return  # not an alias move the trigger would render a run for
        parameters = {"name": str(payload["name"]), "version": str(payload["version"]),
                      "alias": str(payload.get("alias")), "trigger": "event", "event_id": str(event_id)}  # fmt: skip
        rollback = self.rollback_moving(parameters["name"], parameters["alias"])
        if rollback is not None:  # the rollback moved the alias and deploys the version itself, without a watch
            try:
                announce_run_created(event_id, resource, payload, rollback)
            except Exception as exc:  # noqa: BLE001 - the fallback's run then finds the version serving
                logger.warning("could not say rollback run %s deploys alias event %s: %s", rollback, event_id, exc)
            logger.info("alias event %s: the rollback run %s running here deploys v%s", event_id, rollback,
                        parameters["version"])  # fmt: skip
            return
        try:
            with get_client(sync_client=True) as client:
                self._resolve_deployments(client)
                deployment_id = next((i for i, n in self.deployment_ids.items() if n == DEPLOY_DEPLOYMENT), None)
                if deployment_id is None:
                    return  # `serve` has not created it yet: the automation's fallback will
                run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters,
                                                             idempotency_key=f"alias event {event_id}")  # fmt: skip
            self.submit(run.id)
            announce_run_created(event_id, resource, payload, run.id)
            # Where bench/latency's "flow run created" stage goes: Prefect's event stream, then this run's creation.
            took = "" if received is None or delivered is None else (
                f" (event delivered here {delivered:.2f} s after Prefect received it, run created "
                f"{(datetime.now(UTC) - received).total_seconds():.2f} s after)")  # fmt: skip
            logger.info("alias event %s: created deploy-model run %s for v%s of '%s'%s", event_id, run.name,
                        parameters["version"], parameters["alias"], took)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the automation's fallback and the alias watch still catch it
            logger.warning("could not start the run of alias event %s: %s", event_id, exc)

    def rollback_moving(self, name: str, alias: str) -> UUID | None:
        """The rollback run running here that moves `alias` of `name` (it set the alias, and its own deployment
        follows at once): a second run from the move's event would race it for the deployment lock, and when it
        won, deploy the version with the post-switch watch the rollback leaves out."""
        from flywheel.core.settings import get_settings
        from flywheel.tasks.registry import CHAMPION

        for run_id, params in list(self.rollbacks.items()):
            ours = (params.get("name") or get_settings().model_name) == name
            if ours and (params.get("alias") or CHAMPION) == alias:  # the flow's own defaults
                return run_id
        return None

    def saw_alias_event(self, resource_id: str, payload: dict) -> None:
        now = time.monotonic()
        self.alias_events = {k: t for k, t in self.alias_events.items() if now - t < RECENT_EVENT_SECONDS}
        self.alias_events[(resource_id, str(payload.get("alias")), str(payload.get("version")))] = now

    def prepare_ahead(self, resource_id: str, payload: dict) -> None:
        """Have the alias' model server load the moved-to version into its prepared slot now, while Prefect creates
        the run (0.3-3 s) and the run packages the version: the run's own load then takes it at once. It never
        serves from there; the run still loads, smoke-tests and switches. Not for the docker target, whose load is
        starting the version's container."""
        from flywheel.core.events import alias_event_resource
        from flywheel.core.settings import get_settings
        from flywheel.tasks.rollout import WATCHED_ALIASES

        settings = get_settings()
        alias, version = payload.get("alias"), payload.get("version")
        ours = resource_id == alias_event_resource(settings.model_name, alias)["prefect.resource.id"]
        if ours and alias in WATCHED_ALIASES and version is not None and settings.deploy_target != "docker":
            self.preparer.submit(self._prepare, settings.model_name, str(alias), str(version))

    @staticmethod
    def _prepare(name: str, alias: str, version: str) -> None:
        """Compile the version first when nothing has (a version registered outside Flywheel: the run's packaging
        would compile it on the move's clock), under the packaging lock so the run's packaging then reuses the
        verdict; then ask its server to load it ahead, compiled."""
        from flywheel.tasks import locks, packaging, registry
        from flywheel.tasks.compiling import TAG_COMPILED
        from flywheel.tasks.rollout import target_for

        try:
            # A version with a verdict (the train flow compiles before it promotes) needs no lock: the run, which
            # now starts ~0.5 s after the move, would wait for it (Prefect's 423 + Retry-After, 1-2 s).
            if TAG_COMPILED not in (registry.client().get_model_version(name, version).tags or {}):
                with locks.held(locks.package_lock(name), timeout_seconds=PREPARE_LOCK_SECONDS):
                    packaging.compile_for_serving(name, version)  # reuses a verdict already on the version's run
            answer = target_for(alias).prepare(version)
            said = "loading it ahead" if answer.get("preparing") else answer.get("reason", "not prepared")
            logger.info("'%s' moved to v%s: %s", alias, version, said)
        except Exception as exc:  # noqa: BLE001 - only a head start: the run loads the version itself
            logger.info("could not prepare v%s for '%s': %s", version, alias, exc)

    def alias_event_seen(self, name: str, alias: str, version: str, within_seconds: float) -> bool:
        """Whether the subscription delivered the alias event of this move in the last `within_seconds`."""
        from flywheel.core.events import alias_event_resource

        seen = self.alias_events.get((alias_event_resource(name, alias)["prefect.resource.id"], alias, str(version)))
        return seen is not None and time.monotonic() - seen < within_seconds

    def expect_run(self, seconds: float = BURST_WINDOW_SECONDS) -> None:
        """A run of a warm deployment is about to be created (an alias event, a run started by the alias watch):
        sweep at once and then every BURST_SECONDS for `seconds`."""
        self.burst_until = max(self.burst_until, time.monotonic() + seconds)
        self.wake.set()

    def serve_forever(self) -> None:
        """Subscribe on one thread, sweep on this one, until `stop()`."""
        from prefect.client.orchestration import get_client

        threading.Thread(target=lambda: asyncio.run(self._subscribe()), name="warm-events", daemon=True).start()
        while not self.stopping.is_set():
            try:  # one client while the server answers (a burst reads every BURST_SECONDS)
                with get_client(sync_client=True) as client:
                    while not self.stopping.is_set():
                        self.sweep(client)
                        bursting = time.monotonic() < self.burst_until
                        self.wake.wait(BURST_SECONDS if bursting else self.sweep_seconds)
                        self.wake.clear()
            except Exception as exc:  # noqa: BLE001 - the Prefect server may be restarting
                logger.warning("sweep failed: %s", exc)
                self.stopping.wait(self.sweep_seconds)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()


DEPLOY_DEPLOYMENT = "deploy-model/on-alias"
ROLLBACK_DEPLOYMENT = "rollback/manual"


def start_deploy_run(name: str, alias: str, version: str) -> str:
    """A `deploy-model/on-alias` run for a move the alias watch found (trigger `reconciler`), created directly: the
    alias event's trigger, evaluated by Prefect's server, took 0.5-7 s to create the run on a busy machine. The run
    is the same flow run in the UI, with its logs, states and ledger row; its name."""
    from prefect.deployments import run_deployment

    run = run_deployment(DEPLOY_DEPLOYMENT, parameters={"name": name, "version": str(version), "alias": alias,
                                                        "trigger": "reconciler"}, timeout=0)  # fmt: skip
    return run.name


class AliasWatch:
    """The reconciler's periodic check without a flow run: every `interval` seconds compare each watched alias
    with what its target serves; only when they differ (and no deployment is in flight) start a `deploy-model` run
    for the alias' version (`start_deploy_run`), or a `reconcile` run for a version moved to the legacy Production
    stage. A difference must still be there `grace` seconds later, and no alias event for that move may
    have reached Prefect in the last RECENT_EVENT_SECONDS: a move made a moment ago has its webhook's run on the way
    (emit → run created takes 0.5–1 s, seconds on a busy machine). `reconcile/every-minute` runs by hand too."""

    def __init__(self, model_name: str, interval: float, reconcile_deployment: str = "reconcile/every-minute",
                 grace: float = GRACE_SECONDS, executor: WarmExecutor | None = None) -> None:  # fmt: skip
        self.model_name = model_name
        self.executor = executor  # told when a run is on its way, so it claims it at once
        self.grace = grace
        self.interval = interval
        self.reconcile_deployment = reconcile_deployment
        self.stopping = threading.Event()
        self.checks = 0
        self.actions: list[dict[str, Any]] = []

    def check_once(self) -> list[dict[str, Any]]:
        from flywheel.core.events import alias_event_resource
        from flywheel.tasks import reconciler, registry, runs
        from flywheel.tasks.rollout import WATCHED_ALIASES
        from flywheel.tasks.serving import TargetError

        self.checks += 1
        client = registry.client()
        done: list[dict[str, Any]] = []

        def stale(aliases) -> list[tuple[str, dict]]:
            out = []
            for alias in aliases:
                try:
                    status = reconciler.alias_status(client, self.model_name, alias)
                except TargetError as exc:
                    logger.debug("cannot read what serves '%s': %s", alias, exc)
                    continue
                if reconciler.out_of_sync(status):
                    out.append((alias, status))
            return out

        behind = stale(WATCHED_ALIASES)
        if behind and not self.stopping.wait(self.grace):  # a move just made: give its webhook time to arrive
            behind = stale([alias for alias, _ in behind])
        behind = [
            (alias, st) for alias, st in behind
            if not (self.executor is not None and self.executor.alias_event_seen(self.model_name, alias, st["want"],
                                                                                 RECENT_EVENT_SECONDS))
            and not reconciler.alias_event_pending(self.model_name, alias, st["want"], RECENT_EVENT_SECONDS)
        ]  # fmt: skip
        if behind and not runs.deploy_in_flight(self.model_name):
            for alias, status in behind:
                if self.executor is not None:
                    resource = alias_event_resource(self.model_name, alias)["prefect.resource.id"]
                    self.executor.prepare_ahead(resource, {"alias": alias, "version": status["want"]})
                run = start_deploy_run(self.model_name, alias, status["want"])
                if self.executor is not None:
                    self.executor.expect_run()
                done.append({"alias": alias, "want": status["want"], "have": status["have"], "action": "started",
                             "flow_run": run})  # fmt: skip
                logger.info("'%s' is v%s, v%s serves: started deploy-model run %s", alias, status["want"],
                            status["have"], run)  # fmt: skip
        # The legacy stage needs a search over every version: once a minute is enough for a deprecated path.
        every = max(1, round(STAGE_CHECK_SECONDS / max(self.interval, 1.0)))
        if (self.checks - 1) % every == 0 and reconciler.stage_needs_sync(client, self.model_name):
            from prefect.deployments import run_deployment

            run_deployment(self.reconcile_deployment, parameters={"model_name": self.model_name}, timeout=0)
            if self.executor is not None:
                self.executor.expect_run()
            done.append({"action": "started reconcile (legacy Production stage)"})
        self.actions.extend(done)
        return done

    def serve_forever(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.check_once()
            except Exception as exc:  # noqa: BLE001 - MLflow or Prefect briefly away: the next pass retries
                logger.warning("alias check failed: %s", exc)

    def stop(self) -> None:
        self.stopping.set()
