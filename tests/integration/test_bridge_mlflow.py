"""The bridge against a real `mlflow server`: real registrations, real signed webhook deliveries.

1. bridge on uvicorn in a thread with a recording emitter: `ensure_webhook` is idempotent, an alias set in
   MLflow arrives signed and becomes one `mlflow.model_version_alias.created` event; a rotated secret keeps working.
2. the bridge's own CLI as a subprocess with the default emitter against a real Prefect server: the event is
   stored by Prefect.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from stacks import stop_process

from flywheel.bridge.app import create_bridge_app
from flywheel.bridge.secrets import load_or_create_secret, rotate_secret
from flywheel.bridge.webhooks import EVENTS, WEBHOOK_PATH, all_webhooks, ensure_webhook

pytestmark = pytest.mark.integration

DELIVERY_TIMEOUT = 20.0  # MLflow delivers in well under a second; its webhook-list cache adds a few seconds


class Recorder:
    def __init__(self):
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, **kwargs):
        with self._lock:
            self.calls.append(kwargs)

    def wait_for(self, event: str, timeout: float = DELIVERY_TIMEOUT, **payload) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for call in self.calls:
                    if call["event"] == event and all(call["payload"].get(k) == v for k, v in payload.items()):
                        return call
            time.sleep(0.1)
        raise AssertionError(f"no {event} {payload} within {timeout}s; got {[c['event'] for c in self.calls]}")


class ThreadedBridge:
    """The bridge app on a real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app, port: int):
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="bridge", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the bridge did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _webhook_cache_ttl() -> float:
    from flywheel.stack import processes

    return float(processes.mlflow_server_env(Path("."), None).get("MLFLOW_WEBHOOK_CACHE_TTL", 60))


def _first_heard_version(name: str, emit: Recorder) -> str:
    """Register versions of `name` until the bridge hears one's creation (MLflow's webhook cache is fresh)."""
    deadline = time.monotonic() + 4 * _webhook_cache_ttl() + 30
    while time.monotonic() < deadline:
        version = _register_version(name)
        try:
            emit.wait_for("mlflow.model_version.created", timeout=_webhook_cache_ttl() + 1, name=name, version=version)
            return version
        except AssertionError:
            continue
    raise AssertionError(f"the bridge heard no version creation of {name}")


def _first_heard_alias(client, name: str, version: str, emit: Recorder) -> dict:
    """Set the champion alias until the bridge hears the move; the first delivery the bridge got."""
    deadline = time.monotonic() + 4 * _webhook_cache_ttl() + 30
    while time.monotonic() < deadline:
        client.set_registered_model_alias(name, "champion", version)
        try:
            return emit.wait_for("mlflow.model_version_alias.created", timeout=_webhook_cache_ttl() + 1, name=name,
                                 alias="champion")  # fmt: skip
        except AssertionError:
            continue
    raise AssertionError(f"the bridge heard no alias move of {name}")


def _register_version(name: str) -> str:
    """A tiny scikit-learn model logged and registered as a new version of `name`."""
    import mlflow
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.arange(40, dtype=float).reshape(20, 2)
    y = (x[:, 0] > 20).astype(int)
    mlflow.set_experiment(f"bridge-{name}")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            LogisticRegression().fit(x, y),
            name="model",
            serialization_format="cloudpickle",
            pip_requirements=["scikit-learn"],
            registered_model_name=name,
        )
    return str(info.registered_model_version)


@pytest.fixture
def webhook_cleanup(tracking):
    """Delete the webhooks a test registered on the shared MLflow server (so no other test's change is sent)."""
    from mlflow import MlflowClient

    names: list[str] = []
    yield names
    client = MlflowClient(tracking)
    for hook in all_webhooks(client):
        if hook.name in names:
            client.delete_webhook(hook.webhook_id)


def test_alias_set_in_mlflow_becomes_one_prefect_event(tracking, model_name, tmp_path, webhook_cleanup):
    from mlflow import MlflowClient

    from flywheel.stack import processes

    client = MlflowClient(tracking)
    state = tmp_path / "state"
    secret = load_or_create_secret(state)
    emit = Recorder()
    hook_name = f"flywheel-bridge-{uuid.uuid4().hex[:8]}"
    webhook_cleanup.append(hook_name)

    with ThreadedBridge(create_bridge_app(secret, state, emit=emit), processes.free_port()) as srv:
        url = srv.url + WEBHOOK_PATH
        first = ensure_webhook(client, url, secret, name=hook_name)
        second = ensure_webhook(client, url, secret, name=hook_name)
        mine = [h for h in all_webhooks(client) if h.name == hook_name]
        assert len(mine) == 1 and first.webhook_id == second.webhook_id == mine[0].webhook_id
        assert {str(e) for e in mine[0].events} == set(EVENTS)
        assert second.last_updated_timestamp == first.last_updated_timestamp, "an unchanged webhook is not updated"

        # The server may still hold its cached (empty) webhook lists (MLFLOW_WEBHOOK_CACHE_TTL, per event type):
        # the sentinel is the first version whose creation the bridge hears; the alias is set until it hears one.
        version = _first_heard_version(model_name, emit)
        call = _first_heard_alias(client, model_name, version, emit)

        assert call["resource"]["prefect.resource.id"] == f"mlflow.registered_model.{model_name}"
        assert call["resource"]["prefect.resource.name"] == model_name
        payload = call["payload"]
        assert payload["version"] == version
        assert str(uuid.UUID(payload["delivery_id"])) == payload["delivery_id"]  # MLflow's uuid4 delivery id
        assert payload["timestamp"]
        # Nothing else arrives for the same change: the sentinel is a later change's delivery.
        client.set_registered_model_alias(model_name, "sentinel", version)
        emit.wait_for("mlflow.model_version_alias.created", name=model_name, alias="sentinel")
        champion_moves = [c for c in emit.calls if c["event"] == "mlflow.model_version_alias.created"
                          and c["payload"].get("alias") == "champion"]  # fmt: skip
        assert [c["payload"]["delivery_id"] for c in champion_moves] == [payload["delivery_id"]]

        # Rotation: MLflow is updated, then the file; the running bridge accepts the new secret at once.
        new_secret = rotate_secret(state, client, url, name=hook_name)
        assert new_secret != secret and (state / "webhook_secret").read_text() == new_secret
        assert len([h for h in all_webhooks(client) if h.name == hook_name]) == 1
        # ensure_webhook with the new secret is a no-op (its fingerprint is already registered).
        again = ensure_webhook(client, url, new_secret, name=hook_name)
        assert again.webhook_id == first.webhook_id
        # Signed with the old secret while MLflow's cache still holds it, or the new one: the bridge takes both.
        client.delete_registered_model_alias(model_name, "champion")
        deleted = emit.wait_for("mlflow.model_version_alias.deleted", name=model_name, alias="champion")
        assert deleted["payload"]["delivery_id"] != payload["delivery_id"]


def _prefect_events(api_url: str, event_id: str) -> list[dict]:
    body = {"filter": {"id": {"id": [event_id]}}, "limit": 10}
    r = httpx.post(f"{api_url}/events/filter", json=body, timeout=10)
    r.raise_for_status()
    return r.json()["events"]


def test_bridge_cli_hands_event_to_real_prefect(tracking, prefect_server, model_name, tmp_path, webhook_cleanup):
    """`python -m flywheel.bridge` with the default emitter: MLflow → bridge → Prefect's event store."""
    from mlflow import MlflowClient

    from flywheel.stack import processes

    api_url = prefect_server.url + "/api"
    state = tmp_path / "state"
    port = processes.free_port()
    log_path = tmp_path / "bridge.log"
    env = {**os.environ, "PREFECT_API_URL": api_url, "FLYWHEEL_STATE_DIR": str(state)}
    env.pop("FLYWHEEL_WEBHOOK_SECRET", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.bridge", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the bridge did not become healthy"
            time.sleep(0.2)

        client = MlflowClient(tracking)
        secret = load_or_create_secret(state)  # created by the bridge process
        hook_name = f"flywheel-bridge-{uuid.uuid4().hex[:8]}"
        webhook_cleanup.append(hook_name)
        ensure_webhook(client, url + WEBHOOK_PATH, secret, name=hook_name)

        # The sentinel for MLflow's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL, per event type) instead of a sleep:
        # register versions until the bridge logs one's creation, then set the alias until it logs the move.
        def heard(event: str, tail: str) -> bool:
            until = time.monotonic() + _webhook_cache_ttl() + 1
            while time.monotonic() < until:
                if any(f"emitted {event} for {model_name} " in line and line.rstrip().endswith(tail)
                       for line in log_path.read_text().splitlines()):  # fmt: skip
                    return True
                time.sleep(0.2)
            return False

        deadline = time.monotonic() + 4 * _webhook_cache_ttl() + 30
        version = _register_version(model_name)
        while not heard("mlflow.model_version.created", f"version={version}"):
            assert time.monotonic() < deadline, f"the bridge heard no version creation of {model_name}"
            version = _register_version(model_name)
        client.set_registered_model_alias(model_name, "champion", version)
        while not heard("mlflow.model_version_alias.created", f"alias=champion version={version}"):
            assert time.monotonic() < deadline, f"the bridge heard no alias move of {model_name}"
            client.set_registered_model_alias(model_name, "champion", version)

        # The bridge answers MLflow only after Prefect took the event; find it in Prefect's store by its id.
        event_id = None
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while event_id is None and time.monotonic() < deadline:
            for line in log_path.read_text().splitlines():
                if "emitted mlflow.model_version_alias.created" in line and model_name in line:
                    delivery_id = line.split("delivery ")[1].split(":")[0]
                    event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"mlflow-webhook-delivery:{delivery_id}"))
            time.sleep(0.2)
        assert event_id, log_path.read_text()
        deadline = time.monotonic() + 20  # the event persister flushes every few seconds
        events = []
        while not events and time.monotonic() < deadline:
            events = _prefect_events(api_url, event_id)
            time.sleep(0.5)
        assert len(events) == 1, "the event was not stored by Prefect"
        stored = events[0]
        assert stored["event"] == "mlflow.model_version_alias.created"
        assert stored["resource"]["prefect.resource.id"] == f"mlflow.registered_model.{model_name}"
        assert stored["payload"]["name"] == model_name and stored["payload"]["alias"] == "champion"
        assert stored["payload"]["version"] == version
        log_text = log_path.read_text()
        assert secret not in log_text
    finally:
        stop_process(proc, 10)
