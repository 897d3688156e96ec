"""The MLflow-webhook → Prefect-event bridge.

OSS Prefect has no incoming webhooks, so this small ASGI app receives MLflow's signed registry webhooks and
turns each into a Prefect event that deployment triggers react to:

    MLflow `model_version_alias.created`  →  Prefect `mlflow.model_version_alias.created`
    MLflow `model_version_alias.deleted`  →  Prefect `mlflow.model_version_alias.deleted`
    MLflow `model_version.created`        →  Prefect `mlflow.model_version.created`

Every other MLflow event is acknowledged (200) and ignored.

How MLflow signs (verified in `mlflow/webhooks/delivery.py`, `_send_webhook_request` and
`_generate_hmac_signature`, MLflow 3.17): the body is `json.dumps({"entity", "action", "timestamp", "data"})`,
`X-MLflow-Delivery-Id` is a fresh uuid4, `X-MLflow-Timestamp` is `str(int(time.time()))` (Unix **seconds**) and
`X-MLflow-Signature` is `"v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}"))`. MLflow
retries (urllib3, 3 times, 1/2/4 s back-off) on connection errors and on 429/500/502/503/504 only, resending the
same delivery id, timestamp and signature; any other status is final. Hence:

* bad or missing signature → 401, a timestamp more than `max_age_seconds` away from now → 400: never retried;
* a delivery id already handed to Prefect → 200 `{"status": "duplicate"}` without a second event. The memory is
  a small SQLite file in the state dir (survives restarts, safe across threads and processes, pruned by age);
* the event could not be handed to Prefect → 503, and the delivery is forgotten so MLflow's retry can succeed.

Why the default emitter does not call `prefect.events.emit_event`: that function only queues the event for a
background thread and returns the `Event` at once (measured: 4 ms) even when the API is unreachable; the thread
later logs "Unable to connect …" and drops it. Without `PREFECT_API_URL` it starts a throwaway ephemeral server
(~15 s) that no deployment listens to. So `prefect_emit` builds the same `prefect.events.Event` and sends it over
the same websocket (`/events/in`) with Prefect's own events client, synchronously, then waits for a ping/pong
checkpoint — the confirmation Prefect's client itself uses — and raises `EmitError` on any failure. The event id
is derived from the delivery id, so a re-sent delivery keeps its event id.

Secrets: `webhook_secret` in the state dir (mode 0600) is what `ensure_webhook` registers with MLflow; it is
re-read while the bridge runs, so `rotate_secret` takes effect without a restart, and the previous secret stays
valid for a grace period (MLflow caches its webhook list, secrets included, for `MLFLOW_WEBHOOK_CACHE_TTL`).
Neither the secret nor a signature is ever logged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import inspect
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flywheel.core.events import ALIAS_DELETED_EVENT, ALIAS_EVENT, VERSION_CREATED_EVENT, alias_event_resource
from flywheel.core.files import load_or_create_private, read_private, write_private

if TYPE_CHECKING:  # heavy imports (mlflow ~3 s, prefect ~2 s) only where they are used
    from mlflow import MlflowClient
    from mlflow.entities.webhook import Webhook

logger = logging.getLogger("flywheel.bridge")

WEBHOOK_PATH = "/webhooks/mlflow"
WEBHOOK_NAME = "flywheel-bridge"
SECRET_FILE = "webhook_secret"
NEXT_SECRET_FILE = "webhook_secret.next"
PREVIOUS_SECRET_FILE = "webhook_secret.previous"
DELIVERIES_DB = "bridge_deliveries.sqlite3"

DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"

# MLflow event ("entity.action") → Prefect event name. The webhook subscribes to exactly these.
EVENTS: dict[str, str] = {
    "model_version_alias.created": ALIAS_EVENT,
    "model_version_alias.deleted": ALIAS_DELETED_EVENT,
    "model_version.created": VERSION_CREATED_EVENT,
}
# Fields of `data` each event must carry (MLflow sends no version when an alias is deleted).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "model_version_alias.created": ("name", "alias", "version"),
    "model_version_alias.deleted": ("name", "alias"),
    "model_version.created": ("name", "version"),
}

DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_AGE_SECONDS = 300
DEFAULT_GRACE_SECONDS = 600
CLAIM_LEASE_SECONDS = 60.0  # a delivery "in progress" for longer than this was abandoned (crash) and may be retried
EMIT_TIMEOUT_SECONDS = 10.0  # well under MLflow's 30 s request timeout

Emit = Callable[..., Any]
"""`emit(*, event: str, resource: dict, payload: dict, id: uuid.UUID, occurred: datetime) -> Any`; raises on failure."""


class EmitError(RuntimeError):
    """The event could not be handed to Prefect (no API configured, unreachable, rejected)."""


# --------------------------------------------------------------------------------------------- Prefect side
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


# --------------------------------------------------------------------------------------------- secrets
def load_or_create_secret(state_dir: Path) -> str:
    """The webhook secret in `state_dir/webhook_secret` (0600), generated once with `secrets.token_urlsafe(32)`.

    Safe when several processes call it at once: the file is linked into place only if absent, so all of them
    end up with the same secret.
    """
    return load_or_create_private(Path(state_dir) / SECRET_FILE, lambda: secrets.token_urlsafe(32))


def secret_fingerprint(secret: str) -> str:
    """A short, non-reversible tag of the secret (MLflow never returns a webhook's secret, so we compare these)."""
    return hmac.new(secret.encode(), b"flywheel-webhook-secret-fingerprint", hashlib.sha256).hexdigest()[:16]


def _read_previous(state_dir: Path, now: float) -> str | None:
    try:
        record = json.loads((state_dir / PREVIOUS_SECRET_FILE).read_text())
        if float(record["expires_at"]) > now and isinstance(record["secret"], str) and record["secret"]:
            return record["secret"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _file_secrets(state_dir: Path, now: float | None = None) -> list[str]:
    """Secrets the state dir currently accepts: current, the one being rotated in, the previous (grace period)."""
    now = time.time() if now is None else now
    found = [
        read_private(state_dir / SECRET_FILE),
        read_private(state_dir / NEXT_SECRET_FILE),
        _read_previous(state_dir, now),
    ]
    return [s for s in dict.fromkeys(found) if s]


def rotate_secret(
    state_dir: Path,
    client: MlflowClient,
    url: str,
    name: str = WEBHOOK_NAME,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> str:
    """Replace the webhook secret: update the MLflow webhook, then the file; return the new secret.

    A running bridge accepts the new secret from before MLflow is updated (`webhook_secret.next`) and the old
    one for `grace_seconds` afterwards (`webhook_secret.previous`), so no delivery is rejected during the switch.
    If MLflow cannot be updated, nothing changes.
    """
    state_dir = Path(state_dir)
    old = load_or_create_secret(state_dir)
    new = secrets.token_urlsafe(32)
    next_path = state_dir / NEXT_SECRET_FILE
    write_private(next_path, new)
    try:
        ensure_webhook(client, url, new, name=name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            next_path.unlink()
        raise
    write_private(
        state_dir / PREVIOUS_SECRET_FILE, json.dumps({"secret": old, "expires_at": time.time() + grace_seconds})
    )
    write_private(state_dir / SECRET_FILE, new)
    with contextlib.suppress(FileNotFoundError):
        next_path.unlink()
    logger.info("webhook secret rotated (fingerprint %s); the old one is accepted for %.0fs",
                secret_fingerprint(new), grace_seconds)  # fmt: skip
    return new


class _SecretRing:
    """The secrets a delivery may be signed with, re-read from the state dir when its files change."""

    def __init__(self, secret: str | None, state_dir: Path):
        self._state_dir = state_dir
        at_start = _file_secrets(state_dir)
        # An explicit secret that is not the state dir's (e.g. FLYWHEEL_WEBHOOK_SECRET) stays valid for the
        # bridge's lifetime; one read from the state dir follows its rotations instead.
        self._pinned = secret if secret and secret not in at_start else None
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._cached: list[str] = []
        self._expires = float("inf")
        if not self._pinned and not at_start:
            raise ValueError("the bridge needs a webhook secret (explicit or in the state dir)")

    def _stat_key(self) -> tuple:
        key = []
        for name in (SECRET_FILE, NEXT_SECRET_FILE, PREVIOUS_SECRET_FILE):
            try:
                st = (self._state_dir / name).stat()
                key.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                key.append(None)
        return tuple(key)

    def current(self) -> list[bytes]:
        now = time.time()
        key = self._stat_key()
        with self._lock:
            if key != self._key or now >= self._expires:
                self._cached = _file_secrets(self._state_dir, now)
                self._key = key
                self._expires = self._previous_expiry(now)
            values = ([self._pinned] if self._pinned else []) + [s for s in self._cached if s != self._pinned]
        return [v.encode() for v in values]

    def _previous_expiry(self, now: float) -> float:
        try:
            expires = float(json.loads((self._state_dir / PREVIOUS_SECRET_FILE).read_text())["expires_at"])
            return expires if expires > now else float("inf")
        except (OSError, ValueError, KeyError, TypeError):
            return float("inf")


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery (for tests and tools): `v1,<base64 HMAC-SHA256>`."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def _signature_valid(header: str, delivery_id: str, timestamp: str, body: bytes, keys: Iterable[bytes]) -> bool:
    # Header values reach us latin-1-decoded; encoding back gives the bytes MLflow hashed (its ids are ASCII).
    signed = delivery_id.encode("latin-1") + b"." + timestamp.encode("latin-1") + b"." + body
    offered = []
    for part in header.split():  # Standard Webhooks allows several space-separated signatures
        version, _, value = part.partition(",")
        if version == SIGNATURE_VERSION and value:
            offered.append(value.encode("latin-1"))
    valid = False
    for key in keys:
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
        for value in offered:
            valid |= hmac.compare_digest(expected, value)  # no early exit: constant work per request
    return valid


# --------------------------------------------------------------------------------------------- replay memory
class DeliveryLog:
    """Delivery ids already handed to Prefect, in SQLite (WAL) so they survive restarts and several workers.

    A delivery is *claimed* before the event is emitted and *completed* after, or *released* if emitting
    failed (MLflow will retry it). A claim older than the lease is considered abandoned (a crash mid-emit).
    Rows expire once the delivery's timestamp is too old to be accepted again, and are pruned then.
    """

    def __init__(self, path: Path, lease_seconds: float = CLAIM_LEASE_SECONDS):
        self.path = Path(path)
        self.lease_seconds = lease_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS deliveries (delivery_id TEXT PRIMARY KEY, state TEXT NOT NULL,"
                " claimed_at REAL NOT NULL, expires_at REAL NOT NULL, event TEXT)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS deliveries_expires ON deliveries (expires_at)")
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    @contextlib.contextmanager
    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=15, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=15000")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self):
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def claim(self, delivery_id: str, expires_at: float, event: str = "", now: float | None = None) -> str:
        """'claimed' (go ahead), 'duplicate' (already emitted) or 'in_progress' (another request is emitting it)."""
        now = time.time() if now is None else now
        with self._transaction() as conn:
            conn.execute("DELETE FROM deliveries WHERE expires_at < ?", (now,))
            row = conn.execute(
                "SELECT state, claimed_at FROM deliveries WHERE delivery_id = ?", (delivery_id,)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO deliveries (delivery_id, state, claimed_at, expires_at, event) VALUES (?, ?, ?, ?, ?)",
                    (delivery_id, "pending", now, expires_at, event),
                )
                return "claimed"
            state, claimed_at = row
            if state == "done":
                return "duplicate"
            if now - claimed_at < self.lease_seconds:
                return "in_progress"
            conn.execute("UPDATE deliveries SET claimed_at = ? WHERE delivery_id = ?", (now, delivery_id))
            return "claimed"

    def complete(self, delivery_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE deliveries SET state = 'done' WHERE delivery_id = ?", (delivery_id,))

    def release(self, delivery_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM deliveries WHERE delivery_id = ? AND state = 'pending'", (delivery_id,))

    def count(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]


# --------------------------------------------------------------------------------------------- the app
class _BadRequest(Exception):
    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status = status
        self.error = error


def _error(status: int, error: str, **headers: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": error}, status_code=status, headers=headers or None)


def _parse_delivery(body: bytes) -> tuple[str, dict[str, Any], str | None]:
    """(mlflow event 'entity.action', data, body timestamp) or _BadRequest(400)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _BadRequest(400, f"body is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise _BadRequest(400, "body must be a JSON object")
    entity, action, data = doc.get("entity"), doc.get("action"), doc.get("data")
    if not isinstance(entity, str) or not isinstance(action, str) or not entity or not action:
        raise _BadRequest(400, "body needs string fields 'entity' and 'action'")
    if not isinstance(data, dict):
        raise _BadRequest(400, "body needs an object field 'data'")
    timestamp = doc.get("timestamp")
    return f"{entity}.{action}", data, timestamp if isinstance(timestamp, str) else None


def _occurred(body_timestamp: str | None, header_ts: int) -> dt.datetime:
    if body_timestamp:
        with contextlib.suppress(ValueError):
            parsed = dt.datetime.fromisoformat(body_timestamp)
            if parsed.tzinfo is not None:
                return parsed
    return dt.datetime.fromtimestamp(header_ts, tz=dt.UTC)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def create_bridge_app(
    secret: str | None,
    state_dir: Path,
    emit: Emit = prefect_emit,
    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The bridge as an ASGI app: `POST /webhooks/mlflow` and `GET /health`.

    `secret` is the webhook secret (the state dir's `webhook_secret`, and its rotations, are accepted too);
    `emit` hands an event to Prefect and raises when it cannot (tests inject a recorder).
    """
    state_dir = Path(state_dir)
    ring = _SecretRing(secret, state_dir)
    deliveries = DeliveryLog(state_dir / DELIVERIES_DB)

    async def health(request: Request) -> JSONResponse:  # noqa: ARG001
        return JSONResponse({"status": "ok"})

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise _BadRequest(400, "invalid Content-Length")
            if int(length) > max_body_bytes:
                raise _BadRequest(413, f"body larger than {max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise _BadRequest(413, f"body larger than {max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def deliver(delivery_id: str, header_ts: int, mlflow_event: str, data: dict, body_ts: str | None) -> JSONResponse:
        """Claim → emit → complete (or release), in a worker thread: SQLite and the emitter block."""
        prefect_event = EVENTS[mlflow_event]
        missing = [f for f in REQUIRED_FIELDS[mlflow_event] if not isinstance(data.get(f), str | int) or data[f] == ""]
        if missing:
            raise _BadRequest(400, f"'{mlflow_event}' data lacks {', '.join(missing)}")
        name, alias = str(data["name"]), data.get("alias")
        alias = str(alias) if alias not in (None, "") else None
        version = str(data["version"]) if data.get("version") not in (None, "") else None
        now = time.time()
        # A replay is refused by the timestamp check once |now - ts| > max_age: remember the id until then.
        expires_at = max(now, header_ts) + max_age_seconds + 60
        try:
            claim = deliveries.claim(delivery_id, expires_at, prefect_event, now)
        except sqlite3.Error as exc:
            logger.error("delivery %s: replay memory unavailable (%s)", delivery_id, exc)
            return _error(503, "replay memory unavailable", **{"Retry-After": "2"})
        if claim == "duplicate":
            logger.info("delivery %s: duplicate, ignored", delivery_id)
            return JSONResponse({"status": "duplicate", "delivery_id": delivery_id})
        if claim == "in_progress":
            return JSONResponse(
                {"status": "in_progress", "delivery_id": delivery_id}, status_code=503, headers={"Retry-After": "2"}
            )
        event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"mlflow-webhook-delivery:{delivery_id}")
        payload = {"name": name, "alias": alias, "version": version, "delivery_id": delivery_id, "timestamp": body_ts}
        try:
            result = emit(
                event=prefect_event,
                resource=alias_event_resource(name, alias),
                payload=payload,
                id=event_id,
                occurred=_occurred(body_ts, header_ts),
            )
            if inspect.isawaitable(result):  # an async emitter: this is a worker thread, so run it here
                asyncio.run(_await(result))
        except Exception as exc:  # noqa: BLE001 - whatever failed, MLflow must retry
            with contextlib.suppress(sqlite3.Error):
                deliveries.release(delivery_id)
            logger.error("delivery %s: %s not handed to Prefect: %s", delivery_id, prefect_event, exc)
            return _error(503, "could not hand the event to Prefect", **{"Retry-After": "2"})
        try:
            deliveries.complete(delivery_id)
        except sqlite3.Error as exc:  # emitted but not remembered: a retry could emit again (same event id)
            logger.warning("delivery %s: emitted but not recorded (%s)", delivery_id, exc)
        logger.info("delivery %s: emitted %s for %s alias=%s version=%s", delivery_id, prefect_event, name, alias,
                    version)  # fmt: skip
        return JSONResponse({"status": "emitted", "event": prefect_event, "event_id": str(event_id),
                             "delivery_id": delivery_id})  # fmt: skip

    async def webhook(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
            delivery_id = request.headers.get(DELIVERY_ID_HEADER, "").strip()
            timestamp = request.headers.get(TIMESTAMP_HEADER, "").strip()
            signature = request.headers.get(SIGNATURE_HEADER, "")
            if not delivery_id or not timestamp or not signature:
                return _error(401, "missing signature headers")
            if len(delivery_id) > 200 or len(timestamp) > 20 or len(signature) > 2048:
                return _error(401, "invalid signature headers")
            keys = await run_in_threadpool(ring.current)
            if not _signature_valid(signature, delivery_id, timestamp, body, keys):
                logger.warning("delivery %s: rejected, invalid signature", delivery_id[:64])
                return _error(401, "invalid signature")
            try:
                header_ts = int(timestamp)
            except ValueError:
                return _error(400, "X-MLflow-Timestamp must be Unix seconds")
            skew = time.time() - header_ts
            if abs(skew) > max_age_seconds:
                logger.warning("delivery %s: rejected, timestamp %+.0fs off", delivery_id, skew)
                return _error(400, f"timestamp outside the {max_age_seconds:.0f}s tolerance")
            mlflow_event, data, body_ts = _parse_delivery(body)
            if mlflow_event not in EVENTS:
                logger.info("delivery %s: event %s ignored", delivery_id, mlflow_event[:100])
                return JSONResponse({"status": "ignored", "event": mlflow_event})
            return await run_in_threadpool(deliver, delivery_id, header_ts, mlflow_event, data, body_ts)
        except _BadRequest as exc:
            return _error(exc.status, exc.error)
        except Exception:  # noqa: BLE001 - never a bare 500; 503 so MLflow retries
            logger.exception("unexpected error while handling a delivery")
            return _error(503, "internal error", **{"Retry-After": "2"})

    app = Starlette(routes=[Route("/health", health, methods=["GET"]), Route(WEBHOOK_PATH, webhook, methods=["POST"])])
    app.state.deliveries = deliveries
    app.state.secret_ring = ring
    return app


# --------------------------------------------------------------------------------------------- MLflow side
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
    hooks, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        hooks.extend(page)
        token = page.token
        if not token:
            return hooks


# --------------------------------------------------------------------------------------------- running it
def run_bridge(
    host: str,
    port: int,
    secret: str | None,
    state_dir: Path,
    emit: Emit = prefect_emit,
    log_level: str = "info",
) -> None:
    """Serve the bridge with uvicorn until interrupted."""
    import uvicorn

    app = create_bridge_app(secret, Path(state_dir), emit=emit)
    if emit is prefect_emit and not os.environ.get("PREFECT_API_URL"):
        logger.warning("PREFECT_API_URL is not set: every delivery will be answered 503 until it is")
    logger.info("bridge listening on http://%s:%s%s", host, port, WEBHOOK_PATH)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def main(argv: list[str] | None = None) -> None:
    from flywheel.core.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m flywheel.deployments.bridge", description="MLflow webhook → Prefect event bridge."
    )
    parser.add_argument("--host", default=settings.host, help="bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=settings.bridge_port, help="port (default %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=None, help="state dir (default FLYWHEEL_STATE_DIR)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = (args.state_dir or settings.state_path).expanduser().resolve()
    explicit = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    # The state dir's secret is always created: it is what `ensure_webhook` registers in the embedded stack.
    file_secret = load_or_create_secret(state_dir)
    run_bridge(args.host, args.port, explicit or file_secret, state_dir, log_level=args.log_level)


if __name__ == "__main__":
    main()
