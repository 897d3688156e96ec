"""The `deploy-model` and `rollback` flows.

deploy-model: is this still the latest move (else: Superseded at once) → (lock per model and alias) resolve →
package → load beside the serving version → health + smoke test → switch → (lock released) watch the live error
rate against the previous version's → ledger. A failure before the switch means the version never serves and the
alias goes back; a breach after it switches back; a newer move ends the watch early (superseded).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flywheel.core.settings import get_settings
from flywheel.tasks import events, ledger, locks, registry, rollout, verdicts


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
    move = rollout.latest_move(name, str(version), alias, trigger, target)  # no lock taken for an older move
    if move.action != "deploy":
        return rollout.end_early(move, name, alias)
    with locks.held(locks.deploy_lock(name, alias), timeout_seconds=900):
        move = rollout.resolve_version(name, str(version), alias, trigger, target)
        if move.action != "deploy":
            return rollout.end_early(move, name, alias)
        logger.info("%s", move.reason)
        previous = target.active_version()  # may be this very version, served another way (docker target)
        before = target.counters() if previous else None  # the previous version's traffic from here to the switch
        rec = ledger.DeploymentRecord(
            model_name=name, version=move.version, alias=alias, target=target.name, url=target.url,
            trigger=trigger, previous_version=previous, event_id=event_id, flow_run_id=str(flow_run.id or ""),
        )  # fmt: skip
        if rollout.stage(rec, target).outcome != "pending":
            return rollout.give_up(rec)
        newer = rollout.moved_on(name, alias, rec.version)
        if newer is not None:  # a newer move arrived while this one staged: it deploys, this one never serves
            rec.outcome, rec.reason = "superseded", f"{rec.reason}; not switched in: {newer}"
            ledger.record(rec)
            return rollout.end_early(verdicts.Move("superseded", rec.version, rec.reason), name, alias)
        target.swap(rec.version)  # the standby must still be the version smoke-tested
        logger.info("switched %s to v%s (previous: %s)", target.name, rec.version, previous or "none")
    seconds = get_settings().deploy_watch_seconds if watch_seconds is None else watch_seconds
    rollout.watch(rec, target, seconds, before, newer_move=lambda: rollout.moved_on(name, alias, rec.version))
    ledger.record(rec)
    if rec.outcome == "rolled-back-live":
        events.announce_not_deployed(rec)
    ledger.publish(rec)
    return rec.as_dict()


@flow(name="rollback", log_prints=True)
def rollback(
    name: str | None = None,
    alias: str = registry.CHAMPION,
    to_version: str | None = None,
    reason: str = "rolled back by hand",
    by: str = "rollback/manual",
):
    """Move `alias` back to the previous good version (or `to_version`) and deploy it at once (no watch: it served
    before); the version moved away from is recorded as rolled back, with when, by whom and why."""
    name = name or get_settings().model_name
    client = registry.client()
    current = registry.get_alias_version(client, name, alias)
    to_version = str(to_version or rollout.last_good_version(client, name, before=current))
    was = current.version if current else None
    registry.set_alias(client, name, alias, to_version)
    if was and was != to_version:
        at = ledger.record_rolled_back(client, name, was, alias, by=by, reason=reason, to=to_version)
        rollout.ledger_row_for_rollback(name, was, alias, to_version, at, by, reason)
    registry.set_version_tags(client, name, to_version, {"rollback_from": was or "", "rollback_at": ledger.now_iso()})
    deployed = deploy_model(name=name, version=to_version, alias=alias, trigger="rollback", watch_seconds=0)
    outcome = deployed.get("outcome") if isinstance(deployed, dict) else "already-serving"
    message = f"'{alias}' of {name}: v{was or '-'} → v{to_version} ({outcome}); {reason} ({by})"
    get_run_logger().info("%s", message)
    from prefect.states import Completed

    result = {"name": name, "alias": alias, "from": was, "to": to_version, "outcome": outcome, "reason": reason}
    return Completed(message=message[:500], data=result)
