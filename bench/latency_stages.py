"""Where an alias move's time goes, read back from the records the parts keep themselves: the bridge's log, the
Prefect event and flow run (created, started, task runs), and the model server's slots (loaded, activated).

Every stage is seconds after the alias was set (wall clock; every process runs on this machine). A stage a
record does not show (e.g. no webhook on the reconciler path) is None.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

STAGES = (
    "webhook received",  # the bridge logged the delivery it handed to Prefect
    "event emitted",  # Prefect's server received the alias event
    "flow run created",
    "flow run started",
    "model loaded",  # the new version is loaded in the standby slot
    "smoke test done",
    "switched",  # the slot with the new version became active
    "served",  # the client saw the new version at /version
)
_BRIDGE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO .*delivery \S+: emitted \S+ for (\S+) "
                          r"alias=(\S+) version=(\S+)")  # fmt: skip


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def bridge_received(log_path: Path, name: str, alias: str, version: str, after: float) -> float | None:
    """When the bridge handed a delivery of this move to Prefect (its log is local time with ms)."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = _BRIDGE_LINE.match(line)
        if m and m.group(2) == name and m.group(3) == alias and m.group(4) == version:
            ts = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
            if ts >= after - 1:
                return ts
    return None


def _deploy_run(client, name: str, version: str, after: float, served: float):
    """The deploy-model run that made this move serve: of the runs for `name` created after `after` and started
    before it served, the last one asked for `version` (else the last one: a run for an earlier event deploys what
    the alias points at by then)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterExpectedStartTime
    from prefect.client.schemas.sorting import FlowRunSort

    since = datetime.fromtimestamp(after - 1).astimezone()
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=["deploy-model"])),
        flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=50,
    )
    mine = [r for r in runs if r.parameters.get("name") == name and r.start_time and r.start_time.timestamp() <= served]
    asked = [r for r in mine if str(r.parameters.get("version")) == str(version)]
    return (asked or mine or [None])[-1]


def _event_received(client, event_id: str | None) -> float | None:
    if not event_id:
        return None
    from prefect.events.filters import EventFilter, EventIDFilter

    try:
        events = client.read_events(filter=EventFilter(id=EventIDFilter(id=[event_id])), limit=1).events
    except Exception:  # noqa: BLE001 - a stage we cannot read is reported as missing
        return None
    return _epoch(events[0].received) if events else None


def _task_end(client, flow_run_id, task_name: str) -> float | None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=task_name)),
    )
    ends = [r.end_time for r in runs if r.end_time is not None]
    return max(ends).timestamp() if ends else None


def model_server_slot(url: str, token: str, version: str) -> dict:
    """The model server's record of the slot holding `version` (`/admin/state`)."""
    try:
        state = httpx.get(url + "/admin/state", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}
    for key in ("active", "standby"):
        slot = state.get(key) or {}
        if str(slot.get("version")) == str(version):
            return slot
    return {}


def move_stages(
    *,
    t0: float,
    served_after: float,
    name: str,
    alias: str,
    version: str,
    model_url: str,
    admin_token: str,
    bridge_log: Path | None,
    prefect_api_url: str,
) -> dict[str, float | None]:
    """Seconds after `t0` (the alias was set) at which each of STAGES happened for this move."""
    from prefect.client.orchestration import get_client

    at: dict[str, float | None] = dict.fromkeys(STAGES)
    at["served"] = t0 + served_after
    if bridge_log is not None:
        at["webhook received"] = bridge_received(bridge_log, name, alias, version, t0)
    slot = model_server_slot(model_url, admin_token, version)
    loaded = _epoch(slot.get("loaded_at"))
    at["model loaded"] = loaded if loaded is not None and loaded >= t0 else None  # earlier: the standby held it
    at["switched"] = _epoch(slot.get("activated_at"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # The benchmark process has no PREFECT_API_URL of its own (bench.common.setup_env): ask the stack's server.
    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as client:
        run = None
        for _ in range(20):  # the run's start is recorded a moment after it swapped, at worst
            run = _deploy_run(client, name, version, t0, t0 + served_after)
            if run is not None:
                break
            time.sleep(0.5)
        if run is not None:
            at["flow run created"] = _epoch(run.created)
            at["flow run started"] = _epoch(run.start_time)
            at["event emitted"] = _event_received(client, run.parameters.get("event_id"))
            at["smoke test done"] = _task_end(client, run.id, "smoke-test")
    return {k: (None if v is None else round(v - t0, 3)) for k, v in at.items()}


def stage_rows(moves: list[dict[str, float | None]]) -> list[tuple[str, float | None, str]]:
    """(stage, median seconds after the alias was set, the per-move figures) for a bench table."""
    from bench.common import percentile

    rows = []
    for stage in STAGES:
        seen = [m[stage] for m in moves if m.get(stage) is not None]
        note = ", ".join("—" if m.get(stage) is None else f"{m[stage]:.2f}" for m in moves)
        rows.append((stage, percentile(seen, 50) if seen else None, note))
    return rows


def _tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants (from /proc)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    wanted, frontier = set(pids), list(pids)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in wanted:
                wanted.add(pid)
                frontier.append(pid)
    return sum(stats[p][1] for p in wanted if p in stats)


def alias_check_cpu(model_name: str, server_pids: list[int], checks: int = 30) -> dict[str, float]:
    """CPU seconds one alias check costs (deployments/executor.py `AliasWatch.check_once`, aliases in sync): in the
    checking process, and in the servers it asks (MLflow, the model servers), measured over `checks` checks."""
    from flywheel.deployments.executor import AliasWatch

    watch = AliasWatch(model_name, interval=10, grace=0)
    watch.check_once()  # warm: clients built, connections open
    own0, servers0, t0 = time.process_time(), _tree_cpu_seconds(server_pids), time.perf_counter()
    for _ in range(checks):
        if watch.check_once():
            raise RuntimeError("the alias check acted while aliases and serving agreed")
    own, servers = time.process_time() - own0, _tree_cpu_seconds(server_pids) - servers0
    return {"own": own / checks, "servers": servers / checks, "wall": (time.perf_counter() - t0) / checks}
