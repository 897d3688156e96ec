"""Serve every Flywheel deployment from one process (`python -m flywheel.deployments.serve`).

The embedded default runs this next to the Prefect server instead of a work pool + worker. Besides Prefect's
runner (which polls every PREFECT_RUNNER_POLL_FREQUENCY, 2 s here, and starts each run in a fresh interpreter),
the process runs on threads:

- the warm executor (deployments/executor.py): `deploy-model` runs are claimed as soon as they are Scheduled and
  run here, already imported; the runner stays the fallback for them;
- the alias watch: the reconciler's check every FLYWHEEL_RECONCILE_SECONDS, quiet unless an alias and what serves
  differ. `reconcile/every-minute` is therefore served without a schedule here (by hand it still runs).

SIGTERM pauses the deployments. The supervisor of `flywheel up` restarts this process if it dies; the model
servers keep serving meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading

RECONCILE = "reconcile/every-minute"


def main() -> None:
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    from prefect import serve

    from flywheel.core.settings import get_settings
    from flywheel.deployments.definitions import build_deployments
    from flywheel.deployments.executor import AliasWatch, WarmExecutor

    logging.getLogger("flywheel.executor").setLevel(logging.INFO)  # Prefect's handlers print it to the log
    settings = get_settings()
    warm = WarmExecutor()
    watch = AliasWatch(settings.model_name, settings.reconcile_seconds, RECONCILE)
    for name, target in (("warm-executor", warm.serve_forever), ("alias-watch", watch.serve_forever)):
        threading.Thread(target=target, name=name, daemon=True).start()
    serve(*build_deployments(settings, unscheduled=(RECONCILE,)), limit=settings.serve_limit)


if __name__ == "__main__":
    main()
