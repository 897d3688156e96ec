"""What Flywheel's two HTTP services (the model server and the webhook bridge) share about reading requests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping


class BodyTooLarge(Exception):
    """The body is over the limit; `declared` says whether Content-Length said so before any byte was read."""

    def __init__(self, limit: int, size: int | None, declared: bool):
        self.limit, self.size, self.declared = limit, size, declared
        super().__init__(
            f"request body of {size} bytes exceeds the limit of {limit}"
            if declared
            else f"request body exceeds the limit of {limit} bytes"
        )


class BadContentLength(ValueError):
    """The Content-Length header is not an integer."""


async def read_body_capped(headers: Mapping[str, str], stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refused as soon as it is known to exceed `limit` bytes: from Content-Length before reading
    (so a client that declares a huge body is answered at once), else while streaming (chunked or lying clients).
    Starlette's `request.body()` reads everything first, so a flood would sit in memory before the check."""
    length = headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):  # RFC 9110: 1*DIGIT (int() would take "-1", " 5", "1_0")
            raise BadContentLength(f"invalid Content-Length header: {length!r}")
        declared = int(length)
        if declared > limit:
            raise BodyTooLarge(limit, declared, declared=True)
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit, size, declared=False)
        chunks.append(chunk)
    return b"".join(chunks)
