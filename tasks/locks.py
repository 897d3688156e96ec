"""Locks: Prefect global concurrency limits of 1 that put work on one model in series across processes.

Deployments of one model and alias, the packaging of one model, and the writers of one model's deployment ledger
each take their own lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def deploy_lock(name: str, alias: str) -> str:
    """Keeps deployments of one model and alias in series."""
    return f"deploy-{name}-{alias}"


def package_lock(name: str) -> str:
    """One packaging of a model at a time: the staging and the production deployment of a version share its build
    context directory and image tag (the second reuses the first's image)."""
    return f"package-{name}"


def ledger_lock(name: str) -> str:
    """One writer of a model's deployment ledger at a time (champion and challenger deployments both write it)."""
    return f"ledger-{name}"


def ensure_lock(lock: str) -> str:
    """A Prefect global concurrency limit of 1 named `lock`, created if missing.

    `concurrency()` is a silent no-op for a limit that does not exist, so the limit is created first (by any
    deployment that gets here first; a concurrent creator's conflict is harmless) and then taken strictly.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(lock, 1)
        except ObjectAlreadyExists:
            pass
    return lock


@contextmanager
def held(lock: str, timeout_seconds: float) -> Iterator[None]:
    """Hold `lock` (created if missing) for the block; TimeoutError if it is not free within `timeout_seconds`.

    A short lease (renewed while this run lives) frees the lock soon after a killed process stops renewing it.
    """
    from prefect.concurrency.sync import concurrency

    with concurrency(ensure_lock(lock), occupy=1, timeout_seconds=timeout_seconds, lease_duration=60, strict=True):
        yield
