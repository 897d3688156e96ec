"""The alias trigger as the deployments process applies it (deployments/definitions.py `to_prefect(fallback=True)`):
on a real Prefect server, an alias move that nothing answered gets its `deploy-model/on-alias` run from Prefect's
automation once FALLBACK_SECONDS have passed, with the parameters rendered from the event; a move answered with the
executor's run-created event gets none. No runner serves the deployment here: the runs stay Scheduled."""

from __future__ import annotations

import uuid

import pytest
from stacks import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fallback_deployment(prefect_server):
    from prefect.client.orchestration import get_client

    from flywheel.core.settings import Settings
    from flywheel.deployments.definitions import build_deployments
    from flywheel.deployments.executor import DEPLOY_DEPLOYMENT

    (deployment,) = [d for d in build_deployments(Settings(), runs_created_for=(DEPLOY_DEPLOYMENT,))
                     if f"{d.flow_name}/{d.name}" == DEPLOY_DEPLOYMENT]  # fmt: skip
    deployment.apply()
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(DEPLOY_DEPLOYMENT)


def _runs_of(deployment_id, model: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.parameters.get("name") == model]


def test_only_the_move_nothing_answered_gets_a_run_from_the_automation(fallback_deployment):
    from flywheel.core.events import ALIAS_EVENT, alias_event_resource
    from flywheel.deployments.definitions import FALLBACK_SECONDS
    from flywheel.tasks.events import announce_run_created, send_event

    unanswered, answered = f"fallback-{uuid.uuid4().hex[:8]}", f"answered-{uuid.uuid4().hex[:8]}"
    moves = {}
    for model in (unanswered, answered):  # two models: two buckets of the trigger, ending together
        payload = {"name": model, "alias": "champion", "version": "3"}
        moves[model] = send_event(ALIAS_EVENT, alias_event_resource(model, "champion"), payload)
    announce_run_created(moves[answered].id, alias_event_resource(answered, "champion"),
                         {"name": answered, "alias": "champion", "version": "3"}, uuid.uuid4())  # fmt: skip

    (run,) = wait_for("the automation's run for the unanswered move", lambda: _runs_of(fallback_deployment.id,
                      unanswered), timeout=FALLBACK_SECONDS + 120, interval=1.0)  # fmt: skip
    assert run.parameters == {"name": unanswered, "version": "3", "alias": "champion", "trigger": "event",
                              "event_id": str(moves[unanswered].id)}  # fmt: skip
    assert run.created_by is not None and run.created_by.type == "AUTOMATION"
    assert (run.created - moves[unanswered].occurred).total_seconds() >= FALLBACK_SECONDS - 1
    # Both buckets ended at the same moment and Prefect evaluates them in one pass: the answered one is done too.
    assert _runs_of(fallback_deployment.id, answered) == []
