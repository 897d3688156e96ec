"""Issue 15, the supervisor's faults, injected for real on a real `flywheel up` stack (free ports, private state):

- kill -9 of the Prefect server and of the MLflow server: the model server answers every request throughout, the
  supervisor restarts the dead server (its leftover workers killed, the port freed);
- a `champion` move made while Prefect is down is deployed by the reconciler once Prefect is back;
- a frozen model server (SIGSTOP): health checks fail, it is killed and a new process answers /health;
- a child that keeps dying: restarted up to the limit, then the supervisor says it gave up and serving goes on;
- the state dir is 0700, databases, logs and the request log's Parquet 0600;
- `stop()`: every recorded pid and every process of their trees gone, every port free;
- kill -9 of `flywheel up` itself: the watchdog stops every child, `flywheel status` reports the dead supervisor;
  children of a dead supervisor whose watchdog died too are stopped by the next start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from stacks import PORTS, UNSET, Traffic, running_stack, served_version, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

MODEL = "flights-survival-it"
BIN = Path(sys.executable).parent
RECORDS = [{"a": float(i % 7), "b": float(i % 3) - 1.0} for i in range(20)]


# --------------------------------------------------------------------------------------------------- helpers
def supervisor_log(st) -> str:
    path = st.root / "logs" / "supervisor.log"
    return path.read_text() if path.exists() else ""


def trees(st) -> dict[int, int]:
    from flywheel.stack import reaper

    found: dict[int, int] = {}
    for mp in st.children.values():
        found.update(reaper.tree_of_group(mp.pid))
    return found


def gone(tree: dict[int, int]) -> bool:
    from flywheel.stack import reaper

    return not reaper.alive_in(tree)


class Supervised:
    """`Stack.supervise` in a thread, as `flywheel up` runs it (every second here)."""

    def __init__(self, st) -> None:
        self.st = st
        self.thread = threading.Thread(target=st.supervise, kwargs={"interval": 1.0}, daemon=True)

    def __enter__(self):
        self.st._stopping.clear()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.st._stopping.set()
        self.thread.join(300)
        self.st._stopping.clear()


def register_tiny_model(mlflow_url: str, seed: int = 0, champion: bool = True) -> None:
    """A two-feature logistic regression registered as the next version, made champion (the webhook deploys it)
    unless `champion` is False."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = pd.DataFrame({"a": rng.normal(size=400), "b": rng.normal(size=400)})
    y = (x["a"] + x["b"] > 0).astype(int)
    model = LogisticRegression().fit(x, y)
    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_experiment("survival-it")
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            model, name="model", registered_model_name=MODEL, signature=infer_signature(x, model.predict(x)),
            input_example=x.head(5), serialization_format="cloudpickle", pip_requirements=["scikit-learn"],
        )  # fmt: skip
    if champion:
        MlflowClient(mlflow_url, mlflow_url).set_registered_model_alias(MODEL, "champion", "1")


def champion_version(urls) -> str:
    from mlflow import MlflowClient

    return MlflowClient(urls["mlflow_url"], urls["mlflow_url"]).get_model_version_by_alias(MODEL, "champion").version


def score_ok(urls) -> bool:
    r = httpx.post(urls["model_url"] + "/invocations", json={"dataframe_records": RECORDS[:2]}, timeout=10)
    return r.status_code == 200


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Small limits so that the give-up case is reached in seconds; the default limit is 5 per 600 s.
    with running_stack(
        tmp_path_factory.mktemp("survival"), MODEL, FLYWHEEL_RESTART_LIMIT="2",
        FLYWHEEL_RESTART_BACKOFF_MAX_SECONDS="2", FLYWHEEL_HEALTH_TIMEOUT_SECONDS="1",
        FLYWHEEL_RECONCILE_SECONDS="5",  # the deployments process' alias check (no flow run unless behind)
    ) as st:  # fmt: skip
        yield st


@pytest.fixture(scope="module")
def serving(stack):
    st, urls, _ = stack
    register_tiny_model(urls["mlflow_url"])
    wait_for("v1 to serve", lambda: served_version(urls) == "1", timeout=300)
    from mlflow import MlflowClient

    client = MlflowClient(urls["mlflow_url"], urls["mlflow_url"])
    wait_for("v1's deployment to finish", lambda: client.get_model_version(MODEL, "1").tags.get("deploy_outcome"),
             timeout=300)  # fmt: skip
    assert score_ok(urls)
    return stack


# --------------------------------------------------------------------------------------------------- modes
def test_state_dir_databases_logs_and_request_log_are_owner_only(serving):
    st, urls, _ = serving
    with httpx.Client(timeout=10) as http:
        for record in RECORDS:
            assert http.post(urls["model_url"] + "/invocations", json={"dataframe_records": [record]}).is_success
    root = st.root
    parquet = wait_for(
        "the request log to write Parquet",
        lambda: sorted((root / "serving" / "production").rglob("*.parquet")),
        timeout=120,
    )
    assert root.stat().st_mode & 0o777 == 0o700
    files = [root / "mlflow.db", root / "stack.json", root / "admin_token", *parquet,
             *(root / "logs").glob("*.log"), *(root / "prefect").glob("*.db")]  # fmt: skip
    assert (root / "mlflow.db").exists() and any((root / "prefect").glob("*.db")) and parquet
    loose = {str(f.relative_to(root)): oct(f.stat().st_mode & 0o777) for f in files if f.stat().st_mode & 0o077}
    assert loose == {}, f"readable by others: {loose}"
    for folder in (root / "logs", root / "serving", root / "prefect"):
        assert folder.stat().st_mode & 0o077 == 0, folder


# --------------------------------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("victim", ["prefect", "mlflow"])
def test_kill_9_of_a_server_keeps_serving_and_the_server_is_restarted(serving, victim):
    from flywheel.stack import processes, reaper

    st, urls, _ = serving
    old = st.children[victim]
    old_tree = reaper.tree_of_group(old.pid)  # MLflow: the `mlflow server` process and its uvicorn worker
    with Supervised(st), Traffic(urls["model_url"], RECORDS, pause=0.05) as traffic:
        wait_for("traffic to flow", lambda: len(traffic.statuses) >= 5, timeout=60)
        os.kill(old.pid, signal.SIGKILL)  # the leader only, as `kill -9 <pid>` does
        wait_for(f"a new {victim} process", lambda: st.children[victim].pid != old.pid, timeout=240)
        new = st.children[victim]
        wait_for(f"the new {victim} to answer", new.healthy, timeout=60)
        wait_for(f"the supervisor to log the restart of {victim}",
                 lambda: f"{victim} restarted (pid {new.pid})" in supervisor_log(st), timeout=30)  # fmt: skip
        if victim == "prefect":  # what needs Prefect works again: the deployments answer
            wait_for("the deployments on the new Prefect server",
                     lambda: httpx.get(urls["prefect_api_url"] + "/deployments/name/reconcile/every-minute",
                                       timeout=5).status_code == 200, timeout=120)  # fmt: skip
        n = len(traffic.statuses)
        wait_for("more traffic after the restart", lambda: len(traffic.statuses) >= n + 5, timeout=60)
    assert traffic.statuses and set(traffic.statuses) == {200}, {s: traffic.statuses.count(s) for s in traffic.statuses}
    assert gone(old_tree), f"left of the killed {victim}: {reaper.alive_in(old_tree)}"
    assert st.children["model-server"].alive()
    assert json.loads(st.stack_file.read_text())["pids"][victim] == new.pid
    port = st.settings.prefect_port if victim == "prefect" else st.settings.mlflow_port
    assert processes.port_in_use(st.settings.host, port)  # held by the new server, which answers
    assert f"{victim} (pid {old.pid}) exited with code -9" in supervisor_log(st)


# --------------------------------------------------------------------------------------------------- Prefect down
def test_an_alias_move_made_while_prefect_is_down_is_deployed_once_prefect_is_back(serving):
    """kill -9 of Prefect, then `champion` moves to v2: the bridge cannot hand MLflow's delivery (nor any of its
    retries) to Prefect. Once the supervisor has restarted Prefect, the reconciler finds the alias ahead of what
    serves and deploys v2; serving answers every request throughout and the ledger records the deployment."""
    from mlflow import MlflowClient

    st, urls, _ = serving
    client = MlflowClient(urls["mlflow_url"], urls["mlflow_url"])
    register_tiny_model(urls["mlflow_url"], seed=1, champion=False)
    new = max(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version)).version
    wait_for(f"v{new} to be READY", lambda: client.get_model_version(MODEL, new).status == "READY", timeout=60)
    old_version = champion_version(urls)
    bridge_log = st.root / "logs" / "bridge.log"
    refused_before = bridge_log.read_text().count("not handed to Prefect")
    old, old_deployments = st.children["prefect"], st.children["deployments"]
    with Traffic(urls["model_url"], RECORDS, pause=0.05) as traffic:
        wait_for("traffic to flow", lambda: len(traffic.statuses) >= 5, timeout=60)
        os.kill(old.pid, signal.SIGKILL)  # nothing restarts it yet: the supervisor is not running
        wait_for("Prefect to be down", lambda: not old.healthy(timeout=2), timeout=60)
        client.set_registered_model_alias(MODEL, "champion", new)
        # MLflow's delivery and every one of its retries (MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES, 3) got a 503.
        wait_for("the bridge to fail the delivery and its 3 retries",
                 lambda: bridge_log.read_text().count("not handed to Prefect") >= refused_before + 4,
                 timeout=180)  # fmt: skip
        assert not old.healthy(timeout=2)
        with Supervised(st):
            wait_for("a new Prefect process", lambda: st.children["prefect"].pid != old.pid, timeout=240)
            wait_for("the supervisor to log the restart of prefect",
                     lambda: f"prefect restarted (pid {st.children['prefect'].pid})" in supervisor_log(st),
                     timeout=60)  # fmt: skip
            # `serve`'s Prefect loops gave up on the dead server: the deployments process is started again.
            wait_for("the deployments process started again on the new Prefect",
                     lambda: f"deployments restarted (pid {st.children['deployments'].pid}) on the new prefect"
                     in supervisor_log(st), timeout=240)  # fmt: skip
            wait_for(f"v{new} to serve after Prefect is back", lambda: served_version(urls) == new, timeout=420,
                     interval=1)  # fmt: skip
            n = len(traffic.statuses)
            wait_for("more traffic after the switch", lambda: len(traffic.statuses) >= n + 5, timeout=60)
        record = wait_for(f"the ledger to record v{new}'s deployment",
                          lambda: (t := client.get_model_version(MODEL, new).tags).get("deploy_outcome") and t,
                          timeout=120)  # fmt: skip
    assert traffic.statuses and set(traffic.statuses) == {200}, {s: traffic.statuses.count(s) for s in traffic.statuses}
    assert new in traffic.versions
    assert record["deploy_outcome"] == "serving", record
    assert record["deploy_previous_version"] == old_version, record
    # The deployments process' alias check started the run (it starts deploy-model itself), not a late webhook.
    assert f"alias=champion version={new}" not in bridge_log.read_text()
    deployments_log = (st.root / "logs" / "deployments.log").read_text()
    started = f"'champion' is v{new}, v{old_version} serves: started deploy-model run"
    assert started in deployments_log, deployments_log[-3000:]
    assert client.get_registered_model(MODEL).tags["last_deployment"].startswith(f"v{new} → champion"), record
    assert st.children["model-server"].alive()
    assert not old_deployments.alive() and st.children["deployments"].alive()
    assert f"deployments (pid {old_deployments.pid}) was connected to the prefect that died" in supervisor_log(st)


# --------------------------------------------------------------------------------------------------- SIGSTOP
def test_a_frozen_model_server_is_killed_and_started_again(serving):
    from flywheel.stack import reaper

    st, urls, _ = serving
    old = st.children["model-server"]
    old_tree = reaper.tree_of_group(old.pid)
    with Supervised(st):
        os.kill(old.pid, signal.SIGSTOP)
        new_pid = wait_for("a new model server", lambda: st.children["model-server"].pid != old.pid and
                           st.children["model-server"].pid, timeout=240)  # fmt: skip
        wait_for(
            "the new model server to answer /health",
            lambda: httpx.get(urls["model_url"] + "/health", timeout=3).status_code == 200,
            timeout=60,
        )
    log = supervisor_log(st)
    assert f"model-server (pid {old.pid}) failed 3 health checks in a row" in log, log[-3000:]
    assert f"model-server restarted (pid {new_pid})" in log
    assert gone(old_tree), reaper.alive_in(old_tree)
    champion = champion_version(urls)
    wait_for(f"the restarted server to serve v{champion}", lambda: served_version(urls) == champion, timeout=60)
    assert score_ok(urls)


# --------------------------------------------------------------------------------------------------- give up
def test_a_child_that_keeps_dying_is_given_up_and_serving_goes_on(serving):
    st, urls, env = serving
    with Supervised(st):
        for attempt in range(3):  # the limit is 2 restarts: the third death is the last
            victim = st.children["bridge"]
            wait_for("the bridge to answer", victim.healthy, timeout=60)
            os.kill(victim.pid, signal.SIGKILL)
            if attempt < 2:
                wait_for("the bridge restarted", lambda v=victim: st.children["bridge"].pid != v.pid, timeout=120)
        wait_for("the supervisor to give up on the bridge", lambda: "GAVE UP on bridge" in supervisor_log(st),
                 timeout=60)  # fmt: skip
    assert "restarted 2 times within 600s" in supervisor_log(st)
    assert json.loads(st.stack_file.read_text())["gave_up"].keys() == {"bridge"}
    assert score_ok(urls)
    status = subprocess.run([str(BIN / "flywheel"), "status"], env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    out = status.stdout
    assert status.returncode == 0, out + status.stderr
    assert "supervisor (flywheel up) pid" in out and ": running" in out
    assert "GAVE UP" in out and "bridge" in out
    assert urls["prefect_url"] in out and urls["model_url"] in out
    champion = "v" + champion_version(urls)
    assert any(line.split() == [MODEL, champion, "—", champion] for line in out.splitlines()), out
    deployment = next(line for line in out.splitlines() if "last deployment" in line)
    # The ledger's text or its JSON (older ledgers), either way one readable line naming the version and outcome.
    assert deployment.startswith(MODEL) and champion in deployment and "serving" in deployment, out
    assert "{" not in out, out


# --------------------------------------------------------------------------------------------------- stop
def test_stop_leaves_no_process_and_frees_every_port(serving):
    from flywheel.stack import processes

    st, urls, _ = serving
    old_watchdog = st._watchdog.proc
    with Supervised(st):  # a killed watchdog is started again (and told of every child)
        old_watchdog.kill()
        wait_for("a new watchdog", lambda: (w := st._watchdog) is not None and w.proc not in (None, old_watchdog)
                 and w.exited() is None, timeout=60)  # fmt: skip
    assert "the watchdog exited with code -9; starting it again" in supervisor_log(st)
    recorded = json.loads(st.stack_file.read_text())
    assert recorded["watchdog_pid"] == st._watchdog.pid
    tree = trees(st)
    watchdog = st._watchdog.proc
    assert watchdog.poll() is None
    pids = {int(p) for p in recorded["pids"].values()}
    assert pids <= set(tree) | {st.children["bridge"].pid}  # the given-up bridge is dead already
    st.stop()
    wait_for("every process of the stack to be gone", lambda: gone(tree), timeout=30)
    assert watchdog.poll() is not None
    s = st.settings
    for port in (s.mlflow_port, s.prefect_port, s.serving_port, s.staging_port, s.bridge_port):
        assert not processes.port_in_use(s.host, port), port
    assert not st.stack_file.exists()


# --------------------------------------------------------------------------------------------------- kill -9 up
def up_env(state: Path) -> dict[str, str]:
    from flywheel.stack import processes

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k not in UNSET}
    env.pop("PREFECT_HOME", None)
    env["FLYWHEEL_STATE_DIR"] = str(state)
    env.update({f"FLYWHEEL_{p}_PORT": str(processes.free_port()) for p in PORTS})
    return env


def test_kill_9_of_flywheel_up_stops_every_child_and_status_says_the_supervisor_is_dead(tmp_path):
    from flywheel.stack import processes, reaper

    state = tmp_path / "state"
    env = up_env(state)
    with open(tmp_path / "up.out", "wb") as out:
        up = subprocess.Popen([str(BIN / "flywheel"), "up"], env=env, stdout=out, stderr=subprocess.STDOUT)
    tree: dict[int, int] = {}
    try:
        wait_for("the stack file", lambda: (state / "stack.json").exists() or up.poll() is not None,
                 timeout=400, interval=1)  # fmt: skip
        assert up.poll() is None, (tmp_path / "up.out").read_text()[-3000:]
        info = json.loads((state / "stack.json").read_text())
        for pid in info["pids"].values():
            tree.update(reaper.tree_of_group(int(pid)))
        tree[info["watchdog_pid"]] = reaper.start_time(info["watchdog_pid"])
        assert len(info["pids"]) == 6 and all(reaper.running(int(p), None) for p in info["pids"].values())
        up.kill()  # kill -9 of the supervisor
        up.wait(10)
        wait_for("every child of the dead supervisor to be gone", lambda: gone(tree), timeout=60)
        for key in PORTS:
            assert not processes.port_in_use("127.0.0.1", int(env[f"FLYWHEEL_{key}_PORT"])), key
        status = subprocess.run([str(BIN / "flywheel"), "status"], env=env, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert status.returncode == 1, status.stdout + status.stderr
        assert f"supervisor (flywheel up) pid {up.pid}: DEAD" in status.stdout, status.stdout
        assert "running" not in status.stdout.split("\n", 1)[1], status.stdout  # no child claims to run
        watchdog_log = (state / "logs" / "watchdog.log").read_text()
        assert "supervisor gone; stopped process groups" in watchdog_log
    finally:
        if up.poll() is None:
            up.kill()
        reaper.signal_tree(reaper.alive_in(tree), signal.SIGKILL)


def test_next_start_stops_children_left_by_a_dead_supervisor_and_its_dead_watchdog(tmp_path):
    """The watchdog killed too: the children of the dead supervisor still run; the next start stops them."""
    from flywheel.core.settings import Settings
    from flywheel.stack import reaper
    from flywheel.stack.supervisor import Stack

    state = tmp_path / "state"
    state.mkdir()
    gone_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_pid.wait()
    orphans = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
               for _ in range(2)]  # fmt: skip
    try:
        (state / "stack.json").write_text(json.dumps({
            "supervisor_pid": gone_pid.pid, "mlflow_url": "http://127.0.0.1:9",
            "pids": {"mlflow": orphans[0].pid, "prefect": orphans[1].pid},
            "start_times": {"mlflow": reaper.start_time(orphans[0].pid), "prefect": reaper.start_time(orphans[1].pid)},
        }))  # fmt: skip
        from flywheel.stack import processes

        ports = {f"{p.lower()}_port": processes.free_port() for p in ("MLFLOW", "PREFECT", "SERVING", "STAGING",
                                                                       "BRIDGE")}  # fmt: skip
        st = Stack(Settings(state_dir=state, **ports))
        st.check_can_start()
        for proc in orphans:
            assert proc.wait(30) is not None
        assert not (state / "stack.json").exists()
        assert f"left running by a supervisor that died (pid {gone_pid.pid})" in supervisor_log(st)
    finally:
        for proc in orphans:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
