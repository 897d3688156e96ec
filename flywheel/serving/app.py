"""The model server's transport: the Starlette ASGI app in front of a `ModelServer`.

Scoring speaks MLflow's protocol (`mlflow models serve`): `POST /invocations` with JSON, `text/csv` or Parquet.
`GET /ping` is 503 until a model is loaded; `/health` is 200 while the process runs; `/version` (with the engine
that predicts: `onnxruntime` for a compiled version, else `pyfunc`, and why); Prometheus
`/metrics`. The admin API (`/admin/load`, `/admin/smoke`, `/admin/swap`, `/admin/rollback`, `/admin/state`) always
needs `Authorization: Bearer <admin token>`; scoring needs the scoring token when one is set. Bodies are read with
a size cap. Every response carries `X-Request-Id`, `X-Flywheel-Model-Name` and `X-Flywheel-Model-Version` (the
version that scored it), added with the status/latency metrics by the outermost layer (`_Edge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from flywheel.core.http import BadContentLength, BodyTooLarge, read_body_capped
from flywheel.serving.batching import _Job
from flywheel.serving.errors import ApiError, _error_body
from flywheel.serving.parsing import (
    CSV,
    JSON,
    PARQUET,
    check_json_depth,
    decode_csv,
    decode_json,
    media_type,
    request_id_param,
    valid_request_id,
)
from flywheel.serving.server import ModelServer

__all__ = ["create_app"]

logger = logging.getLogger("flywheel.serving")

KNOWN_ENDPOINTS = (
    "/invocations",
    "/ping",
    "/health",
    "/version",
    "/metrics",
    "/admin/load",
    "/admin/smoke",
    "/admin/swap",
    "/admin/rollback",
    "/admin/state",
)


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, default=str).encode(), status_code=status, media_type=JSON)


def _error_response(err: ApiError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return Response(_error_body(err.code, err.message), status_code=err.status, media_type=JSON, headers=headers)


def _header_safe(value: str) -> bytes:
    return value.encode("ascii", "backslashreplace").replace(b"\r", b"").replace(b"\n", b"")


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _token_ok(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


async def _read_body(request: Request, limit: int) -> bytes:
    try:
        return await read_body_capped(request.headers, request.stream(), limit)
    except BadContentLength as exc:
        raise ApiError(400, "BAD_REQUEST", str(exc)) from None
    except BodyTooLarge as exc:
        raise ApiError(413, "REQUEST_TOO_LARGE", str(exc)) from None
    except ClientDisconnect:  # the client left, or its body missed the deadline (flywheel.core.http_server)
        raise ApiError(408, "REQUEST_TIMEOUT", "the request body did not arrive: the connection closed") from None


async def _admin_json(request: Request, limit: int) -> dict:
    body = await _read_body(request, limit)
    if not body.strip():
        return {}
    check_json_depth(body)
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "MALFORMED_REQUEST", f"request body is not valid JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise ApiError(400, "MALFORMED_REQUEST", "request body must be a JSON object")
    return decoded


class _Edge:
    """Outermost ASGI layer: request id, model headers on every response, status/latency metrics."""

    def __init__(self, app: Any, server: ModelServer) -> None:
        self.app, self.server = app, server
        self._name_header = _header_safe(server.model_name)
        self._requests: dict[tuple, Any] = {}  # (endpoint, method, status) → its counter (labels() costs ~10 µs)
        self._latency: dict[str, Any] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = valid_request_id(v.decode("latin-1"))
                break
        st = {"rid": rid, "rid_from_header": rid is not None, "version": None, "status": 500}
        scope["flywheel"] = st
        server = self.server

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                st["status"] = message["status"]
                version = st["version"]
                if version is None:
                    active = server.active
                    version = active.version if active is not None else "none"
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", (st["rid"] or _new_request_id(st)).encode()))
                headers.append((b"x-flywheel-model-name", self._name_header))
                headers.append((b"x-flywheel-model-version", version.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in KNOWN_ENDPOINTS else "other"
            key = (endpoint, scope.get("method", ""), st["status"])
            counter = self._requests.get(key)
            if counter is None:
                counter = self._requests[key] = server.metrics.requests.labels(
                    endpoint=endpoint, method=key[1], status=str(key[2])
                )
            counter.inc()
            latency = self._latency.get(endpoint)
            if latency is None:
                latency = self._latency[endpoint] = server.metrics.latency.labels(endpoint=endpoint)
            latency.observe(time.perf_counter() - t0)


_RID_PREFIX = os.urandom(8).hex()  # request ids: 32 hex digits, random per process, then a counter
_RID_COUNTER = itertools.count()


def _new_request_id(st: dict) -> str:
    st["rid"] = f"{_RID_PREFIX}{next(_RID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"
    return st["rid"]


def create_app(server: ModelServer | str, /, *args: Any, **kwargs: Any) -> _App:
    """The ASGI app in front of `server`, or of `ModelServer(*args, **kwargs)` when given ModelServer's arguments
    instead (`create_app(model_name, tracking_uri, admin_token=..., ...)`). `app.server` and `app.state.server` are
    the `ModelServer` behind it. Loading the initial version/alias, the request-log thread and its final flush run
    in the app's lifespan (uvicorn, or `with TestClient(app)`)."""
    if not isinstance(server, ModelServer):
        server = ModelServer(server, *args, **kwargs)
    elif args or kwargs:
        raise TypeError("create_app(server) takes no other arguments: they are the ModelServer's")
    model_name = server.model_name

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as err:
                return _error_response(err)
            except Exception as exc:
                logger.exception("unhandled error on %s", request.url.path)
                return _error_response(ApiError(500, "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"))

        return endpoint

    def admin(handler):
        async def endpoint(request: Request) -> Response:
            if server.admin_token is None:
                raise ApiError(403, "PERMISSION_DENIED", "the admin API is disabled (no admin token configured)")
            token = _bearer(request)
            if token is None:
                raise ApiError(401, "UNAUTHENTICATED", "admin API: missing 'Authorization: Bearer <token>' header")
            if not _token_ok(token, server.admin_token):
                raise ApiError(403, "PERMISSION_DENIED", "admin API: invalid admin token")
            return await handler(request)

        return guarded(endpoint)

    async def invocations(request: Request) -> Response:
        st = request.scope["flywheel"]
        if server.scoring_token is not None and not _token_ok(_bearer(request), server.scoring_token):
            raise ApiError(401, "UNAUTHENTICATED", "missing or invalid 'Authorization: Bearer <token>' header")
        slot = server.active
        if slot is None:
            raise ApiError(503, "MODEL_NOT_LOADED", f"no version of model '{model_name}' is loaded yet")
        st["version"] = slot.version
        body = await _read_body(request, server.max_body_bytes)
        mime = media_type(request.headers.get("content-type"))
        if not body.strip():
            raise ApiError(400, "BAD_REQUEST", "empty request body")
        rid = st["rid"]
        if mime == JSON:
            decoded = decode_json(body)
            rid = rid or request_id_param(decoded) or _new_request_id(st)
            st["rid"] = rid
            job = server._json_job(slot, decoded, rid, len(body))
        elif mime == CSV:
            job = _Job(slot=slot, kind="csv", payload=decode_csv(body), rid=rid or _new_request_id(st))
        elif mime == PARQUET:
            job = _Job(slot=slot, kind="parquet", payload=body, rid=rid or _new_request_id(st))
        else:
            raise ApiError(
                415, "UNSUPPORTED_MEDIA_TYPE", f"unsupported Content-Type {mime!r}: use {JSON}, {CSV} or {PARQUET}"
            )
        job.size, job.client = len(body), request.scope.get("client")
        out = await server.submit(job)
        return Response(out.body, status_code=out.status, media_type=JSON)

    async def ping(request: Request) -> Response:
        active = server.active
        if active is None:
            return _json_response({"status": "no model loaded", "model_name": model_name}, 503)
        return _json_response({"status": "ok", "model_name": model_name, "version": active.version})

    async def health(request: Request) -> Response:
        active, standby = server.active, server.standby
        return _json_response(
            {
                "status": "ok" if active else "no model loaded",
                "model_name": model_name,
                "role": server.role,
                "active_version": active.version if active else None,
                "standby_version": standby.version if standby else None,
                "loading": server.loading is not None,
            }
        )

    async def version(request: Request) -> Response:
        from mlflow.version import VERSION

        active = server.active
        return _json_response(
            {
                "model_name": model_name,
                "model_version": active.version if active else None,
                "mlflow_version": VERSION,
                "engine": active.engine if active else None,  # onnxruntime (compiled) or pyfunc
                "compiled": active.engine_reason if active else None,
            }
        )

    async def metrics(request: Request) -> Response:
        if server.request_log is not None:
            stats = server.request_log
            server.metrics.log_rows.labels(state="written").set(stats.rows_written)
            server.metrics.log_rows.labels(state="buffered").set(stats.buffered_rows)
            server.metrics.log_rows.labels(state="dropped").set(stats.rows_dropped)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def admin_load(request: Request) -> Response:
        status, payload = await server.admin_load(await _admin_json(request, server.max_body_bytes))
        return _json_response(payload, status)

    async def admin_smoke(request: Request) -> Response:
        body = await _admin_json(request, server.max_body_bytes)
        records = body.get("records")
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", '"records" must be a non-empty list of JSON objects')
        try:
            max_error_rate = float(body.get("max_error_rate", 0.0))
            max_p50_ms = float(body.get("max_p50_ms", 500.0))
        except (TypeError, ValueError):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", '"max_error_rate" and "max_p50_ms" must be numbers'
            ) from None
        slot_name = body.get("slot", "standby")
        if slot_name not in ("standby", "active"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", '"slot" must be "standby" or "active"')
        result = await asyncio.to_thread(server.smoke, records, max_error_rate, max_p50_ms, slot_name)
        return _json_response(result)

    async def admin_swap(request: Request) -> Response:
        body = await _admin_json(request, server.max_body_bytes)
        expect = body.get("version")
        return _json_response(server.swap(str(expect) if expect is not None else None))

    async def admin_rollback(request: Request) -> Response:
        await _admin_json(request, server.max_body_bytes)
        return _json_response(server.swap(rollback=True))

    async def admin_state(request: Request) -> Response:
        return _json_response(server.state())

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "ENDPOINT_NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "BAD_REQUEST")
        return Response(_error_body(code, f"{request.method} {request.url.path}: {exc.detail}"), exc.status_code,
                        media_type=JSON, headers=getattr(exc, "headers", None))  # fmt: skip

    async def server_error(request: Request, exc: Exception) -> Response:
        return Response(_error_body("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"), 500, media_type=JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.startup()
        try:
            yield
        finally:
            server.shutdown()

    routes = [
        Route("/invocations", guarded(invocations), methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/load", admin(admin_load), methods=["POST"]),
        Route("/admin/smoke", admin(admin_smoke), methods=["POST"]),
        Route("/admin/swap", admin(admin_swap), methods=["POST"]),
        Route("/admin/rollback", admin(admin_rollback), methods=["POST"]),
        Route("/admin/state", admin(admin_state), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error, Exception: server_error}
    )
    app.state.server = server
    return _App(_Edge(app, server), app, server)


class _App:
    """The ASGI callable returned by `create_app` (`.server` is the ModelServer, `.state.server` too)."""

    def __init__(self, edge: _Edge, starlette: Starlette, server: ModelServer) -> None:
        self._edge, self.starlette, self.server, self.state = edge, starlette, server, starlette.state

    async def __call__(self, scope, receive, send) -> None:
        await self._edge(scope, receive, send)
