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


def alias_status(mlflow_client, name: str, alias: str) -> dict:
    """What the registry wants for `alias` and what its target serves: `want` (the alias' version or None),
    `have` (the active version) and `deployed` (the target serves `want` the way it should). Raises TargetError
    when the target cannot be read. No Prefect run context needed: the warm executor's check calls it too."""
    want = registry.get_alias_version(mlflow_client, name, alias)
    target = target_for(alias)
    have = target.active_version()
    return {"want": want.version if want else None, "have": have,
            "deployed": want is not None and target.serves(want.version)}  # fmt: skip


def out_of_sync(status: dict) -> bool:
    """The alias points at a version its target does not serve (an alias that was removed is not a difference:
    nothing is to be deployed)."""
    return status["want"] is not None and not status["deployed"]


def stage_needs_sync(mlflow_client, name: str) -> bool:
    """A version sits in the legacy "Production" stage and was not yet made `champion` (one registry call)."""
    return any(
        v.current_stage == registry.PRODUCTION_STAGE and v.tags.get(STAGE_SYNCED_TAG) != "true"
        for v in mlflow_client.search_model_versions(f"name = '{name}'")
    )


def alias_event_pending(name: str, alias: str, version: str, within_seconds: float) -> bool:
    """Whether an alias event for this move reached Prefect in the last `within_seconds` (the bridge's or an earlier
    check's): its deploy-model run may not be created yet (event → run takes 0.5–1 s, more on a busy machine)."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    from flywheel.core.events import alias_event_resource

    now = datetime.now(UTC)
    flt = EventFilter(
        occurred=EventOccurredFilter(since=now - timedelta(seconds=within_seconds), until=now + timedelta(minutes=1)),
        event=EventNameFilter(name=[ALIAS_EVENT]),
        resource=EventResourceFilter(id=[alias_event_resource(name, alias)["prefect.resource.id"]]),
    )
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=flt, limit=50)
    return any(e.payload.get("alias") == alias and str(e.payload.get("version")) == str(version) for e in page.events)


def reconcile_alias(mlflow_client, name: str, alias: str, deploy_in_flight: bool) -> dict:
    """Registry says vN for `alias`, its target serves vM: when the target does not serve vN the way it should,
    emit the alias event the bridge would (unless a deployment is already in flight). What was seen and done."""
    logger = get_run_logger()
    try:
        status = alias_status(mlflow_client, name, alias)
    except TargetError as exc:
        logger.warning("cannot read what serves '%s': %s", alias, exc)
        want = registry.get_alias_version(mlflow_client, name, alias)
        return {"want": want.version if want else None, "have": None, "action": "target unreachable"}
    want, have = status["want"], status["have"]
    entry = {"want": want, "have": have, "action": "in sync"}
    if out_of_sync(status):
        if deploy_in_flight:
            entry["action"] = "deployment already in flight"
        else:
            events.announce_alias_move(name, alias, want, source="reconciler")
            entry["action"] = "emitted"
            how = "not the way the target serves it" if have == want else f"v{have} serves"
            logger.info("'%s' is v%s, %s: emitted %s", alias, want, how, ALIAS_EVENT)
    return entry
