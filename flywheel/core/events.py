"""Prefect event names and resources: one home for each, shared by emitters, triggers and automations."""

from __future__ import annotations

# MLflow registry events, as the bridge re-emits them (and the reconciler emits the first for a missed move).
ALIAS_EVENT = "mlflow.model_version_alias.created"
ALIAS_DELETED_EVENT = "mlflow.model_version_alias.deleted"
VERSION_CREATED_EVENT = "mlflow.model_version.created"

# Flywheel's own events.
DRIFT_EVENT = "flywheel.drift.detected"  # check-drift decided to retrain: triggers train/on-drift
DRIFT_CHECKED_EVENT = "flywheel.drift.checked"  # every drift verdict (the drift alert watches it)
ROLLED_BACK_EVENT = "flywheel.deployment.rolled-back"
# The warm executor created the deploy-model run of an alias event itself (resource: the alias event's); the
# alias trigger of the embedded default fires only when this does not follow the alias event (a fallback).
ALIAS_RUN_CREATED_EVENT = "flywheel.alias-move.run-created"


def alias_event_resource(name: str, alias: str | None) -> dict[str, str]:
    """The resource of a registry event: the registered model, labelled by alias when there is one."""
    resource = {"prefect.resource.id": f"mlflow.registered_model.{name}", "prefect.resource.name": name}
    if alias:
        resource["mlflow.alias"] = alias
    return resource


def model_resource(name: str, **labels: str) -> dict[str, str]:
    """The resource of Flywheel's own events about one registered model."""
    return {"prefect.resource.id": f"flywheel.model.{name}", "prefect.resource.name": name, **labels}
