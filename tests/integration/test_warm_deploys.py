"""Issue 20: alias moves deploy through the warm executor of the deployments process (deployments/executor.py).

One real `flywheel up` stack. Five champion moves about 2 s apart: each version serves, in the order it was set,
each deploy-model run is a real flow run of `deploy-model/on-alias` that completes, and the ledger records each.
Then the reconciler's cheap check (the alias watch) deploys a move whose webhook never came, with no `reconcile`
flow run, and `reconcile/every-minute` still runs by hand.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from stacks import copy_version, ledger_rows, prefect_api, run_cli, stack_fixtures, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

MODEL = "flights-warm-it"
BIN = Path(sys.executable).parent
MOVES = 5


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


def flow_runs(urls, flow_name: str, since: dt.datetime) -> list[dict]:
    runs = prefect_api(urls, "POST", "/flow_runs/filter", json={"flows": {"name": {"any_": [flow_name]}}, "limit": 200})
    return [r for r in runs if _parse(r["created"]) >= since]


def served_version(urls) -> str | None:
    return httpx.get(urls["model_url"] + "/version", timeout=5).json()["model_version"]


class ServedLog:
    """Polls the production server's /version in a thread and keeps the sequence of versions it answered with."""

    def __init__(self, url: str) -> None:
        self.url, self.seen = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                try:
                    v = str(http.get(self.url + "/version").json()["model_version"])
                except (httpx.HTTPError, ValueError, KeyError):
                    v = None
                if v and (not self.seen or self.seen[-1] != v):
                    self.seen.append(v)
                time.sleep(0.05)

    def __enter__(self) -> ServedLog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


# `trained`: v1, trained once by `flywheel train` on two weeks of flights, champion, deployed.
stack, client, trained = stack_fixtures(
    MODEL, "warm", FLYWHEEL_DEPLOY_WATCH_SECONDS="1", FLYWHEEL_RECONCILE_SECONDS="5"
)


def test_five_moves_two_seconds_apart_each_serve_in_order_and_are_in_the_ledger(stack, client, trained):
    _, urls, _ = stack
    versions = [copy_version(client, trained) for _ in range(MOVES)]
    since = _now()
    with ServedLog(urls["model_url"]) as log:
        for v in versions:
            client.set_registered_model_alias(MODEL, "champion", v)
            wait_for(f"v{v} to serve", lambda v=v: served_version(urls) == v, timeout=120, interval=0.05)
            time.sleep(2)  # the next move comes ~2 s after this one serves
    # Every move served, in the order it was set (nothing older came back in between).
    assert [v for v in log.seen if v in versions] == versions, log.seen

    def finished():
        runs = [r for r in flow_runs(urls, "deploy-model", since) if r["parameters"].get("name") == MODEL]
        done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        return runs if len(runs) >= MOVES and len(done) == len(runs) else None

    runs = wait_for("the deploy-model runs to finish", finished, timeout=180, interval=1.0)
    # Each move is a real flow run of the deployment, started by the alias event, and it completed.
    assert sorted(str(r["parameters"]["version"]) for r in runs) == sorted(versions)
    assert {r["state_type"] for r in runs} == {"COMPLETED"}, [(r["name"], r["state_type"]) for r in runs]
    dep = prefect_api(urls, "GET", "/deployments/name/deploy-model/on-alias")
    assert {r["deployment_id"] for r in runs} == {dep["id"]}

    # The ledger records each move, in order.
    def recorded():
        rows = [r for r in ledger_rows(urls, MODEL) if r["version"] in versions]
        return rows if len(rows) >= MOVES else None

    rows = wait_for("the ledger rows", recorded)
    assert [r["version"] for r in sorted(rows, key=lambda r: r["started_at"])] == versions, rows
    assert all(r["outcome"] in ("serving", "superseded") for r in rows), rows


def test_reconciler_check_deploys_a_missed_move_without_a_reconcile_run(stack, client, trained):
    st, urls, env = stack
    since = _now()
    st.children.pop("bridge").stop()  # no webhook reaches Prefect any more
    v = copy_version(client, trained)
    client.set_registered_model_alias(MODEL, "champion", v)
    wait_for(f"v{v} to serve through the alias watch", lambda: served_version(urls) == v, timeout=120)
    runs = [r for r in flow_runs(urls, "deploy-model", since) if str(r["parameters"].get("version")) == v]
    assert runs, "no deploy-model run for the missed move"
    # The periodic check ran without recording a flow run of `reconcile` (5 s interval here).
    assert flow_runs(urls, "reconcile", since) == []
    # A person can still start it by hand; it finds nothing to do.
    run_cli([str(BIN / "prefect"), "deployment", "run", "reconcile/every-minute", "--watch"], env)
    assert [r["state_type"] for r in flow_runs(urls, "reconcile", since)] == ["COMPLETED"]
