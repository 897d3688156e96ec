"""Every Prefect deployment of Flywheel, declared in one place.

| deployment                 | starts when                                   | parameters                            |
|----------------------------|-----------------------------------------------|---------------------------------------|
| train/cron                 | cron `FLYWHEEL_TRAIN_CRON` (default 03:00)    | spec_path, data_uri, params_path, … |
| train/on-drift             | event `flywheel.drift.detected`               | start, end, model_name from the event |
| deploy-model/on-alias      | event `mlflow.model_version_alias.created`    | name, version, alias, trigger, event_id |
| rollback/manual            | by hand (UI, CLI)                             | name, alias, to_version               |
| reconcile/every-minute     | interval `FLYWHEEL_RECONCILE_SECONDS` (60)    | model_name                            |
| check-drift/cron           | cron `FLYWHEEL_DRIFT_CRON` (hourly)           | model_name, current_uri, start, end   |

`python -m flywheel.deployments.serve` serves them all from one process (the embedded default); `prefect.yaml`
at the repo root declares the same deployments for work pools (process → docker → kubernetes).
"""

from __future__ import annotations

import os

from prefect.events import DeploymentEventTrigger

from flywheel.core.events import ALIAS_EVENT, DRIFT_EVENT

DEPLOYMENT_NAMES = (
    "train/cron", "train/on-drift", "deploy-model/on-alias", "rollback/manual", "reconcile/every-minute",
    "check-drift/cron",
)  # fmt: skip


def alias_trigger() -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name="registry-alias-moved",
        expect={ALIAS_EVENT},
        match={"prefect.resource.id": "mlflow.registered_model.*"},
        parameters={
            "name": "{{ event.payload.name }}",
            "version": "{{ event.payload.version }}",
            "alias": "{{ event.payload.alias }}",
            "trigger": "event",
            # A bare UUID fails to render on the server side only (InvalidJinja in its log): stringify it.
            "event_id": "{{ event.id | string }}",
        },
    )


def drift_trigger() -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name="drift-detected",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": "flywheel.model.*"},
        parameters={
            "model_name": "{{ event.payload.model_name }}",
            "start": "{{ event.payload.start }}",
            "end": "{{ event.payload.end }}",
        },
    )


def build_deployments() -> list:
    """RunnerDeployments for `serve` (one process); names and schedules match prefect.yaml."""
    from flywheel.flows.deploy import deploy_model, rollback
    from flywheel.flows.reconcile import reconcile
    from flywheel.flows.train import train

    train_cron = os.environ.get("FLYWHEEL_TRAIN_CRON", "0 3 * * *")
    reconcile_seconds = float(os.environ.get("FLYWHEEL_RECONCILE_SECONDS", "60"))
    deployments = [
        train.to_deployment(name="cron", cron=train_cron, description="Scheduled retraining on the spec's data."),
        train.to_deployment(name="on-drift", triggers=[drift_trigger()], description="Retraining caused by drift."),
        deploy_model.to_deployment(
            name="on-alias",
            triggers=[alias_trigger()],
            concurrency_limit=None,
            description="Deploys the version an alias moved to (champion → production, challenger → staging).",
        ),
        rollback.to_deployment(name="manual", description="Moves champion back to the previous good version."),
        reconcile.to_deployment(
            name="every-minute", interval=reconcile_seconds, description="Backs up webhooks: alias vs serving."
        ),
    ]
    from flywheel.flows.check_drift import check_drift

    drift_cron = os.environ.get("FLYWHEEL_DRIFT_CRON", "0 * * * *")
    deployments.append(check_drift.to_deployment(name="cron", cron=drift_cron, description="Evidently drift check."))
    return deployments
