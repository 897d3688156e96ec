"""The bridge's replay memory: which MLflow deliveries were already handed to Prefect."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

DELIVERIES_DB = "bridge_deliveries.sqlite3"
CLAIM_LEASE_SECONDS = 60.0  # a delivery "in progress" for longer than this was abandoned (crash) and may be retried


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
