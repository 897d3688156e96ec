"""Prefect events: the ones Flywheel emits (alias moves, drift, deployments that did not stay) and the one query it
makes (has a flow run sent a heartbeat lately).

Two ways to emit. `emit_event` queues the event for Prefect's background worker and returns at once; a failed send
is only logged there and the event is gone. That is right for notices (alerts, the reconciler's next pass repeats
its event). `send_event` goes through the events client itself and returns once the event is on the wire to the
server, raising if it cannot be sent: for events that state is written on the strength of (the drift cooldown).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from flywheel.core.events import (
    ALIAS_EVENT,
    ALIAS_RUN_CREATED_EVENT,
    DRIFT_CHECKED_EVENT,
    DRIFT_EVENT,
    ROLLED_BACK_EVENT,
    alias_event_resource,
    model_resource,
)

if TYPE_CHECKING:
    from prefect.events import Event

    from flywheel.tasks.drift import DriftResult
    from flywheel.tasks.ledger import DeploymentRecord

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"


def send_event(event: str, resource: dict[str, str], payload: dict[str, Any], follows: Any = None) -> Event:
    """Send one event through Prefect's events client and return it; raise if it could not be sent (after the
    client's own reconnection attempts). `follows`: the id of the event this one answers (Prefect's server then
    evaluates triggers on that one first, whatever order they arrive in)."""
    from prefect.events import Event, get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    sent = Event(event=event, resource=resource, payload=payload, follows=follows)

    async def _send() -> None:
        async with get_events_client() as client:
            await client.emit(sent)

    run_coro_as_sync(_send())
    return sent


def request_retraining(name: str, start: str, end: str, drift_share: float) -> Event:
    """The drift event that triggers the `train/on-drift` deployment on [start, end); raises if it was not sent."""
    payload = {"model_name": name, "start": start, "end": end, "drift_share": drift_share}
    return send_event(DRIFT_EVENT, model_resource(name), payload)


def announce_drift_checked(name: str, result: DriftResult, lo, hi, retrain: bool, champion: str) -> None:
    """Every drift verdict, for alerts; the resource label lets an automation match drift only."""
    from prefect.events import emit_event

    emit_event(
        event=DRIFT_CHECKED_EVENT,
        resource=model_resource(name, **{"flywheel.dataset_drift": str(bool(result.dataset_drift)).lower()}),
        payload={"model_name": name, "drift_share": round(result.drift_share, 4), "start": str(lo), "end": str(hi),
                 "retrain": retrain, "champion": champion},
    )  # fmt: skip


def announce_alias_move(name: str, alias: str, version: str, source: str) -> None:
    """The registry event the bridge would emit for an alias move (the reconciler's, for a move it missed)."""
    from prefect.events import emit_event

    emit_event(
        event=ALIAS_EVENT,
        resource=alias_event_resource(name, alias),
        payload={"name": name, "alias": alias, "version": version, "source": source},
    )


def announce_run_created(event_id: Any, resource: dict[str, str], payload: dict[str, Any], flow_run_id: Any) -> Event:
    """The alias move of event `event_id` (its `resource` and `payload`) has its deploy-model run (`flow_run_id`):
    the fallback trigger stands down. Raises if it could not be sent (the trigger then starts a second run, which
    finds the move deployed)."""
    payload = {**{k: payload.get(k) for k in ("name", "alias", "version")}, "flow_run_id": str(flow_run_id)}
    return send_event(ALIAS_RUN_CREATED_EVENT, resource, payload, follows=event_id)


def announce_not_deployed(rec: DeploymentRecord) -> None:
    """An event for alerts (deployments/alerts.py): this version did not stay deployed, and why."""
    from prefect.events import emit_event

    emit_event(
        event=ROLLED_BACK_EVENT,
        resource=model_resource(rec.model_name),
        payload={
            "name": rec.model_name, "version": rec.version, "alias": rec.alias, "outcome": rec.outcome,
            "reason": rec.reason[:1000], "previous_version": rec.previous_version,
        },
    )  # fmt: skip


async def heartbeat_since(client, flow_run_id: Any, since: datetime, until: datetime) -> bool:
    """Whether the flow run sent a heartbeat event in [since, until] (through the client's public `read_events`)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    page = await client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=since, until=until),
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
        ),
        limit=1,
    )
    return bool(page.events)
