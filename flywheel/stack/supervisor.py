"""`flywheel up`: the whole embedded stack as supervised child processes on 127.0.0.1.

MLflow server (SQLite + local artifacts, webhooks on) → Prefect server (+UI) → model servers (production for
`champion`, staging for `challenger`) → the webhook bridge → the process serving every deployment. Logs and
the stack file (pids, URLs) live in the state dir. A child that dies is restarted; Ctrl-C / SIGTERM stops all.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.core.files import load_or_create_private
from flywheel.core.settings import Settings
from flywheel.stack import local, processes
from flywheel.stack.processes import ManagedProcess, ServerStartError

SECRET_FILES = ("admin_token",)


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
    return True


@dataclass
class Stack:
    settings: Settings
    children: dict[str, ManagedProcess] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)

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

    # ----------------------------------------------------------------------------------------------- checks
    def check_can_start(self) -> None:
        """A running stack, a stale stack file, or a taken port: say so before anything starts."""
        if self.stack_file.exists():
            try:
                old = json.loads(self.stack_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            alive = {n: p for n, p in (old.get("pids") or {}).items() if pid_alive(int(p))}
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

    def start(self) -> dict[str, str]:
        self.check_can_start()
        s, root, u = self.settings, self.root, self.urls()
        logs = root / "logs"
        admin_token = load_or_create_token(root / "admin_token")
        try:
            backend, artifacts = local.mlflow_backend(s)
            self.children["mlflow"] = processes.start_mlflow(
                host=s.host, port=s.mlflow_port, backend_store_uri=backend, artifacts_destination=artifacts,
                log_path=logs / "mlflow.log",
                env=processes.mlflow_server_env(root, processes.load_or_create_fernet_key(root)),
            )  # fmt: skip
            self.children["prefect"] = processes.start_prefect(
                host=s.host, port=s.prefect_port, prefect_home=root / "prefect", log_path=logs / "prefect.log",
                database_url=s.prefect_database_url.get_secret_value() if s.prefect_database_url else None,
            )  # fmt: skip
            for role, port in (("model-server", s.serving_port), ("staging-server", s.staging_port)):
                self.children[role] = self._start_model_server(role, port, admin_token)
            self.children["bridge"] = self._start_bridge()
            self._register_webhook(u["bridge_url"])
            self.children["deployments"] = self._start_deployments()
            self._ensure_automations(s.alert_webhook_url)
            if s.deploy_target == "docker":
                self._check_engine()
        except BaseException:
            self.stop()
            raise
        self._write_stack_file()
        return u

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
            log_path=self.root / "logs" / f"{role}.log", health_path="/health", env=env,
        )  # fmt: skip
        return processes.healthy_or_stopped(mp, 120)

    def _start_bridge(self) -> ManagedProcess:
        s = self.settings
        cmd = [sys.executable, "-m", "flywheel.bridge", "--host", s.host, "--port", str(s.bridge_port)]
        mp = processes.spawn(
            "bridge", cmd, url=self.urls()["bridge_url"], log_path=self.root / "logs" / "bridge.log",
            health_path="/health", env=self.child_env(),
        )  # fmt: skip
        return processes.healthy_or_stopped(mp, 60)

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
            health_path="/health", env=env,
        )  # fmt: skip
        from flywheel.deployments.definitions import DEPLOYMENT_NAMES

        for full_name in DEPLOYMENT_NAMES:  # `serve` creates them one by one
            self._wait_for_deployment(full_name, mp)
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
            "pids": {name: mp.pid for name, mp in self.children.items()},
            "model_name": self.settings.model_name,
        }
        self.stack_file.write_text(json.dumps(data, indent=2))

    # ----------------------------------------------------------------------------------------------- run/stop
    def supervise(self, interval: float = 2.0) -> None:
        """Restart a model server or the bridge that died, until stop() is called."""
        restartable = {
            "model-server": lambda: self._start_model_server("model-server", self.settings.serving_port, self._token()),
            "staging-server": lambda: self._start_model_server(
                "staging-server", self.settings.staging_port, self._token()
            ),
            "bridge": self._start_bridge,
            "deployments": self._start_deployments,
        }
        while not self._stopping.wait(interval):
            for name, mp in list(self.children.items()):
                if mp.alive() or self._stopping.is_set():
                    continue
                if name not in restartable:
                    print(f"{name} exited with code {mp.proc.returncode}; see {mp.log_path}", file=sys.stderr)
                    self._stopping.set()
                    break
                print(f"{name} exited with code {mp.proc.returncode}; restarting it", file=sys.stderr)
                try:
                    self.children[name] = restartable[name]()
                    self._write_stack_file()
                except ServerStartError as exc:
                    print(f"could not restart {name}: {exc}", file=sys.stderr)

    def _token(self) -> str:
        return load_or_create_token(self.root / "admin_token")

    def stop(self) -> None:
        self._stopping.set()
        for name in ("deployments", "bridge", "staging-server", "model-server", "prefect", "mlflow"):
            mp = self.children.pop(name, None)
            if mp is not None:
                mp.stop()
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
