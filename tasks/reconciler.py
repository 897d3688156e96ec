"""What the reconciler compares: each watched alias in the registry with what its target serves, and the legacy
registry stage "Production" (deprecated, fires no webhook) with the `champion` alias."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flywheel.core.events import ALIAS_EVENT
from flywheel.tasks import events, registry
from flywheel.tasks.rollout import target_for
from flywheel.tasks.serving import TargetError

STAGE_SYNCED_TAG = "stage_synced_to_champion"


@task(name="sync-production-stage", cache_policy=NO_CACHE)
def sync_production_stage(name: str) -> str | None:
    """A version newly moved to the legacy "Production" stage becomes `champion` (once per version)."""
    client = registry.client()
    staged = [
        v for v in client.search_model_versions(f"name = '{name}'") if v.current_stage == registry.PRODUCTION_STAGE
    ]
    fresh = [v for v in staged if v.tags.get(STAGE_SYNCED_TAG) != "true"]
    if not fresh:
        return None
    newest = max(fresh, key=lambda v: (v.last_updated_timestamp or 0, int(v.version)))
    registry.set_alias(client, name, registry.CHAMPION, newest.version)
    for v in fresh:
        client.set_model_version_tag(name, v.version, STAGE_SYNCED_TAG, "true")
    return newest.version


def reconcile_alias(mlflow_client, name: str, alias: str, deploy_in_flight: bool) -> dict:
    """Registry says vN for `alias`, its target serves vM: when the target does not serve vN the way it should,
    emit the alias event the bridge would (unless a deployment is already in flight). What was seen and done."""
    logger = get_run_logger()
    want = registry.get_alias_version(mlflow_client, name, alias)
    try:
        target = target_for(alias)
        have = target.active_version()
        deployed = want is not None and target.serves(want.version)
    except TargetError as exc:
        logger.warning("cannot read what serves '%s': %s", alias, exc)
        return {"want": want.version if want else None, "have": None, "action": "target unreachable"}
    entry = {"want": want.version if want else None, "have": have, "action": "in sync"}
    if want is not None and not deployed:
        if deploy_in_flight:
            entry["action"] = "deployment already in flight"
        else:
            events.announce_alias_move(name, alias, want.version, source="reconciler")
            entry["action"] = "emitted"
            how = "not the way the target serves it" if have == want.version else f"v{have} serves"
            logger.info("'%s' is v%s, %s: emitted %s", alias, want.version, how, ALIAS_EVENT)
    return entry
