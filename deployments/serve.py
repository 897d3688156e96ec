"""Serve every Flywheel deployment from one process (`python -m flywheel.deployments.serve`).

The embedded default runs this next to the Prefect server instead of a work pool + worker: runs start within
seconds of their trigger (PREFECT_RUNNER_POLL_FREQUENCY, 2 s here) and SIGTERM pauses the deployments.
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    from flywheel.deployments.definitions import build_deployments
    from prefect import serve

    serve(*build_deployments(), limit=int(os.environ.get("FLYWHEEL_SERVE_LIMIT", "4")))


if __name__ == "__main__":
    main()
