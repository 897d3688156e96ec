"""How each child of `flywheel up` starts: its command line, its environment and what "started" means for it (healthy
at its URL; for the deployments process, every deployment created on Prefect). Also what the stack wires up around
its children (the MLflow webhook to the bridge, Prefect's automations) and the docker target's engine and containers.

`flywheel.stack.supervisor` decides when a child starts, stops or restarts; this module only starts it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flywheel.core.settings import Settings
from flywheel.stack import local, processes
from flywheel.stack.processes import ManagedProcess, ServerStartError


def stack_urls(settings: Settings) -> dict[str, str]:
    """Where each server of the stack answers (the stack file records them)."""
    s = settings
    return {
        "mlflow_url": f"http://{s.host}:{s.mlflow_port}",
        "prefect_url": f"http://{s.host}:{s.prefect_port}",
        "prefect_api_url": f"http://{s.host}:{s.prefect_port}/api",
        "model_url": s.serving_url,
        "staging_url": s.staging_url,
        "bridge_url": f"http://{s.host}:{s.bridge_port}",
    }


@dataclass(frozen=True)
class Launcher:
    """Starts the children of the stack whose state lives in `root`; `on_spawn` hears of every process spawned (the
    supervisor's watchdog tracks it)."""

    settings: Settings
    root: Path
    on_spawn: Callable[[ManagedProcess], None]

    @property
    def urls(self) -> dict[str, str]:
        return stack_urls(self.settings)

    def env(self) -> dict[str, str | None]:
        u = self.urls
        return {
            "MLFLOW_TRACKING_URI": u["mlflow_url"],
            "PREFECT_API_URL": u["prefect_api_url"],
            "FLYWHEEL_STATE_DIR": str(self.root),
            "PREFECT_HOME": str(self.root / "prefect"),
            # Prefect's server answers 500 while its database is briefly away; its client retries only 429/502/503.
            "PREFECT_CLIENT_RETRY_EXTRA_CODES": os.environ.get("PREFECT_CLIENT_RETRY_EXTRA_CODES", "500"),
        }

    def _log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def mlflow(self) -> ManagedProcess:
        s, root = self.settings, self.root
        backend, artifacts = local.mlflow_backend(s)
        return processes.start_mlflow(
            host=s.host, port=s.mlflow_port, backend_store_uri=backend, artifacts_destination=artifacts,
            log_path=self._log("mlflow"), on_spawn=self.on_spawn,
            env=processes.mlflow_server_env(root, processes.load_or_create_fernet_key(root)),
        )  # fmt: skip

    def prefect(self) -> ManagedProcess:
        s = self.settings
        return processes.start_prefect(
            host=s.host, port=s.prefect_port, prefect_home=self.root / "prefect", log_path=self._log("prefect"),
            database_url=s.prefect_database_url.get_secret_value() if s.prefect_database_url else None,
            on_spawn=self.on_spawn,
        )  # fmt: skip

    def model_server_cmd(self, role: str, port: int) -> list[str]:
        alias = "champion" if role == "model-server" else "challenger"
        serving_role = "production" if alias == "champion" else "staging"
        return [
            sys.executable, "-m", "flywheel.serving", "--model", self.settings.model_name,
            "--host", self.settings.host, "--port", str(port), "--tracking-uri", self.urls["mlflow_url"],
            "--initial-alias", alias, "--role", serving_role,
            "--request-log-dir", str(self.settings.request_log_dir(serving_role)),
        ]  # fmt: skip

    def model_server(self, role: str, port: int, admin_token: str) -> ManagedProcess:
        env = {**self.env(), "FLYWHEEL_ADMIN_TOKEN": admin_token}
        mp = processes.spawn(
            role, self.model_server_cmd(role, port), url=f"http://{self.settings.host}:{port}",
            log_path=self._log(role), health_path="/health", env=env, on_spawn=self.on_spawn,
        )  # fmt: skip
        return processes.healthy_or_stopped(mp, 120)

    def service(self, service: local.Service) -> ManagedProcess:
        cmd = [sys.executable, "-m", service.module, *service.args(self.settings)]
        mp = processes.spawn(
            service.name, cmd, url=service.url(self.settings), log_path=self._log(service.name),
            health_path=service.health_path, env=self.env(), on_spawn=self.on_spawn,
        )  # fmt: skip
        return processes.healthy_or_stopped(mp, service.start_timeout)

    def deployments(self) -> ManagedProcess:
        from flywheel.deployments.alerts import HEARTBEAT_SECONDS

        # Heartbeats let the zombie automation mark a run Crashed when this process dies under it.
        env = {**self.env(), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}  # fmt: skip
        cmd = [sys.executable, "-m", "flywheel.deployments.serve"]
        mp = processes.spawn(
            "deployments", cmd, url=self.urls["prefect_api_url"], log_path=self._log("deployments"),
            health_path="/health", env=env, on_spawn=self.on_spawn,
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

        api = self.urls["prefect_api_url"]
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

    def register_webhook(self) -> None:
        """MLflow's webhook to the bridge, signed with the stack's secret (created once)."""
        from flywheel.bridge.secrets import load_or_create_secret
        from flywheel.bridge.webhooks import ensure_webhook
        from flywheel.tasks import registry

        secret = load_or_create_secret(self.root)
        ensure_webhook(registry.client(self.urls["mlflow_url"]), self.urls["bridge_url"] + "/webhooks/mlflow", secret)

    def ensure_automations(self, alert_url: str | None) -> None:
        """Zombie-run detection always; alert notifications when a webhook URL is configured."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flywheel.deployments.alerts import ensure_alerts, ensure_zombie_detection

        # This process's Prefect settings stay as they were (a test process, or `up` itself): only these calls go
        # to the stack's server.
        with temporary_settings(updates={PREFECT_API_URL: self.urls["prefect_api_url"]}):
            ensure_zombie_detection()
            if alert_url:
                ensure_alerts(alert_url)


def check_engine() -> None:
    """Warn, not fail, when the docker target has no engine to deploy to."""
    from flywheel.tasks.serving import TargetError, docker_engine

    try:
        docker_engine(timeout=5)
    except TargetError as exc:
        print(f"warning: {exc}. Until one answers, deployments fail; what serves stays.", file=sys.stderr)


def remove_containers(settings: Settings) -> None:
    """The docker target's containers sit behind this stack's model servers: they stop with them."""
    from flywheel.tasks.serving import DockerTarget, TargetError

    s = settings
    for role, url in (("production", s.serving_url), ("staging", s.staging_url)):
        try:
            removed = DockerTarget(url=url, admin_token=None, model_name=s.model_name, role=role).remove_all()
        except TargetError:
            continue  # no engine: no container of ours can be running
        if removed:
            print(f"removed containers: {', '.join(removed)}", file=sys.stderr)
