"""The webhook secret: created once in the state dir, accepted with its rotations, replaced without a lost delivery.

`webhook_secret` in the state dir (mode 0600) is what `ensure_webhook` registers with MLflow; it is re-read while
the bridge runs, so `rotate_secret` takes effect without a restart, and the previous secret stays valid for a grace
period (MLflow caches its webhook list, secrets included, for `MLFLOW_WEBHOOK_CACHE_TTL`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.bridge.signing import secret_fingerprint
from flywheel.bridge.webhooks import WEBHOOK_NAME, ensure_webhook
from flywheel.core.files import load_or_create_private, read_private, write_private

if TYPE_CHECKING:  # mlflow takes ~3 s to import
    from mlflow import MlflowClient

logger = logging.getLogger("flywheel.bridge")

SECRET_FILE = "webhook_secret"
NEXT_SECRET_FILE = "webhook_secret.next"
PREVIOUS_SECRET_FILE = "webhook_secret.previous"
DEFAULT_GRACE_SECONDS = 600


def load_or_create_secret(state_dir: Path) -> str:
    """The webhook secret in `state_dir/webhook_secret` (0600), generated once with `secrets.token_urlsafe(32)`.

    Safe when several processes call it at once: the file is linked into place only if absent, so all of them
    end up with the same secret.
    """
    return load_or_create_private(Path(state_dir) / SECRET_FILE, lambda: secrets.token_urlsafe(32))


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


class SecretRing:
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
