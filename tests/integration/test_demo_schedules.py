"""`flywheel demo` pauses the stack's own schedules while it replays months (flywheel/cli/demo.py:schedules_paused),
on a real Prefect server with the real deployments: paused inside, their pending scheduled runs gone, resumed after
(also when the replay fails), and a schedule a person had paused stays paused."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployments(prefect_server):
    from prefect.client.orchestration import get_client

    from flywheel.core.settings import Settings
    from flywheel.deployments.definitions import build_deployments

    for deployment in build_deployments(Settings()):
        deployment.apply()
    with get_client(sync_client=True) as client:  # active, whatever another test of the session left them
        for name in ("check-drift/cron", "train/cron"):
            client.resume_deployment(client.read_deployment_by_name(name).id)
    return prefect_server


def _deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _scheduled_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[_deployment(name).id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )  # fmt: skip


def test_the_replay_runs_with_the_schedules_paused_and_they_resume_after(deployments):
    from prefect.client.orchestration import get_client

    from flywheel.cli.demo import PAUSED_DURING_REPLAY, schedules_paused

    said: list[str] = []
    with get_client(sync_client=True) as client:  # the scheduler creates the upcoming runs of a schedule ...
        client.create_flow_run_from_deployment(_deployment("check-drift/cron").id)  # ... and a person starts one
    with schedules_paused(said.append) as paused:
        assert paused == list(PAUSED_DURING_REPLAY)
        assert all(_deployment(name).paused for name in PAUSED_DURING_REPLAY)
        # Prefect's pause deletes the auto-scheduled runs only: the one started by hand still runs.
        assert [r.auto_scheduled for r in _scheduled_runs("check-drift/cron")] == [False]
        assert not _deployment("deploy-model/on-alias").paused  # the loop's own triggers keep working
    assert not any(_deployment(name).paused for name in PAUSED_DURING_REPLAY)
    assert said == [
        "Paused the schedules of check-drift/cron, train/cron while the months replay (resumed at the end)."
    ]


def test_a_failed_replay_resumes_them_and_a_schedule_paused_by_a_person_stays_paused(deployments):
    from prefect.client.orchestration import get_client

    from flywheel.cli.demo import schedules_paused

    with get_client(sync_client=True) as client:
        client.pause_deployment(_deployment("train/cron").id)
    try:
        with pytest.raises(RuntimeError, match="replay broke"), schedules_paused(lambda _: None) as paused:
            assert paused == ["check-drift/cron"]
            raise RuntimeError("replay broke")
        assert not _deployment("check-drift/cron").paused
        assert _deployment("train/cron").paused
    finally:
        with get_client(sync_client=True) as client:
            client.resume_deployment(_deployment("train/cron").id)
