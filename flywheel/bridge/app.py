"""The bridge as an ASGI app: `POST /webhooks/mlflow` (verify, parse, claim, emit) and `GET /health`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flywheel.bridge.deliveries import DELIVERIES_DB, DeliveryLog
from flywheel.bridge.emit import Emit, prefect_emit
from flywheel.bridge.refusals import RegistryCheck, name_problem
from flywheel.bridge.secrets import SecretRing
from flywheel.bridge.signing import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_valid
from flywheel.bridge.webhooks import EVENTS, WEBHOOK_PATH
from flywheel.core.events import alias_event_resource
from flywheel.core.http import BadContentLength, BodyTooLarge, read_body_capped

logger = logging.getLogger("flywheel.bridge")

# Fields of `data` each event must carry (MLflow sends no version when an alias is deleted).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "model_version_alias.created": ("name", "alias", "version"),
    "model_version_alias.deleted": ("name", "alias"),
    "model_version.created": ("name", "version"),
}

DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_AGE_SECONDS = 300


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
    registry: RegistryCheck | None = None,
) -> Starlette:
    """The bridge as an ASGI app: `POST /webhooks/mlflow` and `GET /health`.

    `secret` is the webhook secret (the state dir's `webhook_secret`, and its rotations, are accepted too);
    `emit` hands an event to Prefect and raises when it cannot (tests inject a recorder). A delivery whose names
    MLflow could not have sent is refused (422); with `registry`, so is one naming a model or version that is
    not in the registry (422), and one the registry cannot vouch for right now gets 503 (MLflow retries it).
    """
    state_dir = Path(state_dir)
    ring = SecretRing(secret, state_dir)
    deliveries = DeliveryLog(state_dir / DELIVERIES_DB)

    async def health(request: Request) -> JSONResponse:  # noqa: ARG001
        return JSONResponse({"status": "ok"})

    def deliver(delivery_id: str, header_ts: int, mlflow_event: str, data: dict, body_ts: str | None) -> JSONResponse:
        """Claim → emit → complete (or release), in a worker thread: SQLite and the emitter block."""
        prefect_event = EVENTS[mlflow_event]
        missing = [f for f in REQUIRED_FIELDS[mlflow_event] if not isinstance(data.get(f), str | int) or data[f] == ""]
        if missing:
            raise _BadRequest(400, f"'{mlflow_event}' data lacks {', '.join(missing)}")
        name, alias = str(data["name"]), data.get("alias")
        alias = str(alias) if alias not in (None, "") else None
        version = str(data["version"]) if data.get("version") not in (None, "") else None
        problem = name_problem(name, alias, version)
        if problem is None and registry is not None:
            verdict = registry.check(name, None if mlflow_event == "model_version_alias.deleted" else version)
            if verdict.exists is None:
                logger.warning("delivery %s: not checked against the registry (%s): retry", delivery_id,
                               verdict.reason)  # fmt: skip
                return _error(503, verdict.reason, **{"Retry-After": "2"})
            problem = None if verdict.exists else verdict.reason
        if problem is not None:
            logger.warning("delivery %s: %s refused, not emitted: %s", delivery_id, mlflow_event, problem)
            return JSONResponse({"status": "refused", "error": problem, "delivery_id": delivery_id}, status_code=422)
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
            body = await read_body_capped(request.headers, request.stream(), max_body_bytes)
            delivery_id = request.headers.get(DELIVERY_ID_HEADER, "").strip()
            timestamp = request.headers.get(TIMESTAMP_HEADER, "").strip()
            signature = request.headers.get(SIGNATURE_HEADER, "")
            if not delivery_id or not timestamp or not signature:
                return _error(401, "missing signature headers")
            if len(delivery_id) > 200 or len(timestamp) > 20 or len(signature) > 2048:
                return _error(401, "invalid signature headers")
            keys = await run_in_threadpool(ring.current)
            if not signature_valid(signature, delivery_id, timestamp, body, keys):
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
        except BadContentLength:
            return _error(400, "invalid Content-Length")
        except ClientDisconnect:  # the sender left, or its body missed the deadline (flywheel.core.http_server)
            return _error(408, "the request body did not arrive")
        except BodyTooLarge:
            return _error(413, f"body larger than {max_body_bytes} bytes")
        except _BadRequest as exc:
            return _error(exc.status, exc.error)
        except Exception:  # noqa: BLE001 - never a bare 500; 503 so MLflow retries
            logger.exception("unexpected error while handling a delivery")
            return _error(503, "internal error", **{"Retry-After": "2"})

    app = Starlette(routes=[Route("/health", health, methods=["GET"]), Route(WEBHOOK_PATH, webhook, methods=["POST"])])
    app.state.deliveries = deliveries
    app.state.secret_ring = ring
    app.state.registry = registry
    return app
