"""What Prefect is running now: the flow runs of a flow that are in flight (shared by the drift check, which must
not start a second retraining, and the reconciler, which must not start a second deployment)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from flywheel.core.settings import get_settings


async def in_flight(client, flow_name: str) -> list:
    """Runs of `flow_name` that are RUNNING, PENDING, or SCHEDULED and due within a minute (a cron schedule keeps
    its future runs SCHEDULED; those are not in flight)."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    return await client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])
            ),
            expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(UTC) + timedelta(minutes=1)),
        ),
    )


def train_in_flight(model_name: str) -> bool:
    """Whether a `train` run of this model is in flight (a run without `model_name` trains the configured one)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def _check() -> bool:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            runs = await in_flight(client, "train")
        return any((r.parameters.get("model_name") or get_settings().model_name) == model_name for r in runs)

    return run_coro_as_sync(_check())


def deploy_in_flight(name: str) -> bool:
    """Whether a `deploy-model` run of this model is in flight; a RUNNING one whose process died is not (it is
    marked Crashed on the way)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def _check() -> bool:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType

        async with get_client() as client:
            busy = False
            for run in (r for r in await in_flight(client, "deploy-model") if r.parameters.get("name") == name):
                if run.state_type == StateType.RUNNING and await _silent(client, run):
                    continue
                busy = True
            return busy

    return run_coro_as_sync(_check())


async def _silent(client, run) -> bool:
    """A RUNNING deployment whose process died: no heartbeat for three periods (Prefect's zombie automation marks
    it too, but only once it saw a first heartbeat — a process killed in its first seconds never sent one). It is
    marked Crashed here so it blocks nothing. Only where heartbeats are on (the `flywheel up` deployments process
    and infra's workers set PREFECT_FLOWS_HEARTBEAT_FREQUENCY)."""
    from prefect.states import Crashed

    from flywheel.tasks.events import heartbeat_since

    period = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or 0)
    if period <= 0 or run.start_time is None:
        return False
    window = timedelta(seconds=3 * period + 10)
    now = datetime.now(UTC)
    if now - run.start_time < window:
        return False
    # Heartbeats carry their sender's clock: look a window past this one's "now" too, so skew cannot hide one.
    if await heartbeat_since(client, run.id, since=now - window, until=now + window):
        return False
    await client.set_flow_run_state(
        run.id, Crashed(message=f"no heartbeat for {window.seconds}s: its process is gone"), force=True
    )
    return True
