"""The warm deploy path: run `deploy-model` flow runs in this long-lived process, where prefect, mlflow and
scikit-learn are already imported, instead of waiting for a runner poll and a fresh interpreter (~10 s here).

Each run stays a real Prefect flow run of its deployment: created by the alias trigger (or `prefect deployment
run`), with its logs, states, artifact and heartbeats. The executor only changes who starts it:

- it subscribes to `prefect.flow-run.Scheduled` events of the deployment (and sweeps the Scheduled runs every
  `SWEEP_SECONDS` in case an event was missed) and claims a due run by proposing Pending, exactly as Prefect's
  runner does; the server accepts one Pending proposal, so the runner that also serves the deployment (the
  fallback) and the executor never both run it;
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
GRACE_SECONDS = 1.0  # an alias found behind is looked at again after this: the webhook's run may be on its way
STAGE_CHECK_SECONDS = 60.0  # how often the watch looks for versions moved to the legacy Production stage
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
        self.claimed: set[UUID] = set()
        self.stopping = threading.Event()
        self.ran = 0

    # ------------------------------------------------------------------------------------------- discovery
    def _resolve_deployments(self, client) -> None:
        for full_name in self.flows:
            if full_name not in self.deployment_ids.values():
                try:
                    self.deployment_ids[client.read_deployment_by_name(full_name).id] = full_name
                except Exception as exc:  # noqa: BLE001 - `serve` may not have created it yet
                    logger.debug("deployment %s not there yet: %s", full_name, exc)

    def _due_scheduled(self, client) -> list:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterNextScheduledStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        if not self.deployment_ids:
            return []
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(self.deployment_ids))),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(
                    before_=datetime.now(UTC) + timedelta(seconds=1)
                ),
            ),
            limit=20,
        )

    def sweep(self) -> None:
        """Claim every due Scheduled run of the deployments (the events' backstop, and the first look)."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            self._resolve_deployments(client)
            for run in self._due_scheduled(client):
                self.submit(run.id)

    async def _subscribe(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

        while not self.stopping.is_set():
            try:
                since = EventOccurredFilter(since=datetime.now(UTC) - timedelta(seconds=5))
                flt = EventFilter(event=EventNameFilter(name=[SCHEDULED_EVENT]), occurred=since)
                async with get_events_subscriber(filter=flt, reconnect_on_clean_close=True) as subscriber:
                    async for event in subscriber:
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
            logger.info("running flow run %s (%s) warm", run.name, full_name)
            final = run_flow(self.flows[full_name], flow_run=run, return_type="state")
            self.ran += 1
            logger.info("flow run %s ended %s", run.name, getattr(final, "type", final))
        except Exception:
            logger.exception("warm run of %s failed outside the flow", flow_run_id)
        finally:
            self.claimed.discard(flow_run_id)

    def serve_forever(self) -> None:
        """Subscribe on one thread, sweep on this one, until `stop()`."""
        threading.Thread(target=lambda: asyncio.run(self._subscribe()), name="warm-events", daemon=True).start()
        while not self.stopping.is_set():
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - the Prefect server may be restarting
                logger.warning("sweep failed: %s", exc)
            self.stopping.wait(self.sweep_seconds)

    def stop(self) -> None:
        self.stopping.set()


class AliasWatch:
    """The reconciler's periodic check without a flow run: every `interval` seconds compare each watched alias
    with what its target serves; only when they differ (and no deployment is in flight) emit the alias event the
    bridge would, which starts a `deploy-model` run, or start a `reconcile` run for a version moved to the legacy
    Production stage. A difference must still be there `grace` seconds later, and no alias event for that move may
    have reached Prefect in the last RECENT_EVENT_SECONDS: a move made a moment ago has its webhook's run on the way
    (emit → run created takes 0.5–1 s, seconds on a busy machine). `reconcile/every-minute` runs by hand too."""

    def __init__(self, model_name: str, interval: float, reconcile_deployment: str = "reconcile/every-minute",
                 grace: float = GRACE_SECONDS) -> None:  # fmt: skip
        self.model_name = model_name
        self.grace = grace
        self.interval = interval
        self.reconcile_deployment = reconcile_deployment
        self.stopping = threading.Event()
        self.checks = 0
        self.actions: list[dict[str, Any]] = []

    def check_once(self) -> list[dict[str, Any]]:
        from flywheel.tasks import events, reconciler, registry, runs
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
            if not reconciler.alias_event_pending(self.model_name, alias, st["want"], RECENT_EVENT_SECONDS)
        ]  # fmt: skip
        if behind and not runs.deploy_in_flight(self.model_name):
            for alias, status in behind:
                events.announce_alias_move(self.model_name, alias, status["want"], source="reconciler")
                done.append({"alias": alias, "want": status["want"], "have": status["have"], "action": "emitted"})
                logger.info("'%s' is v%s, v%s serves: emitted the alias event", alias, status["want"], status["have"])
        # The legacy stage needs a search over every version: once a minute is enough for a deprecated path.
        every = max(1, round(STAGE_CHECK_SECONDS / max(self.interval, 1.0)))
        if (self.checks - 1) % every == 0 and reconciler.stage_needs_sync(client, self.model_name):
            from prefect.deployments import run_deployment

            run_deployment(self.reconcile_deployment, parameters={"model_name": self.model_name}, timeout=0)
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
