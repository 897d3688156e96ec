"""The servers and data the benchmarks share: the flights (loaded once), a bench MLflow or Prefect server on a free
port, a fresh interpreter's import time, Prefect settings by name.

Like bench/common.py, nothing here imports Prefect, MLflow or Flywheel's tasks at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import median, stopwatch

_FLIGHTS: Any = None


def flights() -> Any:
    """All 2013 flights as Flywheel's data task builds them (loaded once per process)."""
    global _FLIGHTS
    if _FLIGHTS is None:
        from flywheel.tasks.data import load_flights

        _FLIGHTS = load_flights()
    return _FLIGHTS


def start_mlflow(root: Path) -> tuple[Any, float]:
    """A bench MLflow server (SQLite, local artifacts) on a free port: (process, seconds to healthy)."""
    from flywheel.stack import processes

    with stopwatch() as t:
        server = processes.start_mlflow_in(root)
    return server, t["seconds"]


def start_prefect(root: Path) -> tuple[Any, float]:
    """A bench Prefect server on a free port, its home under `root`: (process, seconds to healthy)."""
    from flywheel.stack import processes

    with stopwatch() as t:
        server = processes.start_prefect(
            host="127.0.0.1",
            port=processes.free_port(),
            prefect_home=Path(os.environ["PREFECT_HOME"]),
            log_path=root / "prefect.log",
        )
    return server, t["seconds"]


def import_seconds(module: str, repeat: int = 1) -> float:
    """Seconds to import `module` in a fresh interpreter of this environment (the median of `repeat` tries)."""
    import subprocess
    import sys

    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    times = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return median(times)


def prefect_settings(**updates: Any):
    """`prefect.settings.temporary_settings` by setting name (Prefect freezes its settings at import, so changing
    os.environ afterwards is not enough), e.g. `prefect_settings(PREFECT_API_URL=url)`."""
    import prefect.settings as ps

    return ps.temporary_settings(updates={getattr(ps, key): value for key, value in updates.items()})
