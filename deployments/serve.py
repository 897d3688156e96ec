"""Serve every Flywheel deployment from one process (`python -m flywheel.deployments.serve`).

The embedded default runs this next to the Prefect server instead of a work pool + worker: runs start within
seconds of their trigger (PREFECT_RUNNER_POLL_FREQUENCY, 2 s here) and SIGTERM pauses the deployments.
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    from prefect import serve

    from flywheel.core.settings import get_settings
    from flywheel.deployments.definitions import build_deployments

    settings = get_settings()
    serve(*build_deployments(settings), limit=settings.serve_limit)


if __name__ == "__main__":
    main()
