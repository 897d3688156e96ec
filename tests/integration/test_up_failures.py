"""Start-up failures of `flywheel up`: clear messages, nothing left running.

A port in use (`flywheel up` as a subprocess), a stale or live stack file (`Stack.check_can_start` in-process),
a server that crashes while the stack starts (in-process, the bridge replaced by a command that exits at once),
`flywheel status` with no stack, and SIGTERM to a running `flywheel up` and to one still starting. Every case
checks the message and that no process it started survives: the PIDs come from the stack file, from the test's
own process tree (psutil) and from a scan for command lines naming the test's private state dir or ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
PORT_VARS = ("MLFLOW", "PREFECT", "SERVING", "STAGING", "BRIDGE")


# ----------------------------------------------------------------------------------------------- helpers
def free_ports() -> dict[str, int]:
    """Five distinct free ports on 127.0.0.1, keyed like FLYWHEEL_<NAME>_PORT."""
    from flywheel.stack import processes

    ports: dict[str, int] = {}
    while len(ports) < len(PORT_VARS):
        port = processes.free_port()
        if port not in ports.values():
            ports[PORT_VARS[len(ports)]] = port
    return ports


def up_env(state: Path, ports: dict[str, int]) -> dict[str, str]:
    """The environment of a `flywheel` subprocess: private state dir and ports, no server of the session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):
        env.pop(key, None)  # `flywheel up` keeps PREFECT_HOME in its state dir when unset
    env["FLYWHEEL_STATE_DIR"] = str(state)
    env.update({f"FLYWHEEL_{name}_PORT": str(port) for name, port in ports.items()})
    return env


def make_settings(state: Path, ports: dict[str, int]):
    from flywheel.core.settings import Settings

    return Settings(
        state_dir=state,
        mlflow_port=ports["MLFLOW"],
        prefect_port=ports["PREFECT"],
        serving_port=ports["SERVING"],
        staging_port=ports["STAGING"],
        bridge_port=ports["BRIDGE"],
    )


def running(proc: psutil.Process) -> bool:
    """Still there (same process, not a recycled PID) and not merely a zombie waiting to be reaped."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pid_running(pid: int) -> bool:
    try:
        return running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def strays(state: Path, ports: dict[str, int]) -> list[psutil.Process]:
    """Processes (any parent) whose command line names this test's state dir or one of its ports."""
    marks = {str(p) for p in ports.values()}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        cmd = proc.info.get("cmdline") or []
        by_port = any(a == "--port" and b in marks for a, b in zip(cmd, cmd[1:], strict=False))
        if (by_port or any(str(state) in a for a in cmd)) and running(proc):
            found.append(proc)
    return found


def wait_gone(procs: list[psutil.Process], timeout: float = 20.0) -> list[psutil.Process]:
    """Those of `procs` still running after `timeout` (a stopped server's workers may take a moment to exit)."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = [p for p in left if running(p)]
    return left


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            out.append(str(p.pid))
    return "\n".join(out)


def kill_left(procs: list[psutil.Process]) -> None:
    """Clean-up after a failed assertion: only processes this test started, by PID (each leads its own group)."""
    for p in procs:
        if not running(p):
            continue
        try:
            if os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, signal.SIGKILL)
            else:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_up(state: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, Path, Path]:
    out, err = state.parent / f"{state.name}-up.out", state.parent / f"{state.name}-up.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([str(BIN / "flywheel"), "up"], env=up_env(state, ports), stdout=fo, stderr=fe)
    return proc, out, err


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------- 1. port in use
@pytest.mark.parametrize("taken", ["MLFLOW", "SERVING"])
def test_up_refuses_a_port_in_use_and_names_the_variable(tmp_path, taken):
    state, ports = tmp_path / "state", free_ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports[taken]))
        blocker.listen()
        started = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "flywheel"), "up"], env=up_env(state, ports), capture_output=True, text=True, timeout=60
        )
        elapsed = time.monotonic() - started
    try:
        assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert elapsed < 30, f"took {elapsed:.0f}s to refuse"
        err = " ".join(proc.stderr.split())  # Rich/typer may wrap long lines
        name = {"MLFLOW": "MLflow", "SERVING": "model server"}[taken]
        assert f"ports already in use: {name} port {ports[taken]}" in err, proc.stderr
        assert f"FLYWHEEL_{taken}_PORT" in err, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        # The check comes first: nothing was spawned, no stack file, no log of a started server.
        assert not (state / "stack.json").exists()
        assert not (state / "logs").exists() or not list((state / "logs").glob("*.log"))
        assert strays(state, ports) == [], describe(strays(state, ports))
    finally:
        kill_left(strays(state, ports))


def test_up_with_a_port_bound_but_not_listening_fails_cleanly(tmp_path):
    """A socket bound but not (yet) listening refuses connections, yet no server could bind the port: the up-front
    check tries to bind too, so `flywheel up` fails at once naming the port and its variable, starting nothing."""
    state, ports = tmp_path / "state", free_ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports["MLFLOW"]))
        proc = subprocess.run(
            [str(BIN / "flywheel"), "up"], env=up_env(state, ports), capture_output=True, text=True, timeout=180
        )
    try:
        assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        # A bound-but-not-listening port is caught by the pre-check too (it tries to bind, not only to connect).
        assert "ports already in use: MLflow port" in proc.stderr, proc.stderr[-3000:]
        assert str(ports["MLFLOW"]) in proc.stderr and "FLYWHEEL_MLFLOW_PORT" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not (state / "stack.json").exists()
        assert strays(state, ports) == [], describe(strays(state, ports))
    finally:
        kill_left(strays(state, ports))


# ----------------------------------------------------------------------------------------------- 2. stack file
def test_stale_stack_file_is_removed_and_the_start_proceeds(tmp_path):
    from flywheel.stack.supervisor import Stack

    state, ports = tmp_path / "state", free_ports()
    state.mkdir()
    pid = dead_pid()
    (state / "stack.json").write_text(
        json.dumps({"supervisor_pid": pid, "pids": {"mlflow": pid, "prefect": pid}, "mlflow_url": "http://x"})
    )
    Stack(make_settings(state, ports)).check_can_start()  # no error: its processes are gone
    assert not (state / "stack.json").exists()


def test_unreadable_stack_file_counts_as_stale(tmp_path):
    from flywheel.stack.supervisor import Stack

    state, ports = tmp_path / "state", free_ports()
    state.mkdir()
    (state / "stack.json").write_text("{not json")
    Stack(make_settings(state, ports)).check_can_start()
    assert not (state / "stack.json").exists()


def test_live_stack_file_refuses_a_second_stack(tmp_path):
    from flywheel.stack.processes import ServerStartError
    from flywheel.stack.supervisor import Stack

    state, ports = tmp_path / "state", free_ports()
    state.mkdir()
    me, gone = os.getpid(), dead_pid()
    content = json.dumps({"supervisor_pid": me, "pids": {"mlflow": me, "prefect": gone}})
    (state / "stack.json").write_text(content)
    with pytest.raises(ServerStartError) as info:
        Stack(make_settings(state, ports)).check_can_start()
    msg = str(info.value)
    assert "a Flywheel stack already runs from" in msg and str(state) in msg, msg
    assert f"'mlflow': {me}" in msg and "prefect" not in msg, msg  # names the live pid only
    assert f"kill {me}" in msg and "stop it first" in msg, msg
    assert (state / "stack.json").read_text() == content  # another stack's file is left alone


def test_up_with_a_live_stack_file_exits_without_starting_anything(tmp_path):
    """The same refusal through the CLI: exit 1, the message on stderr, nothing spawned."""
    state, ports = tmp_path / "state", free_ports()
    state.mkdir()
    me = os.getpid()
    (state / "stack.json").write_text(json.dumps({"supervisor_pid": me, "pids": {"mlflow": me}}))
    proc = subprocess.run(
        [str(BIN / "flywheel"), "up"], env=up_env(state, ports), capture_output=True, text=True, timeout=60
    )
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "a Flywheel stack already runs from" in err and f"kill {me}" in err, proc.stderr
    assert (state / "stack.json").exists()
    assert strays(state, ports) == [], describe(strays(state, ports))


# ----------------------------------------------------------------------------------------------- 3. a crash
def test_a_server_that_crashes_while_starting_stops_every_started_server(tmp_path, monkeypatch):
    """MLflow, Prefect and both model servers come up; the bridge exits at once → start() raises a clear
    error, every server it had started (and their workers) is stopped, no stack file is written."""
    from flywheel.stack import processes
    from flywheel.stack.processes import ServerStartError
    from flywheel.stack.supervisor import Stack

    state, ports = tmp_path / "state", free_ports()
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # e.g. the session's servers: not ours to judge
    spawned: list = []
    tree: list[psutil.Process] = []
    real_spawn = processes.spawn

    def spawn(name, cmd, **kwargs):
        if name == "bridge":
            # Everything the stack started so far, workers included, as it stands when the crash comes.
            tree.extend(p for p in me.children(recursive=True) if p.pid not in before)
            cmd = [sys.executable, "-c", "import sys; print('bridge: simulated start-up crash'); sys.exit(3)"]
        mp = real_spawn(name, cmd, **kwargs)
        spawned.append(mp)
        return mp

    monkeypatch.setattr(processes, "spawn", spawn)
    stack = Stack(make_settings(state, ports))
    try:
        with pytest.raises(ServerStartError) as info:
            stack.start()
        msg = str(info.value)
        assert "bridge exited with code 3 while starting" in msg, msg
        assert "bridge: simulated start-up crash" in msg, msg  # the log tail says why
        assert str(state / "logs" / "bridge.log") in msg, msg
        names = [mp.name for mp in spawned]
        assert names == ["mlflow", "prefect", "model-server", "staging-server", "bridge"], names
        assert all(mp.proc.returncode is not None for mp in spawned), [(m.name, m.proc.poll()) for m in spawned]
        assert {p.pid for p in tree} >= {mp.pid for mp in spawned[:4]}
        left = wait_gone(tree)
        assert left == [], "still running after a failed start:\n" + describe(left)
        assert stack.children == {}
        assert not (state / "stack.json").exists()
        assert strays(state, ports) == [], describe(strays(state, ports))
        for port in ports.values():  # every port is free again for the next try
            assert not processes.port_in_use("127.0.0.1", port), port
    finally:
        stack.stop()
        kill_left(tree + [psutil.Process(mp.pid) for mp in spawned if pid_running(mp.pid)])


# ----------------------------------------------------------------------------------------------- 4. status
@pytest.mark.parametrize("stale", [False, True], ids=["no-stack-file", "stale-stack-file"])
def test_status_without_a_running_stack(tmp_path, stale):
    state, ports = tmp_path / "state", free_ports()
    state.mkdir()
    if stale:  # a stack file left by a stack that is gone: its MLflow does not answer
        pid = dead_pid()
        (state / "stack.json").write_text(
            json.dumps({"mlflow_url": f"http://127.0.0.1:{ports['MLFLOW']}", "pids": {"mlflow": pid}})
        )
    proc = subprocess.run(
        [str(BIN / "flywheel"), "status"], env=up_env(state, ports), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    out = " ".join(proc.stdout.split())
    assert f"no Flywheel stack is running from {state}" in out, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------- 5. SIGTERM
def test_sigterm_stops_a_running_up_and_all_its_servers(tmp_path):
    state, ports = tmp_path / "state", free_ports()
    up, out, err = start_up(state, ports)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not (state / "stack.json").exists():
            assert up.poll() is None, f"`flywheel up` exited with {up.returncode}:\n{tail(out)}\n{tail(err)}"
            assert time.monotonic() < deadline, f"no stack file after 240s:\n{tail(out)}\n{tail(err)}"
            time.sleep(1)
        time.sleep(0.5)  # written in one call; let it land
        info = json.loads((state / "stack.json").read_text())
        assert info["supervisor_pid"] == up.pid
        pids = info["pids"]
        assert set(pids) == {"mlflow", "prefect", "model-server", "staging-server", "bridge", "deployments"}, pids
        tree = descendants(up.pid)
        assert {int(p) for p in pids.values()} <= {p.pid for p in tree}
        assert all(pid_running(int(p)) for p in pids.values())

        up.send_signal(signal.SIGTERM)
        code = up.wait(90)  # how long it takes is bench/'s business; here: it stops, cleanly, leaving nothing
        assert code == 0, f"exit {code}\n{tail(out)}\n{tail(err)}"
        left = wait_gone(tree)
        assert left == [], "still running after SIGTERM:\n" + describe(left)
        assert not any(pid_running(int(p)) for p in pids.values())
        assert not (state / "stack.json").exists()
        assert strays(state, ports) == [], describe(strays(state, ports))
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        kill_left(tree + strays(state, ports))


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGINT,
        signal.SIGTERM,
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_signal_while_up_is_still_starting_leaves_nothing_running(tmp_path, sig):
    """Ctrl-C, `docker stop` or systemd can stop `flywheel up` at any time, also during the minute it takes to start:
    once MLflow runs (Prefect starting), the signal must still stop every server and leave no stack file."""
    state, ports = tmp_path / "state", free_ports()
    up, out, err = start_up(state, ports)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not any("prefect" in cmdline(p) for p in descendants(up.pid)):
            assert up.poll() is None, f"`flywheel up` exited with {up.returncode}:\n{tail(out)}\n{tail(err)}"
            assert time.monotonic() < deadline, f"Prefect never started:\n{tail(out)}\n{tail(err)}"
            time.sleep(0.2)
        tree = descendants(up.pid)
        assert any("mlflow" in cmdline(p) for p in tree)
        up.send_signal(sig)
        code = up.wait(180)  # a bound for a hung stop, not a timing claim: start-up under load is slow
        assert code != 0, f"exit {code}: a stack that never started is no success\n{tail(out)}\n{tail(err)}"
        tree += [p for p in strays(state, ports) if p.pid not in {t.pid for t in tree}]
        left = wait_gone(tree, timeout=10)
        assert left == [], f"still running after {sig.name} during start-up:\n" + describe(left)
        assert not (state / "stack.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        kill_left(tree + strays(state, ports))
