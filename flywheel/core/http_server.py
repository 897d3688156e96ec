"""How Flywheel's two HTTP services (the model server and the webhook bridge) run uvicorn: connection limits and
request deadlines, so half-open connections cannot exhaust them (issue 15, item 8b).

uvicorn's own settings are used where they exist: `limit_concurrency` (beyond it a request is answered 503 at
once), `timeout_keep_alive` (an idle connection between requests is closed) and `backlog`. uvicorn has no
deadline for *receiving* a request (its `--timeout-request-start` / `--timeout-request-complete` were planned in
Kludex/uvicorn#157 and never built): its keep-alive timer only runs between requests, is cancelled by any byte
received, and no timer runs at all before a connection's first request. A client that connects and sends nothing,
or a partial header, or half a body, held its connection for ever (250 of them for 30 s in the tester's run). So
`deadline_protocol` subclasses uvicorn's httptools protocol (the one `http="auto"` picks) and adds only that:

* the request head (request line and headers) must arrive within `header_timeout` seconds of the connection
  opening, or of the request's first byte on a kept-alive connection, and be at most `max_header_bytes` long
  (httptools, unlike h11, has no size limit of its own);
* the body must arrive within `body_timeout` seconds of the head.

When a deadline passes the connection gets a 408 JSON answer (unless a response has started) and is closed;
the application sees a disconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("flywheel.http")

HEADER_TIMEOUT_SECONDS = 10.0  # request line + headers, from connect (or the first byte of a kept-alive request)
BODY_TIMEOUT_SECONDS = 30.0  # the whole body, from the end of the headers
MAX_HEADER_BYTES = 64 * 1024  # request line + headers
MAX_CONNECTIONS = 1000  # uvicorn's limit_concurrency: open connections (or running requests) before 503s
BACKLOG = 2048  # uvicorn's default: accepted-but-not-yet-handled connections the kernel queues

ErrorBody = Callable[[str, str], bytes]  # (code, message) → JSON body


def _default_error_body(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


def deadline_protocol(
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
    max_header_bytes: int = MAX_HEADER_BYTES,
    error_body: ErrorBody = _default_error_body,
) -> type:
    """uvicorn's httptools protocol class with request deadlines and a header size limit (pass as `http=`)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class DeadlineHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._refused = False

        # -- timers
        def _arm(self, seconds: float, phase: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self, phase: str, seconds: float) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            in_request = phase == "body" and cycle is not None
            if not (in_request and cycle.response_started):
                self._answer(408, "REQUEST_TIMEOUT", f"request {phase} not received within {seconds:g} s")
            if in_request:
                cycle.keep_alive = False
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            logger.warning("closed connection from %s: request %s not received within %gs", client, phase, seconds)
            self.transport.close()

        def _answer(self, status: int, code: str, message: str) -> None:
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = error_body(code, message)
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, reason, len(body))
                + body
            )
            self._refused = True

        # -- protocol events
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout, "headers")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if self._deadline is None:  # a kept-alive connection's next request
                self._arm(header_timeout, "headers")

        def _count_head(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > max_header_bytes:
                self._disarm()
                self._answer(431, "REQUEST_HEADERS_TOO_LARGE", f"request headers exceed {max_header_bytes} bytes")
                self.transport.close()
                raise ValueError("request headers too large")  # stops the parser (uvicorn: HttpParserError)

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._arm(body_timeout, "body")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            if self._refused:  # already answered (431) and closing
                return
            super().send_400_response(msg)

        def timeout_keep_alive_handler(self) -> None:
            self._disarm()
            super().timeout_keep_alive_handler()

    return DeadlineHttpToolsProtocol


def uvicorn_limits(
    *,
    max_connections: int = MAX_CONNECTIONS,
    keep_alive_seconds: int = 5,
    header_timeout: float = HEADER_TIMEOUT_SECONDS,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
    error_body: ErrorBody = _default_error_body,
) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run`/`uvicorn.Config`: uvicorn's own limits plus the deadline protocol."""
    return {
        "http": deadline_protocol(header_timeout, body_timeout, error_body=error_body),
        "limit_concurrency": max_connections,
        "timeout_keep_alive": keep_alive_seconds,
        "backlog": BACKLOG,
    }
