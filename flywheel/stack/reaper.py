"""Nothing outlives the stack: the process table (from /proc), killing whole process trees, and the watchdog.

The watchdog (`python -m flywheel.stack.reaper`) is started by the supervisor with a pipe on its stdin. The
supervisor writes `+ <pgid> <starttime>` for every child it starts and `- <pgid>` for every child it stopped itself.
When the pipe reaches end-of-file, the supervisor is gone, however it died (kill -9 included): the watchdog then
kills every process group it still knows, with every descendant of their members, and exits.

Why a pipe and not Linux's PR_SET_PDEATHSIG: the parent-death signal fires when the *thread* that forked the child
ends, not the process. The supervisor restarts children from whichever thread supervises (tests run `supervise` in a
thread that ends while the stack runs on), so such a child would be killed under a live supervisor. It also reaches
only the child itself: MLflow's uvicorn worker, a grandchild, would live on holding the port. A pipe's write end
closes only when the supervisor process is gone, and the watchdog kills the whole tree.

Only the standard library here: the watchdog starts in a few milliseconds and holds ~10 MB.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    starttime: int  # clock ticks after boot: with the pid, it names one process (pids are reused)


def proc_info(pid: int) -> ProcInfo | None:
    try:
        data = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    rest = data[data.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return ProcInfo(pid, int(rest[1]), int(rest[2]), rest[0], int(rest[19]))


def proc_table() -> dict[int, ProcInfo]:
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            info = proc_info(int(entry.name))
            if info is not None:
                table[info.pid] = info
    return table


def start_time(pid: int) -> int | None:
    info = proc_info(pid)
    return info.starttime if info else None


def running(pid: int, starttime: int | None) -> bool:
    """The same process (pid and start time) still exists and is not a zombie."""
    info = proc_info(pid)
    return info is not None and info.state != "Z" and (starttime is None or info.starttime == starttime)


def tree_of_group(pgid: int, table: dict[int, ProcInfo] | None = None) -> dict[int, int]:
    """Members of process group `pgid` and all their descendants (those that left the group by `setsid`
    included), as {pid: starttime}."""
    table = proc_table() if table is None else table
    found = {p.pid: p.starttime for p in table.values() if p.pgid == pgid}
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child].starttime
                todo.append(child)
    return found


def children_of(pid: int, table: dict[int, ProcInfo] | None = None) -> list[ProcInfo]:
    table = proc_table() if table is None else table
    return [p for p in table.values() if p.ppid == pid]


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when no member is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def signal_tree(tree: dict[int, int], sig: int) -> None:
    for pid, starttime in tree.items():
        if running(pid, starttime):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def alive_in(tree: dict[int, int]) -> dict[int, int]:
    return {pid: st for pid, st in tree.items() if running(pid, st)}


def kill_groups(groups: dict[int, int | None], grace: float = 10.0) -> dict[int, int]:
    """SIGTERM, then after `grace` seconds SIGKILL, to each group and every descendant of its members. A group
    whose leader pid now names another process (other start time) was reused: left alone. Returns what was left
    alive after SIGKILL (nothing, normally)."""
    table = proc_table()
    tree: dict[int, int] = {}
    ours = []
    for pgid, leader_start in groups.items():
        leader = table.get(pgid)
        if leader is not None and leader_start is not None and leader.starttime != leader_start:
            continue
        ours.append(pgid)
        tree.update(tree_of_group(pgid, table))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pgid in ours:
            signal_group(pgid, sig)
        signal_tree(tree, sig)
        deadline = time.monotonic() + wait
        while alive_in(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive_in(tree):
            break
    return alive_in(tree)


def watch(stream) -> dict[int, int | None]:
    """Read registrations until end-of-file; the groups still registered then."""
    groups: dict[int, int | None] = {}
    for line in stream:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "+":
            groups[int(parts[1])] = int(parts[2]) if len(parts) > 2 else None
        elif len(parts) == 2 and parts[0] == "-":
            groups.pop(int(parts[1]), None)
    return groups


class Watchdog:
    """The supervisor's side: starts the watchdog process with a pipe on its stdin and tells it of each child."""

    def __init__(self, log_path: Path, umask: int = 0o077) -> None:
        self.log_path, self.umask = log_path, umask
        self.proc: subprocess.Popen | None = None
        self._pipe = None

    def start(self) -> None:
        read_fd, write_fd = os.pipe()  # both ends close-on-exec: no other child holds the write end
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel.stack.reaper"], stdin=read_fd, stdout=log_fd,
                stderr=subprocess.STDOUT, start_new_session=True, umask=self.umask,
            )  # fmt: skip
        finally:
            os.close(read_fd)
            os.close(log_fd)
        self._pipe = os.fdopen(write_fd, "w", buffering=1)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        """Its exit code once it has exited (None while it runs or before it started)."""
        return self.proc.poll() if self.proc else None

    def track(self, pid: int, starttime: int | None) -> None:
        self._send(f"+ {pid} {starttime or ''}")

    def forget(self, pid: int) -> None:
        self._send(f"- {pid}")

    def _send(self, line: str) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(line.strip() + "\n")
        except (BrokenPipeError, ValueError, OSError):
            pass  # it died: the supervisor's next check starts it again and registers every child

    def close(self) -> None:
        """End-of-file: it kills what is still registered (normally nothing) and exits."""
        if self._pipe is not None:
            try:
                self._pipe.close()
            except OSError:
                pass
            self._pipe = None
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the supervisor is the supervisor's to handle
    groups = watch(sys.stdin)
    if groups:
        left = kill_groups(groups)
        print(
            f"flywheel watchdog: supervisor gone; stopped process groups {sorted(groups)}"
            + (f"; still alive: {sorted(left)}" if left else ""),
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
