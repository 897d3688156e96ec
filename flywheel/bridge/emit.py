"""Handing one event to Prefect, synchronously and confirmed.

Why the default emitter does not call `prefect.events.emit_event`: that function only queues the event for a
background thread and returns the `Event` at once (measured: 4 ms) even when the API is unreachable; the thread
later logs "Unable to connect …" and drops it. Without `PREFECT_API_URL` it starts a throwaway ephemeral server
(~15 s) that no deployment listens to. So `prefect_emit` builds the same `prefect.events.Event` and sends it over
the same websocket (`/events/in`) with Prefect's own events client, synchronously, then waits for a ping/pong
checkpoint — the confirmation Prefect's client itself uses — and raises `EmitError` on any failure. The app
derives the event id from the delivery id, so a re-sent delivery keeps its event id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

EMIT_TIMEOUT_SECONDS = 10.0  # well under MLflow's 30 s request timeout

Emit = Callable[..., Any]
"""`emit(*, event: str, resource: dict, payload: dict, id: uuid.UUID, occurred: datetime) -> Any`; raises on failure."""


class EmitError(RuntimeError):
    """The event could not be handed to Prefect (no API configured, unreachable, rejected)."""


def prefect_emit(
    *,
    event: str,
    resource: dict[str, str],
    payload: dict[str, Any] | None = None,
    id: uuid.UUID | None = None,  # noqa: A002 - mirrors prefect.events.emit_event
    occurred: dt.datetime | None = None,
    timeout: float = EMIT_TIMEOUT_SECONDS,
) -> Any:
    """Send one event to the Prefect API and return the `prefect.events.Event` once the server has received it.

    Same event model and transport as `prefect.events.emit_event`, but synchronous and confirmed: raises
    `EmitError` when no `PREFECT_API_URL` is set (no ephemeral server) or the API cannot take the event.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise EmitError("PREFECT_API_URL is not set: the bridge needs a running Prefect server to send events to")
    kwargs: dict[str, Any] = {"event": event, "resource": resource, "payload": payload or {}}
    if id is not None:
        kwargs["id"] = id
    if occurred is not None:
        kwargs["occurred"] = occurred
    prefect_event = Event(**kwargs)

    async def _send() -> None:
        # checkpoint_every=1: after the send, ping and await the pong, i.e. the server has read the event frame.
        async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as client:
            await client.emit(prefect_event)

    async def _send_with_timeout() -> None:
        await asyncio.wait_for(_send(), timeout)

    try:
        asyncio.run(_send_with_timeout())
    except Exception as exc:  # noqa: BLE001 - any failure means "not handed over"
        raise EmitError(f"could not send {event} to the Prefect API: {type(exc).__name__}: {exc}") from exc
    return prefect_event
