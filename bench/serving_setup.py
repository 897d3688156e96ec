"""Serving's set-up: the models registered (and compiled, as deploy-model's packaging does) in a bench MLflow
server, and both model servers started on the champion: Flywheel's with request logging on, `mlflow models serve`.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import env_vars, server_env, stopwatch
from bench.fixtures import flights, start_mlflow
from bench.serving_load import RowFeed


@dataclass
class Sizes:
    train_rows: int
    seconds: float  # per phase and server, split over `rounds`
    rounds: int
    clients: tuple[int, ...]
    batches: int
    inproc_rows: int

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(train_rows=5_000, seconds=3.0, rounds=2, clients=(8, 32), batches=3, inproc_rows=300)
        return cls(train_rows=20_000, seconds=9.0, rounds=3, clients=(8, 32), batches=6, inproc_rows=1_000)


@dataclass
class Served:
    model_name: str
    tracking_uri: str
    feed: RowFeed
    servers: dict[str, Any] = field(default_factory=dict)  # label → ManagedProcess
    start_seconds: dict[str, float] = field(default_factory=dict)
    mlflow_start: float = 0.0
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    verdicts: list[tuple[str, str, dict]] = field(default_factory=list)  # (version, what it is, compiled.json)
    champion: str = "1"
    champion_kind: str = ""

    def url(self, label: str) -> str:
        return self.servers[label].url


def _log(model: Any, example: Any, holdout: Any, signature: Any, model_name: str, root: Path) -> str:
    import mlflow

    from flywheel.tasks import registry

    with mlflow.start_run() as run:
        path = root / "holdout_sample.parquet"
        holdout.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(registry.HOLDOUT_ARTIFACT).parent))
        info = mlflow.sklearn.log_model(
            model, name="model", signature=signature, input_example=example.head(3),
            pip_requirements=registry.pip_requirements(), serialization_format="cloudpickle",
        )  # fmt: skip
    logged = registry.LoggedCandidate(run.info.run_id, info.model_uri, getattr(info, "model_id", None))
    return str(registry.register_version(registry.client(), model_name, logged, {"bench": "serving"}).version)


def _log_distance(X: Any) -> Any:
    """A first step that is no plain cast: skl2onnx converts no FunctionTransformer with a function."""
    import numpy as np

    return X.assign(distance=np.log1p(X["distance"]))


def register_models(model_name: str, train_rows: int, root: Path) -> tuple[Any, list[tuple[str, str]], str]:
    """Register the champion (the first version) and three others: (held-out pool, [(version, what it is)], what
    the champion is)."""
    from mlflow.models import infer_signature
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from flywheel.core.spec import load_spec
    from flywheel.tasks import model_specs, registry, training

    spec = load_spec()
    df = flights()
    jan = df.loc[df["month"] == 1].sample(n=train_rows, random_state=42)
    parts = training.split_dataset(jan, spec, seed=42)
    model = training.train_model(parts, spec, model_specs.default_model_spec("binary"), 42)
    X = parts.X_test

    def sig(m: Any, frame: Any) -> Any:
        return infer_signature(frame.head(200), m.predict(frame.head(200)))

    # The champion: the pipeline the issue measured (one-hot of the categories + HistGradientBoosting), the fastest
    # pyfunc has, so the ratios are the least flattering ones. The train flow's logged form (its raw-input step
    # first, when it has one) is compiled and parity-checked beside it.
    versions = [(_log(model, X, X, sig(model, X), model_name, root), "one-hot + HistGradientBoosting")]
    kind = versions[0][1]
    if hasattr(training, "servable_model") and hasattr(registry, "raw_rows_signature"):
        logged = training.servable_model(model, jan, spec)
        raw = jan[spec.features]
        versions.append((_log(logged, raw, X, registry.raw_rows_signature(sig(logged, raw)), model_name, root),
                         "the same as the train flow logs it (raw-input step first)"))  # fmt: skip
    logistic = training.train_model(parts, spec, model_specs.ModelSpec(name="lr", estimator="logistic_regression",
                                                                    params={"max_iter": 500}), 42)  # fmt: skip
    versions.append((_log(logistic, X, X, sig(logistic, X), model_name, root), "one-hot + logistic regression"))
    steps = clone(model).steps  # unfitted copies: the champion object stays as it is
    refused = Pipeline([("log", FunctionTransformer(_log_distance)), *steps]).fit(parts.X_train, parts.y_train)
    versions.append((_log(refused, X, X, sig(refused, X), model_name, root), "a FunctionTransformer first"))
    held_out = df.loc[df["month"] != 1]
    pool = training.feature_frame(held_out, spec).dropna().sample(frac=1.0, random_state=7).reset_index(drop=True)
    return pool, versions, kind


def wait_ready(mp: Any, path: str, timeout: float = 180.0) -> None:
    from flywheel.stack.processes import ServerStartError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not mp.alive():
            raise ServerStartError(f"{mp.name} exited with code {mp.proc.returncode}:\n{mp.log_tail()}")
        try:
            if httpx.get(mp.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerStartError(f"{mp.name} not ready at {mp.url}{path} after {timeout:.0f}s:\n{mp.log_tail()}")


def start_flywheel_server(served: Served, root: Path) -> None:
    from flywheel.stack import processes

    port = processes.free_port()
    cmd = [
        sys.executable, "-m", "flywheel.serving", "--model", served.model_name, "--host", "127.0.0.1",
        "--port", str(port), "--tracking-uri", served.tracking_uri, "--initial-version", served.champion,
        "--request-log-dir", str(root / "request-log"), "--log-level", "warning",
    ]  # fmt: skip
    with stopwatch() as t:
        mp = processes.spawn("flywheel", cmd, url=f"http://127.0.0.1:{port}", log_path=root / "flywheel.log",
                             health_path="/health",
                             env={"MLFLOW_TRACKING_URI": served.tracking_uri, **server_env()})  # fmt: skip
        served.servers["flywheel"] = mp
        wait_ready(mp, "/ping")
    served.start_seconds["flywheel"] = t["seconds"]


def start_mlflow_serve(served: Served, root: Path) -> None:
    from flywheel.stack import processes

    port = processes.free_port()
    cmd = [
        processes.bin_path("mlflow"), "models", "serve", "-m", f"models:/{served.model_name}/{served.champion}",
        "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "--workers", "1",
    ]  # fmt: skip
    # It execs `uvicorn` through bash: the environment's bin directory must be on PATH.
    env = {
        "MLFLOW_TRACKING_URI": served.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **server_env(),
    }
    with stopwatch() as t:
        mp = processes.spawn("mlflow-serve", cmd, url=f"http://127.0.0.1:{port}", log_path=root / "mlflow-serve.log",
                             health_path="/ping", env=env)  # fmt: skip
        served.servers["mlflow serve"] = mp
        wait_ready(mp, "/ping")
    served.start_seconds["mlflow serve"] = t["seconds"]


@contextmanager
def served_model(root: Path, quick: bool) -> Iterator[Served]:
    """An MLflow server with the registered (and compiled) versions, and both model servers serving the champion."""
    sizes = Sizes.for_mode(quick)
    mlflow_server, mlflow_start = start_mlflow(root / "mlflow")
    served = None
    try:
        with env_vars(MLFLOW_TRACKING_URI=mlflow_server.url):
            import mlflow

            from flywheel.tasks import compiling, registry
            from flywheel.tasks.packaging import compile_for_serving

            mlflow.set_tracking_uri(mlflow_server.url)
            mlflow.set_experiment("bench-serving")
            name = f"bench-serving-{uuid.uuid4().hex[:8]}"
            root.mkdir(parents=True, exist_ok=True)
            with stopwatch() as t:
                pool, versions, kind = register_models(name, sizes.train_rows, root)
            served = Served(name, mlflow_server.url, RowFeed(pool), mlflow_start=mlflow_start,
                            train_seconds=t["seconds"], champion=versions[0][0], champion_kind=kind)  # fmt: skip
            client = registry.client()
            registry.set_alias(client, name, registry.CHAMPION, served.champion)
            with stopwatch() as t:
                for version, what in versions:
                    compile_for_serving(name, version, enabled=True)  # what deploy-model's packaging does
                    mv = client.get_model_version(name, version)
                    served.verdicts.append((version, what, compiling.read_meta(client, mv.run_id) or {}))
            served.compile_seconds = t["seconds"]
            start_mlflow_serve(served, root)
            start_flywheel_server(served, root)
            yield served
    finally:
        if served is not None:
            for mp in served.servers.values():
                mp.stop()
        mlflow_server.stop()
