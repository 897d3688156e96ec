"""Integration fixtures for the scale-out configuration: a throwaway PostgreSQL cluster from this machine's own
binaries, and an MLflow server (PostgreSQL + S3 artifacts on moto) and a Prefect server (PostgreSQL) on it.

The cluster lives in a private temp dir, listens on 127.0.0.1 on a free port with a generated password, and is
stopped with `pg_ctl stop -m fast` at the end of the session. Nothing is started unless a test asks for it.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_USER = "flywheel"
PG_DATABASES = ("mlflow", "prefect")
_SERVICE_ACCOUNT = "postgres"  # initdb refuses to run as root


def find_pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: `pg_config --bindir`, then PATH, then Debian's versioned layout."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates += [Path(p) for p in versioned]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _service_account() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(_SERVICE_ACCOUNT)
    except KeyError:
        return None


@dataclass
class PostgresCluster:
    """A private PostgreSQL cluster; `restart()` drops every open connection, as a real restart or failover does."""

    bindir: Path
    root: Path
    host: str
    port: int
    user: str
    password: str
    run_as: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.run_as, "--", *cmd] if self.run_as else cmd

    def _run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{args[0]} {' '.join(args[1:3])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                f"\n{self.log_tail()}"
            )
        return proc

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            self._chown(pwfile)
        t0 = time.monotonic()
        self._run(
            "initdb", "-D", str(self.datadir), "-U", self.user, "--pwfile", str(pwfile), "-E", "UTF8",
            "--locale=C", "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        sockets = self.root / "sockets"
        sockets.mkdir()
        if self.run_as:
            self._chown(sockets)
        # Throwaway data: durability off for speed; our own port, loopback only, socket in our own dir.
        with open(self.datadir / "postgresql.auto.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '{self.host}'\nport = {self.port}\nunix_socket_directories = '{sockets}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n"
            )
        self.timings["initdb_s"] = time.monotonic() - t0

    def _chown(self, path: Path) -> None:
        account = pwd.getpwnam(self.run_as)
        os.chown(path, account.pw_uid, account.pw_gid)

    def start(self) -> None:
        self._run("pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.log_path), "-w", "-t", "60")

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "60")

    def restart(self) -> float:
        """`pg_ctl restart -m fast`: every client connection is terminated. Returns the seconds it took."""
        t0 = time.monotonic()
        self._run(
            "pg_ctl", "restart", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "60", "-l", str(self.log_path)
        )
        return time.monotonic() - t0

    def connect(self, database: str):
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=database, connect_timeout=10
        )

    def create_databases(self, names: tuple[str, ...]) -> None:
        conn = self.connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for name in names:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (databases `mlflow` and `prefect`) from this machine's own binaries."""
    from needs import missing

    from flywheel.stack import processes

    bindir = find_pg_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries not found (no pg_config --bindir, initdb on PATH or "
                "/usr/lib/postgresql/*/bin)", "the Debian package `postgresql` (`make parts` as root)")  # fmt: skip
    run_as = None
    if os.geteuid() == 0:
        if _service_account() is None:
            missing(f"running as root and no '{_SERVICE_ACCOUNT}' account to run initdb/pg_ctl as",
                    "the Debian package `postgresql` (it creates the account; `make parts` as root)")  # fmt: skip
        if not shutil.which("runuser"):
            missing("running as root and `runuser` is missing: cannot run initdb/pg_ctl unprivileged",
                    "the Debian package `util-linux`")  # fmt: skip
        run_as = _SERVICE_ACCOUNT
    root = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    cluster = PostgresCluster(
        bindir=bindir, root=root, host="127.0.0.1", port=processes.free_port(), user=PG_USER,
        password=secrets.token_urlsafe(18), run_as=run_as,
    )  # fmt: skip
    if run_as:
        cluster._chown(root)
    try:
        cluster.init()
        t0 = time.monotonic()
        cluster.start()
        cluster.create_databases(PG_DATABASES)
        cluster.timings["start_s"] = time.monotonic() - t0
        yield cluster
    finally:
        try:
            cluster.stop()  # only if its postmaster.pid exists: the cluster in our own data dir
        except (RuntimeError, subprocess.SubprocessError) as exc:
            print(f"warning: could not stop the test PostgreSQL cluster in {root}: {exc}")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PostgresStack:
    postgres: PostgresCluster
    mlflow: object  # processes.ManagedProcess
    prefect: object
    bucket: str
    prefix: str
    s3_endpoint: str
    startup_s: float

    @property
    def prefect_api_url(self) -> str:
        return self.prefect.url + "/api"


@pytest.fixture(scope="session")
def pg_stack(postgres, s3_server, session_dir):
    """MLflow on PostgreSQL with S3 artifacts on moto, and Prefect on PostgreSQL, started side by side."""
    import boto3

    from flywheel.stack import processes

    root = session_dir / "pg-stack"
    root.mkdir(parents=True, exist_ok=True)
    bucket, prefix = "flywheel-artifacts", "mlflow"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    s3_env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    mlflow_env = {**processes.mlflow_server_env(root), **s3_env}

    def start_mlflow():
        return processes.start_mlflow(
            host="127.0.0.1",
            port=processes.free_port(),
            backend_store_uri=postgres.url("mlflow", "postgresql+psycopg2"),
            artifacts_destination=f"s3://{bucket}/{prefix}",
            log_path=root / "mlflow.log",
            env=mlflow_env,
            timeout=180,
        )

    def start_prefect():
        return processes.start_prefect(
            host="127.0.0.1",
            port=processes.free_port(),
            prefect_home=root / "prefect-home",
            log_path=root / "prefect.log",
            database_url=postgres.url("prefect", "postgresql+asyncpg"),
            timeout=180,
        )

    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_mlflow), pool.submit(start_prefect)]
        servers, errors = [], []
        for fut in futures:
            try:
                servers.append(fut.result())
            except Exception as exc:  # stop whichever did start, then report
                errors.append(exc)
    if errors:
        for server in servers:
            server.stop()
        raise errors[0]
    mlflow_server, prefect_server = servers
    stack = PostgresStack(postgres, mlflow_server, prefect_server, bucket, prefix, s3_server, time.monotonic() - t0)
    try:
        yield stack
    finally:
        with ThreadPoolExecutor(2) as pool:  # each stop may wait several seconds for a graceful exit
            list(pool.map(lambda server: server.stop(), (prefect_server, mlflow_server)))


@pytest.fixture
def on_pg_stack(pg_stack, monkeypatch):
    """Point this test's MLflow and Prefect clients at the PostgreSQL stack; restore everything afterwards.

    Prefect reads PREFECT_API_URL once, when it is imported, so the variable alone does not redirect this
    process: the test runs inside `temporary_settings`. Prefect's events worker is one per process whatever the
    API URL (its cache key holds no URL), so it is drained before and after: this test's events (task-run states
    among them) reach this server, and later tests' do not. MLflow's global tracking URI is restored as well.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flywheel.core.settings import get_settings

    previous_uri = tracking_utils._tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pg_stack.mlflow.url)
    monkeypatch.setenv("PREFECT_API_URL", pg_stack.prefect_api_url)
    mlflow.set_tracking_uri(pg_stack.mlflow.url)
    get_settings.cache_clear()
    EventsWorker.drain_all(timeout=15, at_exit=False)
    try:
        with temporary_settings(updates={PREFECT_API_URL: pg_stack.prefect_api_url}):
            yield pg_stack
            EventsWorker.drain_all(timeout=15, at_exit=False)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        get_settings.cache_clear()


@pytest.fixture(scope="session")
def upload_flights():
    """A function that puts the demo flights of some months as one Parquet object into a fresh bucket."""

    def upload(s3_endpoint: str, bucket: str, key: str, months: tuple[int, ...] = (1, 2)) -> int:
        import boto3

        from flywheel.tasks.data import load_flights

        flights = load_flights()
        frame = flights.loc[flights["month"].isin(months)]
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=key, Body=frame.to_parquet(index=False))
        return len(frame)

    return upload


@pytest.fixture(scope="session")
def trained_champion(mlflow_server, prefect_server, tmp_path_factory):
    """A champion trained once for the session by the real `train` flow on January–February flights (its model
    version, on the session's MLflow and Prefect servers). Tests take their own copy (`champion_copy`)."""
    import uuid

    import mlflow
    from mlflow import MlflowClient

    from flywheel.core.settings import get_settings
    from flywheel.flows.train import train

    name = f"session-champion-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        mp.setenv("FLYWHEEL_STATE_DIR", str(tmp_path_factory.mktemp("session-train") / "state"))
        mlflow.set_tracking_uri(mlflow_server.url)
        get_settings.cache_clear()
        try:
            result = train(start="2013-01-01", end="2013-03-01", model_name=name)
        finally:
            get_settings.cache_clear()
    assert result["promoted"], result
    return MlflowClient(mlflow_server.url).get_model_version_by_alias(name, "champion")


@pytest.fixture
def champion_copy(trained_champion):
    """`copy(client, name) -> version`: a new version of `name` that is the session's trained champion (same run,
    artifacts and lineage tags, registered-model tags except verdicts and cooldowns), made its champion. Cheap, and
    each test's verdicts, cooldowns and events stay its own."""
    base = trained_champion

    def copy(client, name: str) -> str:
        from mlflow.exceptions import MlflowException

        tags = {k: v for k, v in client.get_registered_model(base.name).tags.items() if not k.startswith("last_")}
        try:
            client.create_registered_model(name, tags=tags)
        except MlflowException:
            pass  # it exists: another version of it
        mv = client.create_model_version(name, source=base.source, run_id=base.run_id, tags=base.tags,
                                         model_id=base.source.rsplit("/", 1)[-1])  # fmt: skip
        client.set_registered_model_alias(name, "champion", mv.version)
        return mv.version

    return copy
