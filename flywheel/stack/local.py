"""The embedded default: state in one directory, servers started for the user when none is configured."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flywheel.core.settings import Settings
from flywheel.stack import processes

STACK_FILE = "stack.json"


def state_dir(settings: Settings) -> Path:
    path = settings.state_path
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    path = settings.state_path / STACK_FILE
    if not path.exists():
        return None
    try:
        stack = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
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
