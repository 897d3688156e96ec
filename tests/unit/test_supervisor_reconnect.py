"""The supervisor starts `serve` (the deployments process) again once the Prefect server it was connected to is
restarted, once, without counting it against its restart limit; the model servers are left alone. Fake children:
no process is started."""

from __future__ import annotations

from flywheel.core.settings import Settings
from flywheel.stack import processes
from flywheel.stack.supervisor import Stack


class FakeChild:
    def __init__(self, name: str, pid: int, alive: bool = True) -> None:
        self.name, self.pid, self.start_time, self._alive = name, pid, None, alive
        self.url, self.log_path = f"http://127.0.0.1/{name}", f"/logs/{name}.log"
        self.proc = self
        self.stopped = False

    def alive(self) -> bool:
        return self._alive

    def poll(self):
        return None if self._alive else -9

    def healthy(self, timeout: float = 2.0) -> bool:  # noqa: ARG002
        return self._alive

    def stop(self) -> None:
        self.stopped, self._alive = True, False

    kill = stop


def stack_with(tmp_path, monkeypatch) -> tuple[Stack, dict[str, list[FakeChild]]]:
    ports = {f"{p}_port": processes.free_port() for p in ("mlflow", "prefect", "serving", "staging", "bridge")}
    st = Stack(Settings(state_dir=tmp_path / "state", restart_backoff_max_seconds=0, **ports))
    st.root.mkdir(parents=True, exist_ok=True)
    started: dict[str, list[FakeChild]] = {}
    pids = iter(range(1000, 2000))

    def starter(name):
        def start():
            child = FakeChild(name, next(pids))
            started.setdefault(name, []).append(child)
            return child

        return start

    names = ("mlflow", "prefect", "model-server", "deployments")
    monkeypatch.setattr(Stack, "starters", lambda self: {n: starter(n) for n in names})
    for name in names:
        st.children[name] = FakeChild(name, next(pids))
    return st, started


def log(st: Stack) -> str:
    return (st.root / "logs" / "supervisor.log").read_text()


def test_a_restarted_prefect_gets_the_deployments_process_started_again_once(tmp_path, monkeypatch):
    st, started = stack_with(tmp_path, monkeypatch)
    old_deployments, old_server = st.children["deployments"], st.children["model-server"]
    st.children["prefect"]._alive = False
    st.check_once()  # prefect down: scheduled (no backoff here)
    st.check_once()  # restarted, then the deployments process
    assert [c.pid for c in started["prefect"]] == [st.children["prefect"].pid]
    assert old_deployments.stopped and [c.pid for c in started["deployments"]] == [st.children["deployments"].pid]
    assert st.children["model-server"] is old_server and not old_server.stopped
    text = log(st)
    # Stopped as soon as Prefect died (not once it was back, mid-run), started again once it is back.
    assert f"deployments (pid {old_deployments.pid}) was connected to the prefect that died: stopped" in text
    assert text.index("was connected to the prefect that died") < text.index("prefect restarted")
    assert "deployments restarted" in text.split("prefect restarted")[1]
    assert "exited with code" not in text.split("prefect restarted")[1]
    assert "deployments" not in st._policies  # not counted against its restart limit
    st.check_once()
    assert len(started["deployments"]) == 1


def test_a_restarted_mlflow_leaves_the_model_server_running(tmp_path, monkeypatch):
    st, started = stack_with(tmp_path, monkeypatch)
    old_server, old_deployments = st.children["model-server"], st.children["deployments"]
    st.children["mlflow"]._alive = False
    st.check_once()
    st.check_once()
    assert len(started["mlflow"]) == 1
    assert st.children["model-server"] is old_server and st.children["deployments"] is old_deployments
    assert "model-server" not in started and "deployments" not in started
