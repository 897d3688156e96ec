"""`flywheel up`: the whole embedded stack as supervised child processes on 127.0.0.1.

MLflow server (SQLite + local artifacts, webhooks on) → Prefect server (+UI) → model servers (production for
`champion`, staging for `challenger`) → the webhook bridge (and any other `local.SERVICES`) → the process serving
every deployment. Logs, the supervisor's own log and the stack file (pids, URLs) live in the state dir, owner-only.

Supervision: every child that dies is restarted after a backoff (1, 2, 4 s… up to `restart_backoff_max_seconds`),
at most `restart_limit` times within `restart_window_seconds`; then the supervisor says it gave up and the rest of
the stack runs on. Serving never waits for MLflow or Prefect: the model servers keep what they loaded. The model
servers and the bridge are health-checked (`/health` with a timeout); after `health_failures` failed checks in a row
a frozen one is killed and started again. A watchdog process (flywheel.stack.reaper) stops every child when the
supervisor dies, kill -9 included. Ctrl-C / SIGTERM stops all.
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
from flywheel.stack import local, processes, reaper
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

    def urls(self) -> dict[str, str]:
        s = self.settings
        return {
            "mlflow_url": f"http://{s.host}:{s.mlflow_port}",
            "prefect_url": f"http://{s.host}:{s.prefect_port}",
            "prefect_api_url": f"http://{s.host}:{s.prefect_port}/api",
            "model_url": s.serving_url,
            "staging_url": s.staging_url,
            "bridge_url": f"http://{s.host}:{s.bridge_port}",
        }

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
    def child_env(self) -> dict[str, str | None]:
        u = self.urls()
        return {
            "MLFLOW_TRACKING_URI": u["mlflow_url"],
            "PREFECT_API_URL": u["prefect_api_url"],
            "FLYWHEEL_STATE_DIR": str(self.root),
            "PREFECT_HOME": str(self.root / "prefect"),
            # Prefect's server answers 500 while its database is briefly away; its client retries only 429/502/503.
            "PREFECT_CLIENT_RETRY_EXTRA_CODES": os.environ.get("PREFECT_CLIENT_RETRY_EXTRA_CODES", "500"),
        }

    def starters(self) -> dict[str, Callable[[], ManagedProcess]]:
        """How each child starts, in start order (the reverse is the stop order)."""
        s, root = self.settings, self.root
        logs = root / "logs"

        def mlflow() -> ManagedProcess:
            backend, artifacts = local.mlflow_backend(s)
            return processes.start_mlflow(
                host=s.host, port=s.mlflow_port, backend_store_uri=backend, artifacts_destination=artifacts,
                log_path=logs / "mlflow.log", on_spawn=self._track,
                env=processes.mlflow_server_env(root, processes.load_or_create_fernet_key(root)),
            )  # fmt: skip

        def prefect() -> ManagedProcess:
            return processes.start_prefect(
                host=s.host, port=s.prefect_port, prefect_home=root / "prefect", log_path=logs / "prefect.log",
                database_url=s.prefect_database_url.get_secret_value() if s.prefect_database_url else None,
                on_spawn=self._track,
            )  # fmt: skip

        starters: dict[str, Callable[[], ManagedProcess]] = {
            "mlflow": mlflow,
            "prefect": prefect,
            "model-server": lambda: self._start_model_server("model-server", s.serving_port, self._token()),
            "staging-server": lambda: self._start_model_server("staging-server", s.staging_port, self._token()),
        }
        for service in local.SERVICES:
            starters[service.name] = lambda service=service: self._start_service(service)
        starters["deployments"] = self._start_deployments
        return starters

    def start(self) -> dict[str, str]:
        self.check_can_start()
        s, root, u = self.settings, self.root, self.urls()
        local.tighten_modes(root)
        load_or_create_token(root / "admin_token")
        try:
            self._start_watchdog()
            for name, starter in self.starters().items():
                if name == "deployments":
                    self._register_webhook(u["bridge_url"])
                self.children[name] = starter()
            self._ensure_automations(s.alert_webhook_url)
            if s.deploy_target == "docker":
                self._check_engine()
        except BaseException:
            self.stop()
            raise
        self._write_stack_file()
        return u

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

    def _model_server_cmd(self, role: str, port: int, admin_token: str) -> list[str]:
        alias = "champion" if role == "model-server" else "challenger"
        serving_role = "production" if alias == "champion" else "staging"
        return [
            sys.executable, "-m", "flywheel.serving", "--model", self.settings.model_name,
            "--host", self.settings.host, "--port", str(port), "--tracking-uri", self.urls()["mlflow_url"],
            "--initial-alias", alias, "--role", serving_role,
            "--request-log-dir", str(self.settings.request_log_dir(serving_role)),
        ]  # fmt: skip

    def _start_model_server(self, role: str, port: int, admin_token: str) -> ManagedProcess:
        env = {**self.child_env(), "FLYWHEEL_ADMIN_TOKEN": admin_token}
        mp = processes.spawn(
            role, self._model_server_cmd(role, port, admin_token), url=f"http://{self.settings.host}:{port}",
            log_path=self.root / "logs" / f"{role}.log", health_path="/health", env=env, on_spawn=self._track,
        )  # fmt: skip
        return processes.healthy_or_stopped(mp, 120)

    def _start_service(self, service: local.Service) -> ManagedProcess:
        cmd = [sys.executable, "-m", service.module, *service.args(self.settings)]
        mp = processes.spawn(
            service.name, cmd, url=service.url(self.settings), log_path=self.root / "logs" / f"{service.name}.log",
            health_path=service.health_path, env=self.child_env(), on_spawn=self._track,
        )  # fmt: skip
        return processes.healthy_or_stopped(mp, service.start_timeout)

    def _register_webhook(self, bridge_url: str) -> None:
        from flywheel.bridge.secrets import load_or_create_secret
        from flywheel.bridge.webhooks import ensure_webhook
        from flywheel.tasks import registry

        secret = load_or_create_secret(self.root)
        ensure_webhook(registry.client(self.urls()["mlflow_url"]), bridge_url + "/webhooks/mlflow", secret)

    def _ensure_automations(self, alert_url: str | None) -> None:
        """Zombie-run detection always; alert notifications when a webhook URL is configured."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flywheel.deployments.alerts import ensure_alerts, ensure_zombie_detection

        # This process's Prefect settings stay as they were (a test process, or `up` itself): only these calls go
        # to the stack's server.
        with temporary_settings(updates={PREFECT_API_URL: self.urls()["prefect_api_url"]}):
            ensure_zombie_detection()
            if alert_url:
                ensure_alerts(alert_url)

    def _start_deployments(self) -> ManagedProcess:
        from flywheel.deployments.alerts import HEARTBEAT_SECONDS

        # Heartbeats let the zombie automation mark a run Crashed when this process dies under it.
        env = {**self.child_env(), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}  # fmt: skip
        cmd = [sys.executable, "-m", "flywheel.deployments.serve"]
        mp = processes.spawn(
            "deployments", cmd, url=self.urls()["prefect_api_url"], log_path=self.root / "logs" / "deployments.log",
            health_path="/health", env=env, on_spawn=self._track,
        )  # fmt: skip
        from flywheel.deployments.definitions import DEPLOYMENT_NAMES

        try:
            for full_name in DEPLOYMENT_NAMES:  # `serve` creates them one by one
                self._wait_for_deployment(full_name, mp)
        except BaseException:
            mp.stop()
            raise
        return mp

    def _wait_for_deployment(self, full_name: str, mp: ManagedProcess, timeout: float = 120) -> None:
        import httpx

        api = self.urls()["prefect_api_url"]
        flow_name, dep_name = full_name.split("/")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not mp.alive():
                raise ServerStartError(f"the deployments process exited while starting:\n{mp.log_tail()}")
            try:
                if httpx.get(f"{api}/deployments/name/{flow_name}/{dep_name}", timeout=3).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerStartError(f"deployment {full_name} did not appear within {timeout:.0f}s:\n{mp.log_tail()}")

    def _write_stack_file(self) -> None:
        data = {
            **self.urls(),
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
            self._remove_containers()
        if self.stack_file.exists():
            self.stack_file.unlink()

    @staticmethod
    def _check_engine() -> None:
        from flywheel.tasks.serving import TargetError, docker_engine

        try:
            docker_engine(timeout=5)
        except TargetError as exc:
            print(f"warning: {exc}. Until one answers, deployments fail; what serves stays.", file=sys.stderr)

    def _remove_containers(self) -> None:
        """The docker target's containers sit behind this stack's model servers: they stop with them."""
        from flywheel.tasks.serving import DockerTarget, TargetError

        s = self.settings
        for role, url in (("production", s.serving_url), ("staging", s.staging_url)):
            try:
                removed = DockerTarget(url=url, admin_token=None, model_name=s.model_name, role=role).remove_all()
            except TargetError:
                continue  # no engine: no container of ours can be running
            if removed:
                print(f"removed containers: {', '.join(removed)}", file=sys.stderr)

    def run_until_signalled(self) -> None:
        def _handler(signum, frame):  # noqa: ARG001
            self._stopping.set()

        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
        try:
            self.supervise()
        finally:
            self.stop()
