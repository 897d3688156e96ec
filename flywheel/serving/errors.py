"""The model server's errors: `ApiError` and the JSON error body MLflow's scoring server answers with.

A body is `{"error_code": ..., "message": ...}`; messages are clipped (MLflow's own embed the whole input frame).
Free of HTTP types: the app turns an ApiError into a response.
"""

from __future__ import annotations

import json

MAX_ERROR_MESSAGE = 1_000


class ApiError(Exception):
    """An error answered as `{"error_code": ..., "message": ...}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": _clip(message)}).encode()


def _clip(message: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    message = str(message)
    return message if len(message) <= limit else message[: limit - 20] + " …[truncated]"


def _mlflow_message(exc: Exception) -> str:
    """The useful part of an MLflow error (its messages embed the whole input frame)."""
    msg = getattr(exc, "message", None) or str(exc)
    if msg.startswith("Failed to enforce schema of data") and "Error: " in msg:
        msg = "Failed to enforce the model's input schema: " + msg.split("Error: ", 1)[1]
    return msg
