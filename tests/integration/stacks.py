"""Helpers shared by the integration tests (not a test module): a whole `flywheel up` stack, one model server
process, waiting for a condition, traffic, the deployment ledger, stopping a child process a test started."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PORTS = ("MLFLOW", "PREFECT", "SERVING", "STAGING", "BRIDGE")
UNSET = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "FLYWHEEL_SERVING_TOKEN", "FLYWHEEL_ADMIN_TOKEN",
         "FLYWHEEL_WEBHOOK_SECRET")  # fmt: skip


def wait_for(what: str, check, timeout: float = 120.0, interval: float = 0.5):
    """`check()`'s first truthy result; HTTP, value and key errors count as "not yet"."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def prefect_api(urls, method: str, path: str, **kwargs):
    """A call to the stack's Prefect REST API, JSON back. Like Prefect's own client (PREFECT_CLIENT_MAX_RETRIES),
    it retries 429, 502 and 503 — a busy SQLite-backed server answers 503 for a moment — with a growing pause. The
    read timeout is past Prefect's SQLite busy timeout (60 s): a request queued behind a locked database waits
    that long, then is answered."""
    for attempt in range(6):
        resp = httpx.request(method, urls["prefect_api_url"] + path, timeout=httpx.Timeout(90, connect=10), **kwargs)
        if resp.status_code not in (429, 502, 503) or attempt == 5:
            break
        time.sleep(min(2**attempt, 10))
    resp.raise_for_status()
    return resp.json()


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a child the test started; SIGKILL when it has not exited after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def running_stack(state: Path, model: str, **extra_env: str) -> Iterator[tuple]:
    """A `flywheel up` stack (MLflow, Prefect, production + staging model servers, bridge, `serve`) on free ports
    with a private state dir; the tests run the reconciler themselves. Yields (stack, urls, env for CLIs)."""
    from flywheel.core.settings import get_settings
    from flywheel.stack import processes
    from flywheel.stack.supervisor import Stack

    env = {
        "FLYWHEEL_STATE_DIR": str(state),
        "FLYWHEEL_MODEL_NAME": model,
        "FLYWHEEL_DEPLOY_WATCH_SECONDS": "3",
        "FLYWHEEL_RECONCILE_SECONDS": "3600",
        **{f"FLYWHEEL_{p}_PORT": str(processes.free_port()) for p in PORTS},
        **extra_env,
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in UNSET:
            mp.delenv(key, raising=False)
        get_settings.cache_clear()
        st = Stack(get_settings())
        urls = st.start()
        try:
            yield (
                st,
                urls,
                {**env, "PREFECT_API_URL": urls["prefect_api_url"], "MLFLOW_TRACKING_URI": urls["mlflow_url"]},
            )
        finally:
            st.stop()
            get_settings.cache_clear()


def run_cli(args: list[str], env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """A CLI (`flywheel`, `prefect`) run against a stack: `env` over this process' environment; a non-zero exit
    fails the test with the command's output unless `check` is False."""
    proc = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def copy_version(client, base, name: str | None = None) -> str:
    """Another version of `base`'s trained model (same run and artifacts, so it carries the smoke test's held-out
    sample) registered as the next version of `name` (default: `base`'s own model); cheap to deploy."""
    from flywheel.tasks import registry

    name = name or base.name
    registry.ensure_registered_model(client, name)
    mv = client.create_model_version(name, source=base.source, run_id=base.run_id,
                                     tags={"copy_of": f"{base.name}/{base.version}"},
                                     model_id=base.source.rsplit("/", 1)[-1])  # fmt: skip
    return mv.version


def start_model_server(mlflow_url: str, model: str, version: str, tmp: Path, *, admin_token: str, compiled: bool):
    """The real model server (`python -m flywheel.serving`) on a free port serving `version` of `model`, with its
    compiled model or through pyfunc; its log, request log and state in `tmp`. Returned once it answers /ping."""
    import sys

    from flywheel.stack import processes

    port = processes.free_port()
    cmd = [sys.executable, "-m", "flywheel.serving", "--model", model, "--port", str(port), "--host", "127.0.0.1",
           "--tracking-uri", mlflow_url, "--initial-version", version, "--log-level", "warning",
           "--request-log-dir", str(tmp / f"log-{port}")]  # fmt: skip
    env = {"FLYWHEEL_ADMIN_TOKEN": admin_token, "FLYWHEEL_COMPILE_MODELS": "true" if compiled else "false",
           "FLYWHEEL_STATE_DIR": str(tmp / "state"), "MLFLOW_TRACKING_URI": mlflow_url}  # fmt: skip
    mp = processes.spawn(f"model-server-{port}", cmd, url=f"http://127.0.0.1:{port}", log_path=tmp / f"{port}.log",
                         health_path="/ping", env=env)  # fmt: skip
    return processes.wait_healthy(mp, timeout=180)


def ledger_rows(urls, model: str) -> list[dict]:
    """The deployment table artifact of `model` (`deployments-<model>`), as a Prefect UI user sees it (newest
    first)."""
    import json

    resp = httpx.post(
        urls["prefect_api_url"] + "/artifacts/latest/filter",
        json={"artifacts": {"key": {"any_": [f"deployments-{model}"]}}, "limit": 1},
        timeout=10,
    )
    resp.raise_for_status()
    found = resp.json()
    if not found:
        return []
    data = found[0]["data"]
    return json.loads(data) if isinstance(data, str) else data


def registry_client(urls):
    """An MlflowClient on the stack's MLflow server (tracking and registry)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=urls["mlflow_url"], registry_uri=urls["mlflow_url"])


def train_first_champion(stack, client, model: str, timeout: float = 180):
    """`flywheel train` on two weeks of flights against the stack; its champion (the version the registry says),
    once the model server answers with it."""
    import sys
    from pathlib import Path

    _, urls, env = stack
    flywheel = str(Path(sys.executable).parent / "flywheel")
    run_cli([flywheel, "train", "--start", "2013-01-01", "--end", "2013-01-15"], env, timeout=600)
    first = client.get_model_version_by_alias(model, "champion")
    wait_for(f"v{first.version} to serve", lambda: served_version(urls) == first.version, timeout=timeout)
    # The training set more than one alias (challenger, then champion) and each move starts a deploy-model run; a
    # run Prefect's automation starts late must not land in the next test's window, so wait for one finished run
    # per alias the version holds.
    aliases = set(client.get_model_version(model, first.version).aliases)

    def deployed():
        body = {"flows": {"name": {"any_": ["deploy-model"]}}, "limit": 200}
        runs = [r for r in prefect_api(urls, "POST", "/flow_runs/filter", json=body)
                if r["parameters"].get("name") == model and str(r["parameters"].get("version")) == first.version
                and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]  # fmt: skip
        return aliases <= {r["parameters"].get("alias") for r in runs}

    wait_for(f"a finished deploy-model run of v{first.version} for each of {sorted(aliases)}", deployed,
             timeout=timeout)
    return first


def stack_fixtures(model: str, state_name: str, **extra_env: str) -> tuple:
    """Module-scoped fixtures `(stack, client, trained)` for a test module on one `flywheel up` stack (the
    `running_stack` for `model`, `extra_env` its settings), its registry client, and its first champion trained by
    `flywheel train` (`train_first_champion`). In the module: `stack, client, trained = stack_fixtures(...)`."""

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory):
        with running_stack(tmp_path_factory.mktemp(state_name), model, **extra_env) as started:
            yield started

    @pytest.fixture(scope="module")
    def client(stack):
        return registry_client(stack[1])

    @pytest.fixture(scope="module")
    def trained(stack, client):
        return train_first_champion(stack, client, model)

    return stack, client, trained


def served_version(urls) -> str | None:
    """The version the stack's production model server answers with (its /version)."""
    return httpx.get(urls["model_url"] + "/version", timeout=5).json()["model_version"]


class Receiver:
    """A loopback HTTP receiver recording every JSON POST (`with Receiver() as r:`; `r.url`, `r.got`): what an alert
    webhook or an MLflow webhook sends, as the other end sees it."""

    def __init__(self) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        got: list[dict] = []
        self.got = got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                got.append({"content_type": self.headers.get("Content-Type"), "headers": dict(self.headers),
                            "json": json.loads(body or b"null")})  # fmt: skip
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, name="receiver", daemon=True)

    def texts(self) -> list[str]:
        return [(m["json"] or {}).get("text", "") if isinstance(m["json"], dict) else "" for m in list(self.got)]

    def wait_text(self, needle: str, timeout: float = 120.0) -> dict:
        """The first message whose `text` contains `needle`."""
        return wait_for(f"a message containing {needle!r} (got {self.texts()})",
                        lambda: next((m for m in list(self.got) if needle in (m["json"] or {}).get("text", "")), None),
                        timeout=timeout)  # fmt: skip

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class Traffic:
    """A client sending one-row scoring requests in a thread (`with Traffic(url, records) as t:`) for as long as
    the block runs; what each request got: `statuses` and the serving `versions` (X-Flywheel-Model-Version)."""

    def __init__(self, url: str, records: list[dict], pause: float = 0.02) -> None:
        self.url, self.records, self.pause = url, records, pause
        self.statuses: list[int] = []
        self.versions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            i = 0
            while not self._stop.is_set():
                r = http.post(
                    self.url + "/invocations", json={"dataframe_records": [self.records[i % len(self.records)]]}
                )
                self.statuses.append(r.status_code)
                self.versions.append(r.headers.get("X-Flywheel-Model-Version", "?"))
                i += 1
                time.sleep(self.pause)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
