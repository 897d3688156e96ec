"""The `reconcile` flow: webhooks are fire-and-forget, so on a schedule compare each watched alias with what
serves and emit the same event the bridge would when they differ.

It also honours the legacy registry stage "Production" (deprecated, fires no webhook): a version moved there
by stage is treated like a `champion` move — the reconciler moves the alias, which deploys it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flywheel.core.settings import get_settings
from flywheel.tasks import reconciler, registry, runs
from flywheel.tasks.rollout import WATCHED_ALIASES


@flow(name="reconcile", log_prints=True)
def reconcile(model_name: str | None = None) -> dict:
    """For each watched alias: registry says vN, the target serves vM; when they differ, emit the alias event."""
    logger = get_run_logger()
    name = model_name or get_settings().model_name
    client = registry.client()
    staged = reconciler.sync_production_stage(name)
    if staged:
        logger.info("v%s was moved to stage Production: '%s' now points at it", staged, registry.CHAMPION)
    in_flight = runs.deploy_in_flight(name)
    return {alias: reconciler.reconcile_alias(client, name, alias, in_flight) for alias in WATCHED_ALIASES}
