"""The MLflow-webhook → Prefect-event bridge, in process (starlette TestClient, a recording emitter)."""

from __future__ import annotations

import json
import stat
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from flywheel.bridge.app import create_bridge_app
from flywheel.bridge.deliveries import CLAIM_LEASE_SECONDS, DeliveryLog
from flywheel.bridge.emit import EmitError, prefect_emit
from flywheel.bridge.secrets import load_or_create_secret, rotate_secret
from flywheel.bridge.signing import sign
from flywheel.bridge.webhooks import WEBHOOK_PATH

SECRET = "s3cr3t-for-tests"
PATH = WEBHOOK_PATH


class Recorder:
    """Test double of the Prefect side: records what would have been emitted, or fails on demand."""

    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.calls: list[dict] = []
        self.fail = fail
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, **kwargs):
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise EmitError("Prefect unreachable (test)")
        with self._lock:
            self.calls.append(kwargs)


def mlflow_body(entity="model_version_alias", action="created", **data) -> bytes:
    """Exactly how MLflow serialises a delivery (json.dumps with default separators)."""
    data = data or {"name": "flights-delay", "alias": "champion", "version": "3"}
    return json.dumps(
        {"entity": entity, "action": action, "timestamp": "2026-11-02T10:00:00+00:00", "data": data}
    ).encode()


def signed_headers(body: bytes, secret: str = SECRET, delivery_id: str | None = None, ts: int | None = None) -> dict:
    """The headers MLflow's `_send_webhook_request` sends, signed with MLflow's own `_generate_hmac_signature`."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    delivery_id = delivery_id or str(uuid.uuid4())
    ts_s = str(int(time.time()) if ts is None else ts)
    try:
        signature = _generate_hmac_signature(secret, delivery_id, ts_s, body.decode())
    except UnicodeDecodeError:  # MLflow never sends such a body; sign the bytes the same way
        signature = sign(secret, delivery_id, ts_s, body)
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": ts_s,
        "X-MLflow-Signature": signature,
    }


@pytest.fixture
def state(tmp_path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def emit() -> Recorder:
    return Recorder()


@pytest.fixture
def client(state, emit):
    return TestClient(create_bridge_app(SECRET, state, emit=emit))


def test_sign_matches_mlflow_sender():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = mlflow_body()
    assert sign(SECRET, "d-1", "1700000000", body) == _generate_hmac_signature(
        SECRET, "d-1", "1700000000", body.decode()
    )


def test_valid_delivery_emits_one_event(client, emit):
    body = mlflow_body(name="flights-delay", alias="champion", version="3")
    headers = signed_headers(body)
    r = client.post(PATH, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "emitted"
    assert len(emit.calls) == 1
    call = emit.calls[0]
    assert call["event"] == "mlflow.model_version_alias.created"
    assert call["resource"]["prefect.resource.id"] == "mlflow.registered_model.flights-delay"
    assert call["resource"]["prefect.resource.name"] == "flights-delay"
    assert call["payload"] == {
        "name": "flights-delay",
        "alias": "champion",
        "version": "3",
        "delivery_id": headers["X-MLflow-Delivery-Id"],
        "timestamp": "2026-11-02T10:00:00+00:00",
    }
    assert str(call["id"]) == r.json()["event_id"]


def test_alias_deleted_and_version_created(client, emit):
    body = mlflow_body(action="deleted", name="m", alias="champion")
    assert client.post(PATH, content=body, headers=signed_headers(body)).status_code == 200
    body = mlflow_body(entity="model_version", name="m", version="7", source="models:/x", run_id="r", tags={})
    assert client.post(PATH, content=body, headers=signed_headers(body)).status_code == 200
    assert [c["event"] for c in emit.calls] == ["mlflow.model_version_alias.deleted", "mlflow.model_version.created"]
    assert emit.calls[0]["payload"]["version"] is None and emit.calls[0]["payload"]["alias"] == "champion"
    assert emit.calls[1]["payload"]["alias"] is None and emit.calls[1]["payload"]["version"] == "7"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.update({"X-MLflow-Signature": "v1,AAAA"}),
        lambda h: h.pop("X-MLflow-Signature"),
        lambda h: h.pop("X-MLflow-Delivery-Id"),
        lambda h: h.update({"X-MLflow-Delivery-Id": str(uuid.uuid4())}),  # signature no longer matches
        lambda h: h.update({"X-MLflow-Signature": h["X-MLflow-Signature"].replace("v1,", "v0,")}),
        lambda h: h.update({"X-MLflow-Signature": "v1,é".encode("latin-1")}),
    ],
)
def test_bad_signature_is_401_and_emits_nothing(client, emit, mutate):
    body = mlflow_body()
    headers = signed_headers(body)
    mutate(headers)
    r = client.post(PATH, content=body, headers=headers)
    assert r.status_code == 401
    assert emit.calls == []


def test_wrong_secret_and_tampered_body_are_401(client, emit):
    body = mlflow_body()
    assert client.post(PATH, content=body, headers=signed_headers(body, secret="other")).status_code == 401
    headers = signed_headers(body)
    tampered = body.replace(b'"3"', b'"4"')
    assert client.post(PATH, content=tampered, headers=headers).status_code == 401
    assert emit.calls == []


@pytest.mark.parametrize("offset", [-301, -3600, 301, 86400])
def test_stale_or_future_timestamp_is_rejected(client, emit, offset):
    body = mlflow_body()
    r = client.post(PATH, content=body, headers=signed_headers(body, ts=int(time.time()) + offset))
    assert r.status_code in (400, 401)
    assert emit.calls == []


def test_timestamp_within_tolerance_is_accepted(client, emit):
    body = mlflow_body()
    assert client.post(PATH, content=body, headers=signed_headers(body, ts=int(time.time()) - 250)).status_code == 200
    assert len(emit.calls) == 1


def test_replayed_delivery_is_duplicate_even_after_restart(state, emit):
    body = mlflow_body()
    headers = signed_headers(body)
    with TestClient(create_bridge_app(SECRET, state, emit=emit)) as c:
        assert c.post(PATH, content=body, headers=headers).json()["status"] == "emitted"
        r = c.post(PATH, content=body, headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "duplicate"
    assert len(emit.calls) == 1
    # A new app (a restarted bridge) on the same state dir remembers the delivery.
    with TestClient(create_bridge_app(SECRET, state, emit=emit)) as c:
        r = c.post(PATH, content=body, headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "duplicate"
    assert len(emit.calls) == 1


def test_concurrent_replays_emit_once(state):
    emit = Recorder(delay=0.2)
    app = create_bridge_app(SECRET, state, emit=emit)
    body = mlflow_body()
    headers = signed_headers(body)
    statuses: list[int] = []

    def post():
        with TestClient(app) as c:
            statuses.append(c.post(PATH, content=body, headers=headers).status_code)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(emit.calls) == 1
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 503}


def test_emit_failure_is_5xx_and_retry_succeeds(state):
    failing = Recorder(fail=True)
    body = mlflow_body()
    headers = signed_headers(body)
    r = TestClient(create_bridge_app(SECRET, state, emit=failing)).post(PATH, content=body, headers=headers)
    assert r.status_code == 503
    # MLflow retries the same delivery (same id, timestamp, signature): it must go through now.
    ok = Recorder()
    r = TestClient(create_bridge_app(SECRET, state, emit=ok)).post(PATH, content=body, headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "emitted"
    assert len(ok.calls) == 1


def test_prefect_emit_without_api_url_raises(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(EmitError, match="PREFECT_API_URL"):
            prefect_emit(event="x.y", resource={"prefect.resource.id": "a.b"}, payload={})


def test_unreachable_prefect_is_503_so_mlflow_retries(state):
    """The default emitter against a Prefect API nobody listens on: 503 (MLflow retries 5xx), nothing remembered."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_bridge_app(SECRET, state)  # emit=prefect_emit
    body = mlflow_body()
    headers = signed_headers(body)
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        started = time.monotonic()
        r = TestClient(app).post(PATH, content=body, headers=headers)
    assert r.status_code == 503
    assert time.monotonic() - started < 15
    assert app.state.deliveries.count() == 0


def test_async_emitter_is_awaited(state):
    calls = []

    async def emit(**kwargs):
        calls.append(kwargs["event"])

    body = mlflow_body()
    r = TestClient(create_bridge_app(SECRET, state, emit=emit)).post(PATH, content=body, headers=signed_headers(body))
    assert r.status_code == 200 and calls == ["mlflow.model_version_alias.created"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"{}", b'{"entity": "model_version_alias", "action": "created"}'],
)
def test_malformed_body_is_400(client, emit, body):
    r = client.post(PATH, content=body, headers=signed_headers(body))
    assert r.status_code == 400
    assert r.json()["status"] == "error"
    assert emit.calls == []


@pytest.mark.parametrize(
    "data",
    [{"alias": "champion", "version": "1"}, {"name": "m", "version": "1"}, {"name": "m", "alias": "champion"},
     {"name": ["m"], "alias": "champion", "version": "1"}],
)  # fmt: skip
def test_missing_fields_are_400(client, emit, data):
    body = mlflow_body(**data)
    r = client.post(PATH, content=body, headers=signed_headers(body))
    assert r.status_code == 400
    assert emit.calls == []


def test_unknown_event_is_acknowledged_and_ignored(client, emit):
    body = mlflow_body(entity="model_version_tag", action="set", name="m", version="1", key="k", value="v")
    r = client.post(PATH, content=body, headers=signed_headers(body))
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    assert emit.calls == []


def test_oversized_body_is_413(client, emit):
    body = mlflow_body(name="m", alias="champion", version="1", pad="x" * (70 * 1024))
    r = client.post(PATH, content=body, headers=signed_headers(body))
    assert r.status_code == 413
    assert emit.calls == []


def test_oversized_streamed_body_is_413(client, emit):
    body = mlflow_body(name="m", alias="champion", version="1", pad="x" * (70 * 1024))

    def chunks():
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    r = client.post(PATH, content=chunks(), headers=signed_headers(body))  # chunked: no Content-Length
    assert r.status_code == 413
    assert emit.calls == []


def test_health(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_secret_and_signature_never_logged(client, caplog):
    caplog.set_level("DEBUG")
    body = mlflow_body()
    headers = signed_headers(body)
    client.post(PATH, content=body, headers=headers)
    client.post(PATH, content=body, headers={**headers, "X-MLflow-Signature": "v1,Zm9vYmFy"})
    assert SECRET not in caplog.text
    assert headers["X-MLflow-Signature"].split(",", 1)[1] not in caplog.text
    assert "Zm9vYmFy" not in caplog.text


def test_secret_file_is_private_and_reused(tmp_path):
    state = tmp_path / "fresh" / "state"
    first = load_or_create_secret(state)
    path = state / "webhook_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 40
    assert load_or_create_secret(state) == first
    path.chmod(0o644)
    assert load_or_create_secret(state) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_secret_creation_is_race_free(tmp_path):
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_secret(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_app_accepts_state_dir_secret_and_follows_rotation(tmp_path, emit):
    """The bridge re-reads the state dir: after a rotation both secrets work for the grace period, then only the new."""
    state = tmp_path / "state"
    old = load_or_create_secret(state)
    client = TestClient(create_bridge_app(old, state, emit=emit))

    class FakeMlflow:  # only the webhook calls ensure_webhook makes
        def __init__(self):
            self.updated_secret = None

        def list_webhooks(self, max_results=None, page_token=None):
            return _Page([])

        def create_webhook(self, **kw):
            self.updated_secret = kw["secret"]
            return kw

    fake = FakeMlflow()
    new = rotate_secret(state, fake, "http://127.0.0.1:1/webhooks/mlflow", grace_seconds=600)
    assert new != old and fake.updated_secret == new
    assert (state / "webhook_secret").read_text() == new
    assert stat.S_IMODE((state / "webhook_secret.previous").stat().st_mode) == 0o600
    for secret in (old, new):
        body = mlflow_body()
        assert client.post(PATH, content=body, headers=signed_headers(body, secret=secret)).status_code == 200
    # Grace period over: the old secret is refused.
    record = json.loads((state / "webhook_secret.previous").read_text())
    record["expires_at"] = time.time() - 1
    (state / "webhook_secret.previous").write_text(json.dumps(record))
    body = mlflow_body()
    assert client.post(PATH, content=body, headers=signed_headers(body, secret=old)).status_code == 401
    assert client.post(PATH, content=body, headers=signed_headers(body, secret=new)).status_code == 200


def test_failed_rotation_changes_nothing(tmp_path):
    state = tmp_path / "state"
    old = load_or_create_secret(state)

    class Down:
        def list_webhooks(self, max_results=None, page_token=None):
            raise ConnectionError("MLflow down")

    with pytest.raises(ConnectionError):
        rotate_secret(state, Down(), "http://127.0.0.1:1/webhooks/mlflow")
    assert load_or_create_secret(state) == old
    assert not (state / "webhook_secret.next").exists()


def test_app_needs_a_secret(tmp_path):
    with pytest.raises(ValueError):
        create_bridge_app("", tmp_path / "empty")


def test_delivery_log_prunes_expired_rows(tmp_path):
    log = DeliveryLog(tmp_path / "d.sqlite3")
    now = time.time()
    assert log.claim("a", expires_at=now + 10, now=now) == "claimed"
    log.complete("a")
    assert log.claim("a", expires_at=now + 10, now=now + 1) == "duplicate"
    assert log.claim("b", expires_at=now + 1000, now=now + 20) == "claimed"  # prunes "a"
    assert log.count() == 1
    # An abandoned claim (crash mid-emit) can be taken over after the lease.
    assert log.claim("b", expires_at=now + 1000, now=now + 21) == "in_progress"
    assert log.claim("b", expires_at=now + 1000, now=now + 20 + CLAIM_LEASE_SECONDS + 1) == "claimed"


class _Page(list):
    token = None
