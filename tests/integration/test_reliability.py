"""Issue 8, "What Flywheel survives": each fault is injected for real (a process killed, a server stopped, a request
forged or replayed) on a real `flywheel up` stack, and the end state is asserted.

One stack for the module (free ports, private state dir, fake AWS credentials in its environment); one model is
trained once and re-registered as further versions (same run and artifacts) so every deployment is cheap. The
tests share the registry but read the versions they need from it (the champion, the versions they create), so each
can run alone (`-k`); the MLflow-killed-during-train case starts its own MLflow server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pandas as pd
import pytest
from stacks import Receiver, copy_version, ledger_rows, prefect_api, run_cli, stack_fixtures, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

MODEL = "flights-reliability-it"
INTRUDER = "someone-elses-model"
BIN = Path(sys.executable).parent
FAKE_AWS_KEY_ID = "AKIAFAKE" + uuid.uuid4().hex[:12].upper()
FAKE_AWS_SECRET = "fake-secret-" + uuid.uuid4().hex
WEBHOOK = "/webhooks/mlflow"


# --------------------------------------------------------------------------------------------------- helpers
def _wait(what: str, check, timeout: float = 180.0, interval: float = 0.5):
    return wait_for(what, check, timeout, interval)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


def served_version(url: str) -> str | None:
    return httpx.get(url + "/version", timeout=5).json()["model_version"]


def flow_runs(urls, flow_name: str, since: dt.datetime | None = None) -> list[dict]:
    runs = prefect_api(urls, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": [flow_name]}}, "limit": 200})
    return [r for r in runs if since is None or _parse(r["created"]) >= since]


def events(urls, names: list[str], since: dt.datetime) -> list[dict]:
    body = {"filter": {"occurred": {"since": _iso(since), "until": _iso(_now() + dt.timedelta(minutes=5))},
                       "event": {"name": names}}, "limit": 50}  # fmt: skip
    return prefect_api(urls, "POST", "/events/filter", json=body)["events"]


def terminal(run: dict) -> bool:
    return run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def wait_deploys_done(urls, since: dt.datetime, versions: list[str], timeout: float = 180) -> list[dict]:
    """The deploy-model runs of `versions` created since `since`, once there is one for each and all have ended
    (only those: a run of an earlier test's move can be created late by Prefect's automation)."""

    def done():
        runs = [r for r in flow_runs(urls, "deploy-model", since) if r["parameters"].get("name") == MODEL
                and str(r["parameters"].get("version")) in versions]  # fmt: skip
        at_least = len(versions)
        return runs if len(runs) >= at_least and all(terminal(r) for r in runs) else None

    return _wait("the deploy-model runs to finish", done, timeout=timeout, interval=1.0)


def kill_group(mp) -> None:
    """SIGKILL a child's whole process group (what an OOM killer or `kill -9` does), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(mp.proc.pid, signal.SIGKILL)
    mp.proc.wait(30)


@contextlib.contextmanager
def supervised(st):
    """`Stack.supervise` in a background thread, as `flywheel up` runs it; stopped (and re-armed) on exit."""
    st._stopping.clear()
    thread = threading.Thread(target=st.supervise, kwargs={"interval": 1.0}, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        st._stopping.set()
        thread.join(180)
        st._stopping.clear()


def mlflow_body(name: str, version: str, alias: str | None = "champion", entity: str = "model_version_alias",
                action: str = "created") -> bytes:  # fmt: skip
    """A delivery serialised exactly as MLflow does (json.dumps, default separators)."""
    data = {"name": name, "version": version, **({"alias": alias} if alias else {})}
    return json.dumps({"entity": entity, "action": action, "timestamp": _iso(_now()), "data": data}).encode()


def signed(body: bytes, secret: str, delivery_id: str | None = None, ts: int | None = None) -> dict:
    from flywheel.bridge.signing import sign

    delivery_id = delivery_id or str(uuid.uuid4())
    ts_s = str(int(time.time()) if ts is None else ts)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts_s,
            "X-MLflow-Signature": sign(secret, delivery_id, ts_s, body)}  # fmt: skip


# --------------------------------------------------------------------------------------------------- fixtures
# One stack (fake AWS credentials in its environment: no credential may leak anywhere); `trained` is the first
# version, trained once by `flywheel train` on two weeks of flights, champion, deployed through the webhook.
stack, client, trained = stack_fixtures(
    MODEL, "reliability", FLYWHEEL_DEPLOY_WATCH_SECONDS="2", AWS_ACCESS_KEY_ID=FAKE_AWS_KEY_ID,
    AWS_SECRET_ACCESS_KEY=FAKE_AWS_SECRET,
)  # fmt: skip


def champion_of(client) -> str:
    return client.get_model_version_by_alias(MODEL, "champion").version


def deploy(client, urls, version: str, timeout: float = 180) -> None:
    client.set_registered_model_alias(MODEL, "champion", version)
    _wait(f"v{version} to serve", lambda: served_version(urls["model_url"]) == version, timeout=timeout)


def admin_headers(st) -> dict:
    return {"Authorization": "Bearer " + (st.root / "admin_token").read_text().strip()}


def server_state(st, urls) -> dict:
    return httpx.get(urls["model_url"] + "/admin/state", headers=admin_headers(st), timeout=10).json()


# --------------------------------------------------------------------------------------------------- case 9
def test_webhook_receiver_refuses_forgeries_and_emits_nothing(stack, trained):
    st, urls, _ = stack
    since = _now() - dt.timedelta(seconds=2)
    secret = (st.root / "webhook_secret").read_text().strip()
    hook = urls["bridge_url"] + WEBHOOK
    # Forgeries of a delivery the bridge would emit (a version the registry has, an alias nothing deploys), so
    # one that got through would reach Prefect: the registry's 422 for an unknown version cannot hide it.
    body = mlflow_body(MODEL, trained.version, alias="forged")
    good = signed(body, secret)
    other = signed(mlflow_body(MODEL, "42"), secret, good["X-MLflow-Delivery-Id"], int(good["X-MLflow-Timestamp"]))
    forged = {
        "unsigned": {"Content-Type": "application/json"},
        "wrong secret": signed(body, "not-the-secret"),
        "signature of another body": {**good, "X-MLflow-Signature": other["X-MLflow-Signature"]},
        "stale timestamp": signed(body, secret, ts=int(time.time()) - 3600),
        "future timestamp": signed(body, secret, ts=int(time.time()) + 3600),
    }  # fmt: skip
    for case, headers in forged.items():
        resp = httpx.post(hook, content=body, headers=headers, timeout=10)
        assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.text)
        assert resp.json()["status"] == "error", case
    # The sentinel: a genuine delivery sent after the forgeries reaches Prefect; a forged one would have been first.
    # (a version the registry has: the bridge refuses, 422, a delivery naming one it has not)
    sentinel_body = mlflow_body(MODEL, trained.version, alias=None, entity="model_version", action="created")
    sentinel = signed(sentinel_body, secret)
    resp = httpx.post(hook, content=sentinel_body, headers=sentinel, timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "emitted", resp.text
    _wait("the genuine delivery's event", lambda: [
        e for e in events(urls, ["mlflow.model_version.created"], since)
        if e.get("payload", {}).get("delivery_id") == sentinel["X-MLflow-Delivery-Id"]])  # fmt: skip
    emitted = [e for e in events(urls, ["mlflow.model_version_alias.created"], since)
               if e.get("payload", {}).get("alias") == "forged"]  # fmt: skip
    assert emitted == [], f"a forged delivery reached Prefect: {emitted}"
    assert not [r for r in flow_runs(urls, "deploy-model", since) if r["parameters"].get("alias") == "forged"]
    # Secrets at rest: owner-only.
    for name in ("webhook_secret", "admin_token", "mlflow_webhook_encryption.key"):
        mode = (st.root / name).stat().st_mode & 0o777
        assert mode == 0o600, f"{name} has mode {oct(mode)}"


# --------------------------------------------------------------------------------------------------- case 10
def test_real_model_server_guards_admin_scoring_and_body_size(stack, client, trained, tmp_path):
    from flywheel.stack import processes

    st, urls, env = stack
    url = urls["model_url"]
    champion = champion_of(client)
    for method, path in (("GET", "/admin/state"), ("POST", "/admin/load"), ("POST", "/admin/swap"),
                         ("POST", "/admin/rollback"), ("POST", "/admin/smoke")):  # fmt: skip
        assert httpx.request(method, url + path, timeout=10).status_code == 401, path
        wrong = httpx.request(method, url + path, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert wrong.status_code == 403 and wrong.json()["error_code"] == "PERMISSION_DENIED", path
    big = b'{"dataframe_records": [' + b'{"hour": 5},' * 1_000_000 + b'{"hour": 5}]}'  # ~12 MB > 10 MB default
    resp = httpx.post(url + "/invocations", content=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == 413 and resp.json()["error_code"] == "REQUEST_TOO_LARGE"
    assert served_version(url) == champion

    # A server process started with FLYWHEEL_SERVING_TOKEN wants a bearer token for scoring.
    port = processes.free_port()
    cmd = [sys.executable, "-m", "flywheel.serving", "--model", MODEL, "--port", str(port),
           "--tracking-uri", urls["mlflow_url"], "--initial-alias", "champion"]  # fmt: skip
    token = uuid.uuid4().hex
    mp = processes.spawn("scoring-token-server", cmd, url=f"http://127.0.0.1:{port}", log_path=tmp_path / "ms.log",
                         health_path="/health",
                         env={**env, "FLYWHEEL_SERVING_TOKEN": token, "FLYWHEEL_STATE_DIR": str(tmp_path)})  # fmt: skip
    try:
        processes.wait_healthy(mp, timeout=120)
        _wait(f"the token server to load v{champion}", lambda: served_version(mp.url) == champion, timeout=120)
        local = client.download_artifacts(trained.run_id, "reference/holdout_sample.parquet", str(tmp_path))
        sample = pd.read_parquet(local).drop(columns=["late"]).head(2)
        payload = {"dataframe_split": json.loads(sample.to_json(orient="split", index=False))}
        assert httpx.post(mp.url + "/invocations", json=payload, timeout=30).status_code == 401
        bad = httpx.post(mp.url + "/invocations", json=payload, headers={"Authorization": "Bearer x"}, timeout=30)
        assert bad.status_code == 401
        ok = httpx.post(mp.url + "/invocations", json=payload, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert token not in mp.log_path.read_text(errors="replace")
    finally:
        mp.stop()


# --------------------------------------------------------------------------------------------------- case 12
def test_model_loading_only_from_the_configured_registry(stack, client, trained):
    st, urls, env = stack
    url, headers = urls["model_url"], admin_headers(st)
    before = server_state(st, urls)
    v_other = copy_version(client, trained)  # a real version of MODEL, so "load v<n>" would succeed if honoured
    for body in ({"uri": "runs:/" + trained.run_id + "/model"}, {"uri": "file:///tmp/model"},
                 {"version": "file:///tmp/model"}, {"version": "runs:/" + trained.run_id + "/model"},
                 {"alias": "../champion"}, {"name": INTRUDER, "version": v_other},
                 {"version": v_other, "model_uri": "models:/" + INTRUDER + "/1"}):  # fmt: skip
        resp = httpx.post(url + "/admin/load", json=body, headers=headers, timeout=60)
        assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
    after = server_state(st, urls)
    assert after["counters"]["loads"] == before["counters"]["loads"], "something was loaded"
    assert (after["standby"] or {}).get("version") == (before["standby"] or {}).get("version")
    assert after["active"]["version"] == before["active"]["version"]

    # An alias move of another model in the same registry must not deploy anything to this model's server.
    since = _now()
    intruder_v = copy_version(client, trained, name=INTRUDER)
    while int(intruder_v) < int(v_other):  # make the intruder's version number one MODEL also has (but not serving)
        intruder_v = copy_version(client, trained, name=INTRUDER)
    client.set_registered_model_alias(INTRUDER, "champion", intruder_v)
    # And an event for a version the registry does not have.
    from flywheel.bridge.emit import prefect_emit
    from flywheel.core.events import alias_event_resource

    with _prefect_env(urls):
        prefect_emit(event="mlflow.model_version_alias.created", resource=alias_event_resource(MODEL, "champion"),
                     payload={"name": MODEL, "alias": "champion", "version": "987"})  # fmt: skip

    def settled():
        runs = flow_runs(urls, "deploy-model", since)
        moves = {(r["parameters"].get("name"), str(r["parameters"].get("version"))) for r in runs}
        return runs if {(INTRUDER, intruder_v), (MODEL, "987")} <= moves and all(terminal(r) for r in runs) else None

    runs = _wait("deploy-model runs for the intruder and the missing version", settled, timeout=180, interval=1.0)
    by_name = {(r["parameters"].get("name"), str(r["parameters"].get("version"))): r for r in runs}
    # The alias never pointed at 987: the run ends at once as superseded (or fails resolving it), loading nothing.
    assert by_name[(MODEL, "987")]["state_name"] in ("Superseded", "Failed"), by_name[(MODEL, "987")]["state_name"]
    end = server_state(st, urls)
    serving = before["active"]["version"]
    assert end["active"]["version"] == serving, f"another model's alias move changed what serves: {end['active']}"
    assert end["counters"]["loads"] == before["counters"]["loads"], "another model's alias move loaded a version"
    assert served_version(url) == serving
    assert "deploy_outcome" not in client.get_model_version(INTRUDER, intruder_v).tags


@contextlib.contextmanager
def _prefect_env(urls):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: urls["prefect_api_url"]}):
        yield


# --------------------------------------------------------------------------------------------------- case 6
def test_two_alias_moves_within_a_second_end_on_the_last_and_never_overlap(stack, client, trained):
    _, urls, _ = stack
    va, vb = copy_version(client, trained), copy_version(client, trained)
    since = _now()
    client.set_registered_model_alias(MODEL, "champion", va)
    client.set_registered_model_alias(MODEL, "champion", vb)
    _wait(f"v{vb} to serve", lambda: served_version(urls["model_url"]) == vb)
    runs = wait_deploys_done(urls, since, [va, vb])
    assert served_version(urls["model_url"]) == vb
    assert client.get_model_version_by_alias(MODEL, "champion").version == vb
    # Both moves reached Prefect (one event, one deploy-model run each).
    versions = sorted(str(r["parameters"]["version"]) for r in runs)
    assert versions == sorted([va, vb]), versions
    # vA never served; vB is in the ledger exactly once as serving. (The run for vA's event deploys vB, the alias'
    # target by then; deploy-model writes no ledger row for a superseded move.)
    assert client.get_model_version(MODEL, va).tags.get("deploy_outcome") != "serving"
    rows = [r for r in ledger_rows(urls, MODEL) if _parse(r["started_at"]) >= since.replace(microsecond=0)]
    assert [(r["version"], r["outcome"]) for r in rows] == [(vb, "serving")], rows
    # Deployments of one model/alias never overlap: the lock-protected parts (resolve-version → end) are disjoint.
    spans = critical_sections(urls, runs)
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"deploy-model runs overlapped: {spans}"


def critical_sections(urls, runs: list[dict]) -> list[tuple[dt.datetime, dt.datetime]]:
    ids = [r["id"] for r in runs]
    tasks = prefect_api(
        urls,
        "POST",
        "/task_runs/filter",
        json={"flow_runs": {"id": {"any_": ids}}, "task_runs": {"name": {"like_": "resolve-version"}}},
    )
    first: dict[str, dt.datetime] = {}
    for t in tasks:
        start = _parse(t["start_time"])
        if start and (t["flow_run_id"] not in first or start < first[t["flow_run_id"]]):
            first[t["flow_run_id"]] = start
    ends = {r["id"]: _parse(prefect_api(urls, "GET", f"/flow_runs/{r['id']}")["end_time"]) for r in runs}
    return [(first[i], ends[i]) for i in ids if i in first]


# --------------------------------------------------------------------------------------------------- case 8
def test_replayed_webhook_and_reconciler_together_deploy_once(stack, client, trained):
    st, urls, env = stack
    vc = copy_version(client, trained)
    secret = (st.root / "webhook_secret").read_text().strip()
    since = _now()
    client.set_registered_model_alias(MODEL, "champion", vc)  # MLflow's own webhook fires too
    body = mlflow_body(MODEL, vc)
    headers = signed(body, secret)
    answers: list[dict] = []

    def deliver():
        answers.append(httpx.post(urls["bridge_url"] + WEBHOOK, content=body, headers=headers, timeout=30).json())

    reconciler = threading.Thread(target=run_cli, args=([str(BIN / "prefect"), "deployment", "run",
                                                        "reconcile/every-minute", "--watch"], env))  # fmt: skip
    senders = [threading.Thread(target=deliver) for _ in range(2)]
    reconciler.start()
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)
    deliver()  # and once more, afterwards: the exact same signed request
    reconciler.join(300)
    statuses = sorted(a["status"] for a in answers)
    assert statuses.count("emitted") == 1 and set(statuses) <= {"emitted", "duplicate", "in_progress"}, answers
    _wait(f"v{vc} to serve", lambda: served_version(urls["model_url"]) == vc)
    # The sentinel: every champion move event that reached Prefect (MLflow's, the replayed delivery's and the
    # reconciler's own, if it sent one: its run has finished) has become a deploy-model run, and all have finished.
    runs = _wait("a finished deploy-model run for every alias event", lambda: every_alias_event_ran(urls, since))
    rows = [r for r in ledger_rows(urls, MODEL) if r["version"] == vc]
    assert [(r["version"], r["outcome"]) for r in rows] == [(vc, "serving")], rows
    deploy_artifacts = prefect_api(urls, "POST", "/artifacts/filter",
                           json={"artifacts": {"key": {"any_": [f"deploy-{MODEL}"]}}, "limit": 200})  # fmt: skip
    fresh = [a for a in deploy_artifacts if _parse(a["created"]) >= since]
    assert len(fresh) == 1, f"{len(fresh)} deployments reached serving for one move ({len(runs)} runs)"


def every_alias_event_ran(urls, since: dt.datetime) -> list[dict] | None:
    moves = [e for e in events(urls, ["mlflow.model_version_alias.created"], since)
             if e.get("payload", {}).get("name") == MODEL and e["payload"].get("alias") == "champion"]  # fmt: skip
    runs = [r for r in flow_runs(urls, "deploy-model", since) if r["parameters"].get("name") == MODEL]
    return runs if moves and len(runs) >= len(moves) and all(terminal(r) for r in runs) else None


# --------------------------------------------------------------------------------------------------- case 3
def test_killed_model_server_is_restarted_on_the_current_champion(stack, client, trained):
    st, urls, _ = stack
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    if champion == trained.version:  # the server must restart on a champion that did not exist when it started
        champion = copy_version(client, trained)
        deploy(client, urls, champion)
    assert served_version(urls["model_url"]) == champion
    old = st.children["model-server"]
    with supervised(st):
        kill_group(old)
        with pytest.raises(httpx.HTTPError):
            httpx.get(urls["model_url"] + "/ping", timeout=2)
        _wait("the supervisor to restart the model server", lambda: st.children["model-server"].pid != old.pid)
        _wait("the restarted server to serve the champion", lambda: served_version(urls["model_url"]) == champion)
    assert st.children["model-server"].alive()
    assert json.loads(st.stack_file.read_text())["pids"]["model-server"] == st.children["model-server"].pid


# --------------------------------------------------------------------------------------------------- case 2
def test_deployments_process_killed_mid_deploy_then_reconciler_finishes_it(stack, client, trained):
    st, urls, env = stack
    before = served_version(urls["model_url"])
    vd = copy_version(client, trained)
    since = _now()
    client.set_registered_model_alias(MODEL, "champion", vd)

    def running():
        runs = [r for r in flow_runs(urls, "deploy-model", since) if str(r["parameters"].get("version")) == vd]
        return runs[0] if runs and runs[0]["state_type"] == "RUNNING" else None

    zombie = _wait(f"deploy-model for v{vd} to be running", running, interval=0.2)
    old = st.children["deployments"]
    with supervised(st):
        kill_group(old)
        # The sentinel: the supervisor restarts the deployments process after the kill; serving has not changed.
        _wait("the supervisor to restart the deployments process", lambda: st.children["deployments"].pid != old.pid,
              timeout=240)  # fmt: skip
        assert served_version(urls["model_url"]) == before, "serving changed although the deployment was killed"
        # No person: the scheduled reconciler (run here instead of waiting for its interval) notices the gap.
        deadline = time.monotonic() + 240
        while served_version(urls["model_url"]) != vd and time.monotonic() < deadline:
            run_cli([str(BIN / "prefect"), "deployment", "run", "reconcile/every-minute", "--watch"], env)
            with contextlib.suppress(AssertionError):
                _wait(f"v{vd} to serve", lambda: served_version(urls["model_url"]) == vd, timeout=60)
    zombie_now = prefect_api(urls, "GET", f"/flow_runs/{zombie['id']}")
    assert served_version(urls["model_url"]) == vd, (
        f"serving never reached the champion v{vd}; the killed run is {zombie_now['state_type']}"
    )
    # The ledger is written after the post-switch watch.
    outcome = _wait(f"v{vd}'s ledger entry", lambda: client.get_model_version(MODEL, vd).tags.get("deploy_outcome"))
    assert outcome == "serving"
    assert prefect_api(urls, "GET", f"/flow_runs/{zombie['id']}")["state_type"] != "RUNNING"  # the zombie was marked


# --------------------------------------------------------------------------------------------------- case 9
def test_secret_rotation_keeps_webhooks_flowing(stack, client, trained):
    from flywheel.bridge.secrets import rotate_secret
    from flywheel.core.files import write_private

    st, urls, _ = stack
    old = (st.root / "webhook_secret").read_text().strip()
    new = rotate_secret(st.root, client, urls["bridge_url"] + WEBHOOK)
    assert new != old and (st.root / "webhook_secret").read_text().strip() == new
    assert (st.root / "webhook_secret").stat().st_mode & 0o777 == 0o600
    assert (st.root / "webhook_secret.previous").stat().st_mode & 0o777 == 0o600
    # The bridge takes the new secret at once, and the old one during the grace period (in-flight MLflow retries).
    for secret in (new, old):
        body = mlflow_body(MODEL, "1", alias=None, entity="model_version", action="created")
        resp = httpx.post(urls["bridge_url"] + WEBHOOK, content=body, headers=signed(body, secret), timeout=30)
        assert resp.status_code == 200 and resp.json()["status"] == "emitted", resp.text
    guessed = httpx.post(urls["bridge_url"] + WEBHOOK, content=body, headers=signed(body, "guess"), timeout=30)
    assert guessed.status_code == 401
    # MLflow signs with the new secret: a real alias move right after the rotation still deploys, by its webhook.
    mlflow_signs_with_the_new_secret(client, trained)
    # End the grace period first: a delivery MLflow signed with the old secret is refused now, so the move below
    # deploys by its webhook only if MLflow's webhook holds the new secret.
    write_private(st.root / "webhook_secret.previous", json.dumps({"secret": old, "expires_at": time.time() - 1}))
    gone = httpx.post(urls["bridge_url"] + WEBHOOK, content=body, headers=signed(body, old), timeout=30)
    assert gone.status_code == 401, "the old secret is still accepted after its grace period"
    ve = copy_version(client, trained)
    deploy(client, urls, ve)
    tags = _wait(f"v{ve}'s ledger tags", lambda: client.get_model_version(MODEL, ve).tags.get("deploy_outcome") and
                 client.get_model_version(MODEL, ve).tags)  # fmt: skip
    assert tags["deploy_outcome"] == "serving" and tags["deploy_trigger"] == "event", (
        f"v{ve} was not deployed by its webhook after the rotation: {tags}"
    )
    bridge_log = (st.root / "logs" / "bridge.log").read_text(errors="replace")
    assert new not in bridge_log and old not in bridge_log


def mlflow_signs_with_the_new_secret(client, trained) -> None:
    """The sentinel for MLflow's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL, per event type): a probe webhook created
    after the rotation receives an alias move, so the list MLflow sends alias moves with was read after the rotation
    and holds the bridge's new secret. The probe moves an alias of another model; the probe webhook is deleted."""
    with Receiver() as probe:
        hook = client.create_webhook(name=f"probe-{uuid.uuid4().hex[:6]}", url=probe.url, secret="probe",
                                     events=["model_version_alias.created"], status="ACTIVE")  # fmt: skip
        try:
            version = copy_version(client, trained, name=INTRUDER)

            def delivered():
                client.set_registered_model_alias(INTRUDER, "probe", version)
                return [m for m in probe.got if (m["json"] or {}).get("data", {}).get("name") == INTRUDER]

            _wait("MLflow's webhook list to hold a webhook created after the rotation", delivered, interval=1.0)
        finally:
            client.delete_webhook(hook.webhook_id)


# --------------------------------------------------------------------------------------------------- case 7
def test_drift_while_a_retraining_runs_schedules_no_second_one(stack, client, trained, tmp_path):
    _, urls, env = stack
    champion = client.get_model_version_by_alias(MODEL, "champion")
    ref = pd.read_parquet(client.download_artifacts(champion.run_id, "reference/train_sample.parquet", str(tmp_path)))
    drifted = ref.head(2000).copy()
    for col in ("hour", "distance", "temp", "dewp", "humid", "wind_speed", "precip", "pressure", "visib"):
        drifted[col] = drifted[col] * 3 + 1000
    for col in ("carrier", "origin", "dest"):
        drifted[col] = "ZZ"
    current = tmp_path / "drifted.parquet"
    drifted.to_parquet(current, index=False)

    # A retraining in flight: train/cron with a deliberately slow candidate, cancelled at the end.
    slow = [{"name": "slow-forest", "estimator": "random_forest", "params": {"n_estimators": 20000}}]
    dep = prefect_api(urls, "GET", "/deployments/name/train/cron")
    params = {"start": "2013-01-01", "end": "2013-01-15", "model_name": MODEL, "candidates": slow}
    run = prefect_api(urls, "POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": params})

    def state_of(run_id: str) -> str:
        return prefect_api(urls, "GET", f"/flow_runs/{run_id}")["state_type"]

    try:
        _wait("the slow retraining to run", lambda: state_of(run["id"]) == "RUNNING", timeout=180)
        since = _now()
        run_cli([str(BIN / "prefect"), "deployment", "run", "check-drift/cron", "-p", f"model_name={MODEL}",
                 "-p", f"current_uri={current}", "--watch"], env, timeout=400)  # fmt: skip
        assert state_of(run["id"]) == "RUNNING"
        verdict = json.loads(client.get_registered_model(MODEL).tags["last_drift_json"])
        assert verdict["dataset_drift"] is True and verdict["retrain"] is False, verdict
        assert any("in flight" in r for r in verdict["reasons"]), verdict["reasons"]
        # The sentinel: the verdict's own event, which check-drift emits after any retraining event it sent.
        _wait("the drift verdict's event", lambda: [e for e in events(urls, ["flywheel.drift.checked"], since)
                                                    if e.get("payload", {}).get("model_name") == MODEL])  # fmt: skip
        assert events(urls, ["flywheel.drift.detected"], since) == []
        assert [r for r in flow_runs(urls, "train", since) if r["id"] != run["id"]] == []
    finally:
        prefect_api(
            urls, "POST", f"/flow_runs/{run['id']}/set_state", json={"state": {"type": "CANCELLING"}, "force": True}
        )
        _wait(
            "the slow retraining to be cancelled",
            lambda: state_of(run["id"]) in ("CANCELLED", "CRASHED", "FAILED"),
            timeout=120,
        )


# --------------------------------------------------------------------------------------------------- case 1
SMALL_SPEC = """
name: cancer
source: {source}
target: malignant
task: binary
positive_class: 1
numeric: [{numeric}]
"""


def test_mlflow_killed_between_register_and_alias(stack, tmp_path, monkeypatch):
    """Own MLflow server (the session's is shared); the train flow runs in this process against the stack's Prefect,
    and the MLflow server is SIGKILLed right after the version is created."""
    import mlflow
    from mlflow import MlflowClient
    from prefect.events.worker import EventsWorker
    from sklearn.datasets import load_breast_cancer

    from flywheel.core.settings import get_settings
    from flywheel.flows.train import train
    from flywheel.stack import processes
    from flywheel.tasks import registry

    _, urls, _ = stack
    frame = load_breast_cancer(as_frame=True).frame.rename(columns=lambda c: c.replace(" ", "_"))
    frame["malignant"] = 1 - frame.pop("target")
    data_path = tmp_path / "cancer.csv"
    frame.to_csv(data_path, index=False)
    spec = tmp_path / "cancer.yaml"
    features = ", ".join(c for c in frame.columns if c != "malignant")
    spec.write_text(SMALL_SPEC.format(source=data_path, numeric=features))

    root = tmp_path / "mlflow"
    port = processes.free_port()
    server_kwargs = dict(
        host="127.0.0.1", port=port, backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifacts_destination=str(root / "artifacts"), log_path=root / "mlflow.log",
        env=processes.mlflow_server_env(root, processes.load_or_create_fernet_key(root)), timeout=180,
    )  # fmt: skip
    servers = [processes.start_mlflow(**server_kwargs)]
    uri = servers[0].url
    name = f"cancer-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FLYWHEEL_EXPERIMENT_NAME", "reliability")
    get_settings.cache_clear()
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    real_register = registry.register_version
    killed = []

    def register_then_kill(*args, **kwargs):
        version = real_register(*args, **kwargs)
        if not killed:
            kill_group(servers[0])
            killed.append(version.version)
        return version

    monkeypatch.setattr(registry, "register_version", register_then_kill)
    try:
        EventsWorker.drain_all(timeout=15, at_exit=False)
        with _prefect_env(urls):
            t0 = time.monotonic()
            state = train(spec_path=str(spec), model_name=name, return_state=True)
            failed_after = time.monotonic() - t0
            assert killed == ["1"]
            assert state.is_failed(), state
            message = f"{state.message} {state.result(raise_on_failure=False)!r}"
            print(f"failed run: {message[:500]}")
            assert "close-run" in message or "onnection" in message, message

            servers.append(processes.start_mlflow(**server_kwargs))  # same port, same backend
            c = MlflowClient(tracking_uri=uri, registry_uri=uri)
            versions = c.search_model_versions(f"name = '{name}'")
            assert [v.version for v in versions] == ["1"]
            tags = c.get_model_version(name, "1").tags
            lineage = (
                registry.TAG_DATA_HASH,
                registry.TAG_PARAMS_HASH,
                registry.TAG_CODE_VERSION,
                registry.TAG_FLOW_RUN,
            )
            for key in lineage:
                assert tags.get(key), f"v1 lacks its lineage tag {key}"
            assert c.get_registered_model(name).aliases == {}, "half-set alias"

            monkeypatch.setattr(registry, "register_version", real_register)
            again = train(spec_path=str(spec), model_name=name, return_state=True)
            assert again.is_completed(), again
            result = again.result()
            assert [v.version for v in c.search_model_versions(f"name = '{name}'")] == ["1"], "registered twice"
            aliases = c.get_registered_model(name).aliases
            assert aliases.get("champion") == "1" and aliases.get("challenger") == "1", (
                f"the re-run did not finish the interrupted promotion: {result['status']}, aliases {aliases}"
            )
            assert c.get_model_version(name, "1").tags.get(registry.TAG_GATE_PASSED) == "true"
        EventsWorker.drain_all(timeout=15, at_exit=False)
        print(f"MLflow killed after register: flow failed after {failed_after:.0f}s")
    finally:
        mlflow.set_tracking_uri(previous_uri)
        get_settings.cache_clear()
        for server in servers:
            server.stop()


# --------------------------------------------------------------------------------------------------- case 11
def test_no_credentials_leak_anywhere(stack, client, trained):
    st, urls, _ = stack
    secrets_ = {
        "AWS access key id": FAKE_AWS_KEY_ID,
        "AWS secret key": FAKE_AWS_SECRET,
        "admin token": (st.root / "admin_token").read_text().strip(),
        "webhook secret": (st.root / "webhook_secret").read_text().strip(),
    }
    prev = st.root / "webhook_secret.previous"
    if prev.exists():
        secrets_["previous webhook secret"] = json.loads(prev.read_text())["secret"]
    # A train, deployments and a drift check have run by now (earlier tests); every place a person can read:
    places: dict[str, str] = {}
    for path in (st.root / "logs").rglob("*"):
        if path.is_file():
            places[f"log {path.name}"] = path.read_text(errors="replace")
    places["prefect artifacts"] = json.dumps(prefect_api(urls, "POST", "/artifacts/filter", json={"limit": 200}))
    places["prefect logs"] = json.dumps(prefect_api(urls, "POST", "/logs/filter", json={"limit": 200}))
    places["prefect flow runs"] = json.dumps(prefect_api(urls, "POST", "/flow_runs/filter", json={"limit": 200}))
    places["ledger"] = json.dumps(ledger_rows(urls, MODEL))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=500)
    places["mlflow runs"] = json.dumps([{"params": r.data.params, "tags": r.data.tags} for r in runs])
    models = client.search_registered_models()
    places["mlflow models"] = json.dumps([{"tags": m.tags, "description": m.description} for m in models])
    versions = [v for m in models for v in client.search_model_versions(f"name = '{m.name}'")]
    places["mlflow versions"] = json.dumps([{"tags": v.tags, "description": v.description} for v in versions])
    assert len(runs) >= 2 and any(r.data.tags.get("flywheel.kind") == "drift" for r in runs), "nothing to scan"
    leaks = [
        f"{what} in {where}" for where, text in places.items() for what, value in secrets_.items() if value in text
    ]
    assert leaks == []
