"""`flywheel up`: the whole embedded stack as supervised child processes on 127.0.0.1.

MLflow server (SQLite + local artifacts, webhooks on) → Prefect server (+UI) → model servers (production for
`champion`, staging for `challenger`) → the webhook bridge (and any other `local.SERVICES`) → the process serving
every deployment. Logs, the supervisor's own log and the stack file (pids, URLs) live in the state dir, owner-only.

Supervision: every child that dies is restarted after a backoff (1, 2, 4 s… up to `restart_backoff_max_seconds`),
at most `restart_limit` times within `restart_window_seconds`; then the supervisor says it gave up and the rest of
the stack runs on. Serving never waits for MLflow or Prefect: the model servers keep what they loaded. The model
servers and the bridge are health-checked (`/health` with a timeout); after `health_failures` failed checks in a row
a frozen one is killed and started again. A watchdog process (flywheel.stack.reaper) stops every child when the
supervisor dies, kill -9 included. Ctrl-C / SIGTERM stops all. How each child starts is in flywheel.stack.launch.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.core.files import load_or_create_private, write_private
from flywheel.core.settings import Settings
from flywheel.stack import launch, local, processes, reaper
from flywheel.stack.processes import ManagedProcess, ServerStartError
from flywheel.stack.restarts import HealthCount, RestartPolicy

SECRET_FILES = ("admin_token",)
SUPERVISOR_LOG = "supervisor.log"
# Children health-checked over HTTP besides the `local.SERVICES` that ask for it. MLflow and Prefect are only
# watched for exiting: a slow answer from them under load is no reason to restart them.
HEALTH_CHECKED = {"model-server", "staging-server"}
# A child is restarted only while what it needs at start runs (a model server loads its alias from MLflow; `serve`
# creates its deployments on Prefect). Waiting for a dependency counts against no limit.
DEPENDS_ON = {"model-server": ("mlflow",), "staging-server": ("mlflow",), "deployments": ("prefect",)}
# Started again once the server they are connected to was restarted: `serve`'s runner loops and Prefect's
# cancellation observer give up after a few failed calls ("flow run cancellation will fail") and never recover.
# The model servers are not: serving never depends on MLflow being up.
RECONNECT_AFTER = {"prefect": ("deployments",)}


def load_or_create_token(path: Path) -> str:
    """The model server's admin token in `path` (0600), generated once."""
    return load_or_create_private(path, lambda: secrets.token_urlsafe(32))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return reaper.running(pid, None)  # a zombie is no live process


def live_children(stack: dict) -> dict[str, int]:
    """The children a stack file records that still run: same pid and, where recorded, the same start time."""
    starts = stack.get("start_times") or {}
    alive = {}
    for name, pid in (stack.get("pids") or {}).items():
        if reaper.running(int(pid), starts.get(name)):
            alive[name] = int(pid)
    return alive


@dataclass
class Stack:
    settings: Settings
    children: dict[str, ManagedProcess] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _watchdog: reaper.Watchdog | None = None
    _policies: dict[str, RestartPolicy] = field(default_factory=dict)
    _health: dict[str, HealthCount] = field(default_factory=dict)
    _pending: dict[str, float] = field(default_factory=dict)  # name → when to try restarting it
    _held: dict[str, str] = field(default_factory=dict)  # name → the dead server it waits for (RECONNECT_AFTER)
    _trees: dict[str, dict[int, int]] = field(default_factory=dict)  # name → its process tree at the last check
    gave_up: dict[str, str] = field(default_factory=dict)  # name → why

    @property
    def root(self) -> Path:
        return local.state_dir(self.settings)

    @property
    def stack_file(self) -> Path:
        return self.root / local.STACK_FILE

    def say(self, message: str) -> None:
        """A supervisor event: on stderr and in logs/supervisor.log (owner-only)."""
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} flywheel up: {message}"
        print(line, file=sys.stderr, flush=True)
        try:
            log_path = self.root / "logs" / SUPERVISOR_LOG
            log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with processes.open_private_log(log_path) as log:
                log.write((line + "\n").encode())
        except OSError:
            pass

    # ----------------------------------------------------------------------------------------------- checks
    def check_can_start(self) -> None:
        """A running stack, a stale stack file, or a taken port: say so before anything starts. Children left
        running by a supervisor that died (its watchdog killed too) are stopped here."""
        if self.stack_file.exists():
            try:
                old = json.loads(self.stack_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            alive = live_children(old)
            supervisor = old.get("supervisor_pid")
            if alive and supervisor and not pid_alive(int(supervisor)) and old.get("start_times"):
                left = reaper.kill_groups({pid: (old.get("start_times") or {}).get(n) for n, pid in alive.items()})
                self.say(
                    f"stopped {len(alive)} processes left running by a supervisor that died (pid {supervisor}): "
                    + ", ".join(f"{n} {p}" for n, p in alive.items())
                    + (f"; still alive: {sorted(left)}" if left else "")
                )
                alive = live_children(old)
            if alive:
                raise ServerStartError(
                    f"a Flywheel stack already runs from {self.root} (pids {alive}); "
                    "stop it first (Ctrl-C in its terminal "
                    f"or `kill {old.get('supervisor_pid', '')}`)"
                )
            self.stack_file.unlink()  # stale: its processes are gone
        s = self.settings
        ports = {
            "MLflow": s.mlflow_port, "Prefect": s.prefect_port, "model server": s.serving_port,
            "staging model server": s.staging_port, "bridge": s.bridge_port,
        }  # fmt: skip
        taken = [f"{name} port {port}" for name, port in ports.items() if processes.port_in_use(s.host, port)]
        if taken:
            raise ServerStartError(
                "cannot start the stack, ports already in use: " + ", ".join(taken)
                + " (set FLYWHEEL_MLFLOW_PORT, FLYWHEEL_PREFECT_PORT, FLYWHEEL_SERVING_PORT, FLYWHEEL_STAGING_PORT,"
                " FLYWHEEL_BRIDGE_PORT)"
            )  # fmt: skip

    # ----------------------------------------------------------------------------------------------- start
    def starters(self) -> dict[str, Callable[[], ManagedProcess]]:
        """How each child starts, in start order (the reverse is the stop order)."""
        s, launcher = self.settings, self._launcher()
        starters: dict[str, Callable[[], ManagedProcess]] = {
            "mlflow": launcher.mlflow,
            "prefect": launcher.prefect,
            "model-server": lambda: self._start_model_server("model-server", s.serving_port, self._token()),
            "staging-server": lambda: self._start_model_server("staging-server", s.staging_port, self._token()),
        }
        for service in local.SERVICES:
            starters[service.name] = lambda service=service: launcher.service(service)
        starters["deployments"] = launcher.deployments
        return starters

    def _launcher(self) -> launch.Launcher:
        return launch.Launcher(self.settings, self.root, self._track)

    def _start_model_server(self, role: str, port: int, admin_token: str) -> ManagedProcess:
        return self._launcher().model_server(role, port, admin_token)

    def start(self) -> dict[str, str]:
        self.check_can_start()
        s, root = self.settings, self.root
        local.tighten_modes(root)
        load_or_create_token(root / "admin_token")
        try:
            self._start_watchdog()
            for name, starter in self.starters().items():
                if name == "deployments":
                    self._launcher().register_webhook()
                self.children[name] = starter()
            self._launcher().ensure_automations(s.alert_webhook_url)
            if s.deploy_target == "docker":
                launch.check_engine()
        except BaseException:
            self.stop()
            raise
        self._write_stack_file()
        return launch.stack_urls(s)

    def _start_watchdog(self) -> None:
        """The watchdog reads our pipe; its end-of-file (this process gone) makes it stop every child."""
        self._watchdog = reaper.Watchdog(self.root / "logs" / "watchdog.log", processes.CHILD_UMASK)
        self._watchdog.start()
        for mp in self.children.values():  # after a restart of the watchdog itself
            self._track(mp)

    def _track(self, mp: ManagedProcess) -> None:
        if self._watchdog is not None:
            self._watchdog.track(mp.pid, mp.start_time)

    def _untrack(self, mp: ManagedProcess) -> None:
        if self._watchdog is not None:
            self._watchdog.forget(mp.pid)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def _write_stack_file(self) -> None:
        data = {
            **launch.stack_urls(self.settings),
            "supervisor_pid": os.getpid(),
            "watchdog_pid": self._watchdog.pid if self._watchdog else None,
            "pids": {name: mp.pid for name, mp in self.children.items()},
            "start_times": {name: mp.start_time for name, mp in self.children.items()},
            "restarting": sorted(self._pending),
            "gave_up": self.gave_up,
            "model_name": self.settings.model_name,
        }
        write_private(self.stack_file, json.dumps(data, indent=2))

    # ----------------------------------------------------------------------------------------------- run/stop
    def supervise(self, interval: float | None = None) -> None:
        """Restart what dies or freezes (with backoff, up to the limit), until stop() is called."""
        interval = self.settings.health_check_seconds if interval is None else interval
        while not self._stopping.wait(interval):
            self.check_once()

    def check_once(self) -> None:
        """One round: the watchdog, then each child in start order (a dependency before what needs it)."""
        code = self._watchdog.exited() if self._watchdog is not None else None
        if code is not None and not self._stopping.is_set():
            self.say(f"the watchdog exited with code {code}; starting it again")
            self._stop_watchdog()
            self._start_watchdog()
            self._write_stack_file()
        table = reaper.proc_table()
        starters = self.starters()
        for name, mp in list(self.children.items()):
            if self._stopping.is_set():
                return
            if name in self.gave_up or self.children.get(name) is not mp:  # replaced this round (_reconnect)
                continue
            if name not in self._pending:
                if mp.alive() and self._responsive(name, mp):
                    self._trees[name] = reaper.tree_of_group(mp.pid, table)
                    continue
                self._on_down(name, mp)
            if name in self._pending and time.monotonic() >= self._pending[name] and self._deps_up(name):
                self._restart(name, starters[name])

    def _responsive(self, name: str, mp: ManagedProcess) -> bool:
        checked = name in HEALTH_CHECKED or any(sv.name == name and sv.health_checked for sv in local.SERVICES)
        if not checked:
            return True
        count = self._health.setdefault(name, HealthCount(self.settings.health_failures))
        if mp.healthy(timeout=self.settings.health_timeout_seconds):
            count.passed()
            return True
        if not count.failed():
            self.say(f"{name} (pid {mp.pid}) failed a health check ({count.count} of {count.limit}) at {mp.url}/health")
            return True
        self.say(
            f"{name} (pid {mp.pid}) failed {count.limit} health checks in a row (timeout "
            f"{self.settings.health_timeout_seconds:g}s): it is frozen or stuck; killing it (SIGKILL) to restart it"
        )
        count.passed()
        mp.kill()
        return False

    def _on_down(self, name: str, mp: ManagedProcess) -> None:
        """A child died (or was killed as frozen): stop what is left of it, then schedule a restart or give up."""
        code = mp.proc.poll()
        self.say(f"{name} (pid {mp.pid}) exited with code {code}; see {mp.log_path}")
        mp.stop()  # its group (workers holding the port) and anything of its tree that left the group
        reaper.signal_tree(reaper.alive_in(self._trees.pop(name, {})), signal.SIGKILL)
        self._untrack(mp)
        self._schedule(name)
        for dependent in RECONNECT_AFTER.get(name, ()):
            self._hold(dependent, name)

    def _hold(self, name: str, server: str) -> None:
        """Stop `name` as soon as `server` dies, not once it is back: a run the old process started on the returning
        server would be cut short by the restart (seen: a deploy-model run ended in "interpreter shutdown" and its
        failure moved the alias back). `_reconnect` starts it again after `server` restarted."""
        old = self.children.pop(name, None)
        if old is None or name in self.gave_up:
            return
        self.say(f"{name} (pid {old.pid}) was connected to the {server} that died: stopped until {server} is back")
        old.stop()
        reaper.signal_tree(reaper.alive_in(self._trees.pop(name, {})), signal.SIGKILL)
        self._untrack(old)
        self._held[name] = server
        self._write_stack_file()

    def _schedule(self, name: str) -> None:
        s = self.settings
        policy = self._policies.setdefault(
            name, RestartPolicy(s.restart_limit, s.restart_window_seconds, s.restart_backoff_max_seconds)
        )
        now = time.monotonic()
        delay = policy.delay(now)
        if delay is None:
            self._pending.pop(name, None)
            self.gave_up[name] = (
                f"restarted {policy.recent(now)} times within {s.restart_window_seconds:g}s "
                "(FLYWHEEL_RESTART_LIMIT, FLYWHEEL_RESTART_WINDOW_SECONDS)"
            )
            self.say(
                f"GAVE UP on {name}: {self.gave_up[name]}; the rest of the stack keeps running without it "
                f"(see {self.root / 'logs' / (name + '.log')}; restart `flywheel up` once the cause is fixed)"
            )
        else:
            self._pending[name] = now + delay
            self.say(
                f"restarting {name} in {delay:g}s (restart {policy.recent(now) + 1} of at most {s.restart_limit} "
                f"within {s.restart_window_seconds:g}s)"
            )
        self._write_stack_file()

    def _deps_up(self, name: str) -> bool:
        return all(
            dep in self.children and dep not in self._pending and dep not in self.gave_up
            for dep in DEPENDS_ON.get(name, ())
        )

    def _restart(self, name: str, starter: Callable[[], ManagedProcess]) -> None:
        self._policies[name].record(time.monotonic())
        port = self._port_of(name)
        if port is not None and not processes.wait_port_free(self.settings.host, port):
            self.say(f"{name}: port {port} is still held by another process")
        try:
            mp = starter()
        except ServerStartError as exc:
            self.say(f"could not restart {name}: {exc}")
            self._schedule(name)
            return
        self.children[name] = mp
        self._pending.pop(name, None)
        self._health.pop(name, None)
        self.say(f"{name} restarted (pid {mp.pid}) and healthy at {mp.url}")
        self._write_stack_file()
        for dependent in RECONNECT_AFTER.get(name, ()):
            self._reconnect(dependent, name)

    def _reconnect(self, name: str, server: str) -> None:
        """Start `name` again on the restarted `server` (not counted against its restart limit: it did not die)."""
        if self._held.pop(name, None) is None or self._stopping.is_set():
            return
        try:
            mp = self.starters()[name]()
        except ServerStartError as exc:
            self.say(f"could not start {name} again: {exc}")
            self._schedule(name)
            return
        self.children[name] = mp
        self._health.pop(name, None)
        self.say(f"{name} restarted (pid {mp.pid}) on the new {server}")
        self._write_stack_file()

    def _port_of(self, name: str) -> int | None:
        s = self.settings
        return {"mlflow": s.mlflow_port, "prefect": s.prefect_port, "model-server": s.serving_port,
                "staging-server": s.staging_port, "bridge": s.bridge_port}.get(name)  # fmt: skip

    def _token(self) -> str:
        return load_or_create_token(self.root / "admin_token")

    def stop(self) -> None:
        self._stopping.set()
        for name in reversed(list(self.children)):
            mp = self.children.pop(name)
            mp.stop()
            self._untrack(mp)
        self._stop_watchdog()
        if self.settings.deploy_target == "docker":
            launch.remove_containers(self.settings)
        if self.stack_file.exists():
            self.stack_file.unlink()

    def run_until_signalled(self) -> None:
        def _handler(signum, frame):  # noqa: ARG001
            self._stopping.set()

        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
        try:
            self.supervise()
        finally:
            self.stop()
