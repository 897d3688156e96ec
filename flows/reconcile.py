"""The `reconcile` flow: webhooks are fire-and-forget, so on a schedule compare each watched alias with what
serves and emit the same event the bridge would when they differ.

It also honours the legacy registry stage "Production" (deprecated, fires no webhook): a version moved there
by stage is treated like a `champion` move — the reconciler moves the alias, which deploys it.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from flywheel.flows.deploy import WATCHED_ALIASES, target_for
from flywheel.tasks import registry
from flywheel.tasks.serving import TargetError
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from flywheel.core.events import ALIAS_EVENT, alias_event_resource
from flywheel.core.settings import get_settings

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


async def _deploy_in_flight(name: str) -> bool:
    from flywheel.tasks.runs import in_flight
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    async with get_client() as client:
        busy = False
        for run in (r for r in await in_flight(client, "deploy-model") if r.parameters.get("name") == name):
            if run.state_type == StateType.RUNNING and await _silent(client, run):
                continue
            busy = True
        return busy


async def _silent(client, run) -> bool:
    """A RUNNING deployment whose process died: no heartbeat for three periods (Prefect's zombie automation marks
    it too, but only once it saw a first heartbeat — a process killed in its first seconds never sent one). It is
    marked Crashed here so it blocks nothing. Only where heartbeats are on (the `flywheel up` deployments process
    and infra's workers set PREFECT_FLOWS_HEARTBEAT_FREQUENCY)."""
    from prefect.states import Crashed

    period = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or 0)
    if period <= 0 or run.start_time is None:
        return False
    window = timedelta(seconds=3 * period + 10)
    now = datetime.now(UTC)
    if now - run.start_time < window:
        return False
    resp = await client._client.post(
        "/events/filter",
        json={
            "filter": {
                "occurred": {"since": (now - window).isoformat()},
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run.id}"]},
            },
            "limit": 1,
        },
    )
    resp.raise_for_status()
    if resp.json().get("events"):
        return False
    await client.set_flow_run_state(
        run.id, Crashed(message=f"no heartbeat for {window.seconds}s: its process is gone"), force=True
    )
    return True


@flow(name="reconcile", log_prints=True)
def reconcile(model_name: str | None = None) -> dict:
    """For each watched alias: registry says vN, the target serves vM; when they differ, emit the alias event."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    logger = get_run_logger()
    name = model_name or get_settings().model_name
    client = registry.client()
    report: dict[str, dict] = {}
    staged = sync_production_stage(name)
    if staged:
        logger.info("v%s was moved to stage Production: '%s' now points at it", staged, registry.CHAMPION)
    in_flight = run_coro_as_sync(_deploy_in_flight(name))
    for alias in WATCHED_ALIASES:
        want = registry.get_alias_version(client, name, alias)
        try:
            target = target_for(alias)
            have = target.active_version()
            deployed = want is not None and target.serves(want.version)
        except TargetError as exc:
            logger.warning("cannot read what serves '%s': %s", alias, exc)
            report[alias] = {"want": want.version if want else None, "have": None, "action": "target unreachable"}
            continue
        entry = {"want": want.version if want else None, "have": have, "action": "in sync"}
        if want is not None and not deployed:
            if in_flight:
                entry["action"] = "deployment already in flight"
            else:
                emit_event(
                    event=ALIAS_EVENT,
                    resource=alias_event_resource(name, alias),
                    payload={"name": name, "alias": alias, "version": want.version, "source": "reconciler"},
                )
                entry["action"] = "emitted"
                how = "not the way the target serves it" if have == want.version else f"v{have} serves"
                logger.info("'%s' is v%s, %s: emitted %s", alias, want.version, how, ALIAS_EVENT)
        report[alias] = entry
    return report
