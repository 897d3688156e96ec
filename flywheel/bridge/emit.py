"""Handing one event to Prefect, synchronously and confirmed.

Why the default emitter does not call `prefect.events.emit_event`: that function only queues the event for a
background thread and returns the `Event` at once (measured: 4 ms) even when the API is unreachable; the thread
later logs "Unable to connect …" and drops it. Without `PREFECT_API_URL` it starts a throwaway ephemeral server
(~15 s) that no deployment listens to. So `prefect_emit` builds the same `prefect.events.Event` and sends it over
the same websocket (`/events/in`) with Prefect's own events client, synchronously, then waits for a ping/pong
checkpoint — the confirmation Prefect's client itself uses — and raises `EmitError` on any failure. The app
derives the event id from the delivery id, so a re-sent delivery keeps its event id.

One websocket for all deliveries: a connection per delivery (handshake, auth, a fresh event loop each time) made a
burst of 500 deliveries in 10 s open hundreds of websockets at once, and 218 timed out as 503 (issue 15, item 3).
Now one events client lives on a background event loop and deliveries take turns on it (send + ping/pong each);
it is reopened after a failure or when `PREFECT_API_URL` changes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
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
    try:
        _CONNECTION.send(prefect_event, str(PREFECT_API_URL.value()), get_events_client, timeout)
    except Exception as exc:  # noqa: BLE001 - any failure means "not handed over"
        raise EmitError(f"could not send {event} to the Prefect API: {type(exc).__name__}: {exc}") from exc
    return prefect_event


class _EventsConnection:
    """One Prefect events client on a background event loop, shared by every delivery (see the module docstring)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = threading.Lock()
        self._client: Any = None
        self._url: str | None = None
        self._turn: asyncio.Lock | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._start:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="flywheel-bridge-emit", daemon=True).start()
                self._loop = loop
            return self._loop

    def send(self, event: Any, url: str, get_events_client: Callable[..., Any], timeout: float) -> None:
        """Send `event` and wait for the server's pong, from any thread; raises on failure or after `timeout` s.
        The caller's context (Prefect's settings) goes with the coroutine (run_coroutine_threadsafe copies it)."""
        coro = asyncio.wait_for(self._send(event, url, get_events_client), timeout)
        future = asyncio.run_coroutine_threadsafe(coro, self._running_loop())
        try:
            future.result(timeout + 1)
        except BaseException:
            future.cancel()
            raise

    async def _send(self, event: Any, url: str, get_events_client: Callable[..., Any]) -> None:
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            if self._client is None or self._url != url:
                await self._close()
                # checkpoint_every=1: after each send, ping and await the pong (the server has read the frame).
                client = get_events_client(reconnection_attempts=2, checkpoint_every=1)
                await client.__aenter__()
                self._client, self._url = client, url
            try:
                await self._client.emit(event)
            except BaseException:
                await self._close()
                raise

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.__aexit__(None, None, None)
            except Exception:  # noqa: BLE001,S110 - a broken connection is being dropped anyway
                pass


_CONNECTION = _EventsConnection()
