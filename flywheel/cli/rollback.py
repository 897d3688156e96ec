"""`flywheel rollback`: a run of the `rollback/manual` deployment, so it shows in the Prefect UI with its logs and
reason, like any other run of the loop. The run moves `champion` back, deploys that version at once and records the
version moved away from as rolled back (when, by whom, why)."""

from __future__ import annotations

import getpass
import os
import uuid
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
    run = _run_deployment(os.environ["PREFECT_API_URL"], params, timeout)
    state = run["state"] or {}
    if state.get("type") not in FINAL_STATES:
        raise UserError(f"{DEPLOYMENT} run {run['name']} is still {state.get('name') or 'pending'} after "
                        f"{timeout:.0f}s: follow it in the Prefect UI")  # fmt: skip
    if state.get("type") != "COMPLETED":
        raise UserError(f"{DEPLOYMENT} run {run['name']} ended {state.get('name')}: {state.get('message')}")
    echo(state.get("message") or f"{DEPLOYMENT} run {run['name']} completed")
    return {"run": run["name"], "run_id": str(run["id"]), "state": state.get("name"), "message": state.get("message"),
            **params}  # fmt: skip


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
POLL_SECONDS = 0.5
RETRIES = 5
RETRY_STATUSES = (429, 502, 503)


def _run_deployment(api_url: str, params: dict, timeout: float) -> dict:
    """What `prefect.deployments.run_deployment` does, through Prefect's REST API: create a run of DEPLOYMENT and
    wait for a final state; the flow run as the API returns it. Importing Prefect costs the command 2-10 s before
    the run even exists, and `flywheel rollback` is what a person waits for with a bad version serving."""
    import time

    import httpx

    headers = {}
    if os.environ.get("PREFECT_API_KEY"):  # Prefect Cloud
        headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
    elif os.environ.get("PREFECT_API_AUTH_STRING"):  # a self-hosted server behind basic auth
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
    idempotency_key = f"flywheel-rollback-{uuid.uuid4()}"  # a retried create makes one run, not two
    # Read timeout past Prefect's SQLite busy timeout (60 s): a request queued behind a locked database is answered.
    timeout_cfg = httpx.Timeout(90, connect=10)
    with httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout_cfg, headers=headers) as http:

        def call(method: str, path: str, **kwargs) -> httpx.Response:
            """One API call, retried on 429/502/503 with a growing pause, as Prefect's own client does
            (PREFECT_CLIENT_MAX_RETRIES): a busy SQLite-backed server answers 503 for a moment."""
            for attempt in range(RETRIES + 1):
                try:
                    resp = http.request(method, path, **kwargs)
                except httpx.TransportError as exc:
                    if attempt == RETRIES:
                        raise UserError(f"the Prefect server at {api_url} is unreachable: {exc}") from None
                else:
                    if resp.status_code not in RETRY_STATUSES or attempt == RETRIES:
                        return resp
                time.sleep(min(2**attempt, 10))
            raise AssertionError("unreachable")

        def ok(resp: httpx.Response, what: str) -> dict:
            if resp.status_code >= 400:
                raise UserError(f"the Prefect server at {api_url} refused to {what}: HTTP {resp.status_code} "
                                f"{resp.text[:300]}")  # fmt: skip
            return resp.json()

        found = call("GET", f"/deployments/name/{DEPLOYMENT}")
        if found.status_code == 404:
            raise UserError(f"deployment {DEPLOYMENT} is not on the Prefect server at {api_url}")
        deployment = ok(found, f"read the deployment {DEPLOYMENT}")
        created = call("POST", f"/deployments/{deployment['id']}/create_flow_run",
                       json={"parameters": params, "idempotency_key": idempotency_key})  # fmt: skip
        run = ok(created, f"start a run of {DEPLOYMENT}")
        deadline = time.monotonic() + timeout
        while ((run.get("state") or {}).get("type") not in FINAL_STATES) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            try:
                resp = http.get(f"/flow_runs/{run['id']}")
                resp.raise_for_status()
                run = resp.json()
            except httpx.HTTPError:  # the server busy or restarting: keep waiting until the deadline
                continue
        return run
