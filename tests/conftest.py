"""Shared test harness: real servers started once per session on 127.0.0.1 and free ports.

Unit tests use none of them. Integration tests ask for the fixtures they need; each server starts on first
use and is stopped by its PID at the end of the session. Isolation between tests is by model/experiment names.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

# Before anything imports Prefect or MLflow: a private home, no telemetry, no stray ./mlflow.db.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="flywheel-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["FLYWHEEL_STATE_DIR"] = str(_SESSION_DIR / "state")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
for _var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
    os.environ.pop(_var, None)


def _refresh_prefect_settings() -> None:
    """Prefect reads its settings once, at import (collection imports it): make it see PREFECT_API_URL now."""
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def mlflow_server(session_dir):
    """A real `mlflow server` (SQLite backend, local artifacts, webhooks to loopback allowed)."""
    from flywheel.stack import processes

    server = processes.start_mlflow_in(session_dir / "mlflow")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_server(session_dir):
    """A real `prefect server start`; the session's Prefect client talks to it through PREFECT_API_URL."""
    from flywheel.stack import processes

    root = session_dir / "prefect-server"
    server = processes.start_prefect(
        host="127.0.0.1",
        port=processes.free_port(),
        prefect_home=Path(os.environ["PREFECT_HOME"]),
        log_path=root / "prefect.log",
    )
    os.environ["PREFECT_API_URL"] = server.url + "/api"
    _refresh_prefect_settings()
    yield server
    os.environ.pop("PREFECT_API_URL", None)
    _refresh_prefect_settings()
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, reached by boto3 through AWS_ENDPOINT_URL_S3."""
    from moto.server import ThreadedMotoServer

    from flywheel.stack import processes

    port = processes.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL_S3"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def tracking(mlflow_server, monkeypatch) -> str:
    """MLFLOW_TRACKING_URI pointed at the session's MLflow server for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.url)
    return mlflow_server.url


@pytest.fixture
def model_name() -> str:
    """A registered-model name no other test uses."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fresh_settings(monkeypatch):
    """Clear the cached settings before and after a test that changes FLYWHEEL_* variables."""
    from flywheel.core.settings import get_settings

    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()
