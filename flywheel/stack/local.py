"""The embedded default: state in one directory, servers started for the user when none is configured."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flywheel.core.settings import Settings
from flywheel.stack import processes

STACK_FILE = "stack.json"


@dataclass(frozen=True)
class Service:
    """A long-running Flywheel process of `flywheel up`, started after the model servers as
    `python -m <module> <args(settings)>`, answering `health_path` at `url(settings)`; the supervisor health-checks
    it when `health_checked` and restarts it (with backoff and a limit) when it dies. Add one here to run it."""

    name: str
    module: str
    args: Callable[[Settings], list[str]]
    url: Callable[[Settings], str]
    health_path: str = "/health"
    health_checked: bool = True
    start_timeout: float = 60.0


SERVICES: tuple[Service, ...] = (
    Service(
        "bridge", "flywheel.bridge", lambda s: ["--host", s.host, "--port", str(s.bridge_port)],
        lambda s: f"http://{s.host}:{s.bridge_port}",
    ),
)  # fmt: skip


def state_dir(settings: Settings) -> Path:
    """The state dir, created owner-only (0700): it holds databases, logs, secrets and users' scored rows."""
    path = settings.state_path
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def tighten_modes(root: Path) -> int:
    """Files below `root` owner-only (0600, executables 0700) and folders 0700, where they are looser (a state dir
    of an older Flywheel); returns how many were changed."""
    changed = 0
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            try:
                mode = path.lstat().st_mode
            except OSError:
                continue
            if path.is_symlink() or not mode & 0o077:
                continue
            tight = 0o700 if path.is_dir() or mode & 0o100 else 0o600
            os.chmod(path, tight)
            changed += 1
    return changed


def read_stack_file(settings: Settings) -> dict | None:
    """What the stack file records (URLs, pids, the supervisor's pid), whether or not anything still runs."""
    try:
        return json.loads((settings.state_path / STACK_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def prepare_env(settings: Settings) -> None:
    """Process-wide defaults for the embedded default; the user's own variables always win."""
    processes.apply_quiet_env()
    if not os.environ.get("PREFECT_API_URL"):
        stack = running_stack(settings)
        if stack and stack.get("prefect_api_url"):
            os.environ["PREFECT_API_URL"] = stack["prefect_api_url"]
        else:
            # Prefect's ephemeral mode keeps its database under PREFECT_HOME: keep it in our state dir.
            os.environ.setdefault("PREFECT_HOME", str(state_dir(settings) / "prefect"))


def mlflow_backend(settings: Settings) -> tuple[str, str]:
    """The backend store and artifact destination: the configured ones (PostgreSQL, S3), else SQLite and a local
    artifact root in the state dir."""
    root = state_dir(settings)
    store = settings.mlflow_backend_store_uri.get_secret_value() if settings.mlflow_backend_store_uri else None
    return store or f"sqlite:///{root / 'mlflow.db'}", settings.mlflow_artifacts_destination or str(
        root / "mlartifacts"
    )


def running_stack(settings: Settings) -> dict | None:
    """The URLs of a `flywheel up` stack that is running now, if any (its servers answer)."""
    stack = read_stack_file(settings)
    if stack is None:
        return None
    import httpx

    try:
        ok = httpx.get(stack["mlflow_url"] + "/health", timeout=2).status_code == 200
    except (httpx.HTTPError, KeyError):
        ok = False
    return stack if ok else None


@contextmanager
def tracking_server(settings: Settings) -> Iterator[str]:
    """The MLflow tracking URI to use: the user's (`MLFLOW_TRACKING_URI`), a running `flywheel up` stack's, or a
    server started here for the duration of the block (SQLite + local artifacts in the state dir)."""
    if settings.external_tracking_uri:
        yield settings.external_tracking_uri
        return
    stack = running_stack(settings)
    if stack:
        os.environ["MLFLOW_TRACKING_URI"] = stack["mlflow_url"]
        yield stack["mlflow_url"]
        return
    backend, artifacts = mlflow_backend(settings)
    root = state_dir(settings)
    port = settings.mlflow_port
    if processes.port_in_use(settings.host, port):
        port = processes.free_port(settings.host)
    server = processes.start_mlflow(
        host=settings.host,
        port=port,
        backend_store_uri=backend,
        artifacts_destination=artifacts,
        log_path=root / "logs" / "mlflow.log",
        env=processes.mlflow_server_env(root, processes.load_or_create_fernet_key(root)),
    )
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    try:
        yield server.url
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        server.stop()
