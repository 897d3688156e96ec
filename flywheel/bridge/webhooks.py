"""The MLflow side of the bridge: the one webhook that points MLflow's registry events at it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flywheel.bridge.signing import secret_fingerprint
from flywheel.core.events import ALIAS_DELETED_EVENT, ALIAS_EVENT, VERSION_CREATED_EVENT

if TYPE_CHECKING:  # mlflow takes ~3 s to import
    from mlflow import MlflowClient
    from mlflow.entities.webhook import Webhook

logger = logging.getLogger("flywheel.bridge")

WEBHOOK_PATH = "/webhooks/mlflow"
WEBHOOK_NAME = "flywheel-bridge"

# MLflow event ("entity.action") → Prefect event name. The webhook subscribes to exactly these.
EVENTS: dict[str, str] = {
    "model_version_alias.created": ALIAS_EVENT,
    "model_version_alias.deleted": ALIAS_DELETED_EVENT,
    "model_version.created": VERSION_CREATED_EVENT,
}


def ensure_webhook(client: MlflowClient, url: str, secret: str, name: str = WEBHOOK_NAME) -> Webhook:
    """Register the bridge with the MLflow server, idempotently: one ACTIVE webhook named `name` with this url,
    our three events and this secret. Updated in place when anything differs; extra webhooks of that name
    (e.g. from a race) are deleted, the oldest is kept.

    MLflow never returns a webhook's secret, so its fingerprint is kept in the description to detect a change.
    """
    wanted_events = set(EVENTS)
    description = f"Flywheel: MLflow registry → Prefect events bridge (secret fingerprint {secret_fingerprint(secret)})"
    mine = [w for w in all_webhooks(client) if w.name == name]
    mine.sort(key=lambda w: (w.creation_timestamp or 0, w.webhook_id))
    for extra in mine[1:]:
        client.delete_webhook(extra.webhook_id)
    if not mine:
        hook = client.create_webhook(
            name=name, url=url, events=sorted(wanted_events), description=description, secret=secret, status="ACTIVE"
        )
        logger.info("registered MLflow webhook %s → %s", name, url)
        return hook
    hook = mine[0]
    same = (
        hook.url == url
        and {str(e) for e in hook.events} == wanted_events
        and (hook.description or "") == description
        and str(hook.status) == "ACTIVE"
    )
    if same:
        return hook
    hook = client.update_webhook(
        hook.webhook_id, url=url, events=sorted(wanted_events), description=description, secret=secret, status="ACTIVE"
    )
    logger.info("updated MLflow webhook %s → %s", name, url)
    return hook


def all_webhooks(client: MlflowClient) -> list[Webhook]:
    """Every webhook of the MLflow server, page by page."""
    hooks, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        hooks.extend(page)
        token = page.token
        if not token:
            return hooks
