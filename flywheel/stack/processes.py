"""Start and stop the servers of the embedded default (MLflow, Prefect) as child processes on 127.0.0.1.

Each child gets its own process group so that stopping it also stops the workers it spawned; we only ever
signal process groups we started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flywheel.core.errors import UserError
from flywheel.core.files import load_or_create_private
from flywheel.stack import reaper

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


CHILD_UMASK = 0o077


class ServerStartError(UserError, RuntimeError):
    """A server did not come up: port taken, crashed on start, or not healthy in time."""


def apply_quiet_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Telemetry off and generous start-up timeouts (the machines have no network but the registries)."""
    target = os.environ if env is None else env
    for key, value in QUIET_ENV.items():
        target.setdefault(key, value)
    return dict(target)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Someone listens on the port, or holds it bound (a server could not bind it either)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((host, port)) == 0:
            return True
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def bin_path(name: str) -> str:
    """A console script of this environment (mlflow, prefect), next to the running interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    health_path: str = "/"
    extra: dict = field(default_factory=dict)
    start_time: int | None = None  # /proc start time: with the pid, it names this process (pids are reused)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group_alive(self) -> bool:
        """The child or anything left in its process group still runs."""
        self.proc.poll()
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(self.url + self.health_path, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to the child's own process group, and at last SIGKILL to any descendant
        that left the group. The group is signalled even when the child itself is already dead: its workers (MLflow's
        uvicorn) may live on in it, holding the port."""
        tree = reaper.tree_of_group(self.pid)
        for sig, wait in ((signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5)):
            self.proc.poll()  # reap the leader if it is a zombie: a zombie still counts as a group member
            if not reaper.signal_group(self.pid, sig):
                break
            if self._wait_group_gone(wait):
                break
        reaper.signal_tree(reaper.alive_in(tree), signal.SIGKILL)
        self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the whole group at once (a frozen child does not answer gentler signals), then reap it."""
        tree = reaper.tree_of_group(self.pid)
        reaper.signal_group(self.pid, signal.SIGKILL)
        reaper.signal_tree(tree, signal.SIGKILL)
        self._wait_group_gone(5)

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.proc.poll()
            try:
                os.killpg(self.pid, 0)
            except (ProcessLookupError, PermissionError):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def spawn(
    name: str,
    cmd: list[str],
    *,
    url: str,
    log_path: Path,
    health_path: str,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    on_spawn: Callable[[ManagedProcess], None] | None = None,
) -> ManagedProcess:
    """Start a child in its own process group, output to log_path; an env value of None unsets that variable.
    `on_spawn` hears of the child at once, before it is healthy (the supervisor's watchdog registers it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    full_env = apply_quiet_env(dict(os.environ))
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    log = open_private_log(log_path)
    # umask 077: whatever the child creates (databases, logs, the request log's Parquet) is owner-only.
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True, umask=CHILD_UMASK
    )
    log.close()
    mp = ManagedProcess(name, proc, url, log_path, health_path, start_time=reaper.start_time(proc.pid))
    if on_spawn is not None:
        on_spawn(mp)
    return mp


def open_private_log(log_path: Path):
    """A log file opened for appending, owner-only (0600, tightened if it was looser)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def wait_healthy(mp: ManagedProcess, timeout: float = 120.0) -> ManagedProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not mp.alive():
            raise ServerStartError(
                f"{mp.name} exited with code {mp.proc.returncode} while starting (log {mp.log_path}):\n{mp.log_tail()}"
            )
        if mp.healthy():
            return mp
        time.sleep(0.3)
    mp.stop()
    raise ServerStartError(
        f"{mp.name} was not healthy at {mp.url} after {timeout:.0f}s (log {mp.log_path}):\n{mp.log_tail()}"
    )


def wait_port_free(host: str, port: int, timeout: float = 10.0) -> bool:
    """True once nothing holds the port (a killed server's socket may take a moment to close)."""
    deadline = time.monotonic() + timeout
    while port_in_use(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _check_port(name: str, host: str, port: int) -> None:
    if port_in_use(host, port):
        raise ServerStartError(f"cannot start {name}: port {port} on {host} is already in use (choose another port)")


def mlflow_server_env(state_dir: Path, webhook_key: str | None = None) -> dict[str, str]:
    """Server-side settings: webhooks to a loopback receiver allowed, a fixed encryption key for their secrets."""
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "2",
    }
    if webhook_key:
        env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = webhook_key
    return env


def load_or_create_fernet_key(state_dir: Path) -> str:
    """The MLflow server's key for encrypting webhook secrets; fixed across restarts, owner-only."""
    from cryptography.fernet import Fernet

    return load_or_create_private(
        Path(state_dir) / "mlflow_webhook_encryption.key", lambda: Fernet.generate_key().decode()
    )


def start_mlflow(
    *,
    host: str,
    port: int,
    backend_store_uri: str,
    artifacts_destination: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    on_spawn: Callable[[ManagedProcess], None] | None = None,
) -> ManagedProcess:
    _check_port("the MLflow server", host, port)
    cmd = [
        bin_path("mlflow"), "server", "--host", host, "--port", str(port),
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
        "--workers", "1",
    ]  # fmt: skip
    mp = spawn(
        "mlflow", cmd, url=f"http://{host}:{port}", log_path=log_path, health_path="/health", env=env, on_spawn=on_spawn
    )
    return healthy_or_stopped(mp, timeout)


def start_mlflow_in(root: Path, *, host: str = "127.0.0.1", port: int | None = None) -> ManagedProcess:
    """An MLflow server with everything under `root` (SQLite backend, local artifacts, its log, the webhook key),
    on `port` or a free one: the servers of the test session and the benchmarks."""
    root.mkdir(parents=True, exist_ok=True)
    return start_mlflow(
        host=host,
        port=free_port(host) if port is None else port,
        backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifacts_destination=str(root / "artifacts"),
        log_path=root / "mlflow.log",
        env=mlflow_server_env(root, load_or_create_fernet_key(root)),
    )


def start_prefect(
    *,
    host: str,
    port: int,
    prefect_home: Path,
    log_path: Path,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    on_spawn: Callable[[ManagedProcess], None] | None = None,
) -> ManagedProcess:
    _check_port("the Prefect server", host, port)
    prefect_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    full_env: dict[str, str | None] = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": None,
        # The UI asks /ui-settings where the API is; Prefect builds that from these settings, not from
        # `--port`, so without them a UI on another port talks to 127.0.0.1:4200 (or whatever runs there).
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
        "PREFECT_UI_URL": f"http://{host}:{port}",
        **(env or {}),
    }
    if database_url:
        full_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    cmd = [bin_path("prefect"), "server", "start", "--host", host, "--port", str(port)]
    mp = spawn(
        "prefect", cmd, url=f"http://{host}:{port}", log_path=log_path, health_path="/api/health", env=full_env,
        on_spawn=on_spawn,
    )  # fmt: skip
    return healthy_or_stopped(mp, timeout)


def healthy_or_stopped(mp: ManagedProcess, timeout: float) -> ManagedProcess:
    """Wait for health; on any interruption (Ctrl-C included) stop the child so nothing is left running."""
    try:
        return wait_healthy(mp, timeout)
    except BaseException:
        mp.stop()
        raise
