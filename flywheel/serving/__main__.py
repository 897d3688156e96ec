"""`python -m flywheel.serving --model NAME --port P [--initial-alias champion]`: the model server on uvicorn.

Tokens come from `FLYWHEEL_ADMIN_TOKEN` / `FLYWHEEL_SERVING_TOKEN` (or the state directory), never from the command
line; the MLflow registry from `--tracking-uri` or `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from flywheel.serving.server import DEFAULT_MAX_BODY_BYTES

KEEP_ALIVE_SECONDS = 30  # an idle kept-alive client connection is closed after this


def run(
    host: str = "127.0.0.1",
    port: int = 5080,
    *,
    log_level: str = "warning",
    access_log: bool = False,
    server: Any = None,
    **server_kwargs: Any,
) -> None:
    """Serve `create_app(server)` — by default `ModelServer(**server_kwargs)` — with uvicorn in this process until
    interrupted (SIGINT/SIGTERM flush the request log)."""
    # One OpenMP thread for scikit-learn's pyfunc path unless the caller chose (read when OpenMP first starts, so
    # it holds for a model loaded later): on shared cores its spinning threads took p99 from 10 to 500 ms.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import uvicorn

    from flywheel.core.http_server import uvicorn_limits
    from flywheel.serving.app import create_app
    from flywheel.serving.errors import _error_body
    from flywheel.serving.server import ModelServer

    if server is None:
        server_kwargs.setdefault("freeze_gc", True)
        server = ModelServer(**server_kwargs)
    app = create_app(server)
    # Connection limit, keep-alive, and the header/body deadlines uvicorn lacks (flywheel.core.http_server).
    limits = uvicorn_limits(keep_alive_seconds=KEEP_ALIVE_SECONDS, error_body=_error_body)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on", **limits)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flywheel.serving",
        description="Serve one registered MLflow model with blue/green slots. Tokens come from FLYWHEEL_ADMIN_TOKEN "
        "and FLYWHEEL_SERVING_TOKEN (or the state directory), never from the command line.",
    )
    p.add_argument("--model", help="registered model name (default: FLYWHEEL_MODEL_NAME)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default FLYWHEEL_SERVING_PORT)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default MLFLOW_TRACKING_URI)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--initial-version", default=None, help="version to load at start")
    group.add_argument(
        "--initial-alias",
        default=None,
        help="alias to load at start (retried while the registry is unreachable; none if it does not exist)",
    )
    p.add_argument("--role", default="production", help="label for this server (production, staging)")
    p.add_argument("--request-log-dir", default=None, help="where scored rows are written as Parquet (a path or s3://)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--no-batching", action="store_true", help="score every request on its own")
    p.add_argument(
        "--no-compiled", action="store_true",
        help="serve every version through pyfunc, even one compiled when packaged (as FLYWHEEL_COMPILE_MODELS=false)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    from flywheel.core.settings import get_settings

    args = _parser().parse_args(argv)
    s = get_settings()
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise SystemExit("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(
        host=args.host or s.host,
        port=args.port or s.serving_port,
        log_level="warning" if args.log_level.lower() in ("info", "debug") and not args.access_log else args.log_level,
        access_log=args.access_log,
        model_name=args.model or s.model_name,
        tracking_uri=tracking_uri,
        admin_token=s.secret("admin_token"),
        scoring_token=s.secret("serving_token"),
        request_log_dir=args.request_log_dir,
        max_body_bytes=args.max_body_bytes,
        initial_version=args.initial_version,
        initial_alias=args.initial_alias,
        role=args.role,
        batching=not args.no_batching,
        compiled=s.compile_models and not args.no_compiled,
    )


if __name__ == "__main__":
    main()
