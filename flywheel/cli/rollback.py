"""`flywheel rollback`: a run of the `rollback/manual` deployment, so it shows in the Prefect UI with its logs and
reason, like any other run of the loop. The run moves `champion` back, deploys that version at once and records the
version moved away from as rolled back (when, by whom, why)."""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable

from flywheel.core.errors import UserError
from flywheel.core.settings import Settings

DEPLOYMENT = "rollback/manual"
DEFAULT_REASON = "rolled back by hand with `flywheel rollback`"
RUN_TIMEOUT_SECONDS = 600.0


def who() -> str:
    """Who asked, as the ledger records it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown user"
    return f"{user} (flywheel rollback)"


def rollback_parameters(model: str | None, to_version: str | None, reason: str | None, settings: Settings) -> dict:
    """The deployment run's parameters; a blank reason is the default one, never an empty record."""
    if to_version is not None and not str(to_version).strip().isdigit():
        raise UserError(f"--to must be a version number, got {to_version!r}")
    return {
        "name": model or settings.model_name,
        "alias": "champion",
        "to_version": str(to_version).strip() if to_version is not None else None,
        "reason": (reason or "").strip() or DEFAULT_REASON,
        "by": who(),
    }


def run_rollback(
    settings: Settings,
    model: str | None,
    to_version: str | None,
    reason: str | None,
    echo: Callable[[str], None] = print,
    timeout: float = RUN_TIMEOUT_SECONDS,
) -> dict:
    """Run `rollback/manual` on the stack's Prefect server and wait for it; what it did. UserError when there is
    no server to run it on, the deployment is missing, or the run did not complete (its message says why)."""
    from flywheel.stack import local

    params = rollback_parameters(model, to_version, reason, settings)
    local.prepare_env(settings)  # a running stack's PREFECT_API_URL, unless the user set one
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            f"`flywheel rollback` runs the Prefect deployment {DEPLOYMENT}, and no Prefect server is known: start "
            "the stack with `flywheel up`, or set PREFECT_API_URL to a server where it is deployed"
        )
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(DEPLOYMENT, parameters=params, timeout=timeout)
    except ObjectNotFound:
        where = os.environ["PREFECT_API_URL"]
        raise UserError(f"deployment {DEPLOYMENT} is not on the Prefect server at {where}") from None
    state = run.state
    if state is None or not state.is_final():
        raise UserError(f"{DEPLOYMENT} run {run.name} is still {state.name if state else 'pending'} after "
                        f"{timeout:.0f}s: follow it in the Prefect UI")  # fmt: skip
    if not state.is_completed():
        raise UserError(f"{DEPLOYMENT} run {run.name} ended {state.name}: {state.message}")
    echo(state.message or f"{DEPLOYMENT} run {run.name} completed")
    return {"run": run.name, "run_id": str(run.id), "state": state.name, "message": state.message, **params}
