"""What Prefect is running now: the flow runs of a flow that are in flight (shared by the drift check, which must
not start a second retraining, and the reconciler, which must not start a second deployment)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


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
