"""The `deploy-model` and `rollback` flows.

deploy-model: (lock per model) resolve what the alias points at → package → load beside the serving version →
health + smoke test → switch → watch the live error rate → ledger. A failure before the switch means the
version never serves and the alias goes back; a breach after it switches back.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flywheel.core.settings import get_settings
from flywheel.tasks import events, ledger, locks, registry, rollout


@flow(name="deploy-model", log_prints=True)
def deploy_model(
    name: str,
    version: str,
    alias: str = registry.CHAMPION,
    trigger: str = "manual",
    event_id: str | None = None,
    watch_seconds: float | None = None,
) -> dict:
    """Deploy `name` v`version` to the target that serves `alias`, blue/green, and roll back on failure."""
    logger = get_run_logger()
    ignored = rollout.not_served_here(name, alias)
    if ignored is not None:
        return ignored
    target = rollout.target_for(alias)
    with locks.held(locks.deploy_lock(name, alias), timeout_seconds=900):
        version, why = rollout.resolve_version(name, str(version), alias, trigger)
        logger.info("%s", why)
        if not version:
            return {"outcome": "ignored", "reason": why}
        if target.serves(version):
            logger.info("v%s already serves '%s' at %s: nothing to do", version, alias, target.url)
            return {"outcome": "already-serving", "version": version, "url": target.url}
        previous = target.active_version()  # may be this very version, served another way (docker target)
        rec = ledger.DeploymentRecord(
            model_name=name, version=version, alias=alias, target=target.name, url=target.url,
            trigger=trigger, previous_version=previous, event_id=event_id, flow_run_id=str(flow_run.id or ""),
        )  # fmt: skip
        if rollout.stage(rec, target).outcome != "pending":
            return rollout.give_up(rec)

        target.swap()
        logger.info("switched %s to v%s (previous: %s)", target.url, version, previous or "none")
        rollout.watch(rec, target, get_settings().deploy_watch_seconds if watch_seconds is None else watch_seconds)
        ledger.record(rec)
        if rec.outcome != "serving":
            events.announce_not_deployed(rec)
        ledger.publish(rec)
        return rec.as_dict()


@flow(name="rollback", log_prints=True)
def rollback(name: str | None = None, alias: str = registry.CHAMPION, to_version: str | None = None) -> dict:
    """Move `alias` back to the previous good version (or `to_version`); the alias event then deploys it."""
    logger = get_run_logger()
    name = name or get_settings().model_name
    client = registry.client()
    current = registry.get_alias_version(client, name, alias)
    if to_version is None:
        to_version = rollout.last_good_version(client, name, before=current)
    registry.set_alias(client, name, alias, str(to_version))
    registry.set_version_tags(
        client,
        name,
        str(to_version),
        {"rollback_from": current.version if current else "", "rollback_at": ledger.now_iso()},
    )
    logger.info("'%s' of %s moved from v%s back to v%s", alias, name, current.version if current else "-", to_version)
    return {"name": name, "alias": alias, "from": current.version if current else None, "to": str(to_version)}
