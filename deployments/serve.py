"""Serve every Flywheel deployment from one process (`python -m flywheel.deployments.serve`).

The embedded default runs this next to the Prefect server instead of a work pool + worker. Besides Prefect's
runner (which polls every PREFECT_RUNNER_POLL_FREQUENCY, 2 s here, and starts each run in a fresh interpreter),
the process runs on threads:

- the warm executor (deployments/executor.py): `deploy-model`, `rollback` and `reconcile` runs are claimed as soon
  as they are Scheduled and run here, already imported. It creates the alias trigger's `deploy-model` runs itself,
  from the alias events; the deployment's trigger is applied as its fallback (proactive: it fires only when the
  executor did not say it created the run). Those deployments are applied here, not given to the
  runner: a runner serving them too would race the executor for each run and start the ones it won cold;
- the warm imports: what the first deployment's packaging and smoke test need (skl2onnx, mlflow.pyfunc, …), imported
  at start instead of on that deployment's clock;
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

    from flywheel.core.imports import warm_imports
    from flywheel.core.settings import get_settings
    from flywheel.deployments.definitions import build_deployments
    from flywheel.deployments.executor import (
        DEPLOY_DEPLOYMENT,
        DEPLOY_IMPORTS,
        WARM_DEPLOYMENTS,
        AliasWatch,
        WarmExecutor,
    )

    logging.getLogger("flywheel.executor").setLevel(logging.INFO)  # Prefect's handlers print it to the log
    settings = get_settings()
    warm = WarmExecutor()
    watch = AliasWatch(settings.model_name, settings.reconcile_seconds, RECONCILE, executor=warm)
    threads = (("warm-imports", lambda: warm_imports(DEPLOY_IMPORTS)), ("warm-executor", warm.serve_forever),
               ("alias-watch", watch.serve_forever))  # fmt: skip
    for name, target in threads:
        threading.Thread(target=target, name=name, daemon=True).start()
    runner_served = []
    # The executor creates the alias trigger's runs from the events itself; Prefect's trigger stays as its fallback.
    for deployment in build_deployments(settings, unscheduled=(RECONCILE,), runs_created_for=(DEPLOY_DEPLOYMENT,)):
        if f"{deployment.flow_name}/{deployment.name}" in WARM_DEPLOYMENTS:
            deployment.apply()  # created (with its trigger) as `serve` would; the executor runs its runs
        else:
            runner_served.append(deployment)
    serve(*runner_served, limit=settings.serve_limit)


if __name__ == "__main__":
    main()
