"""`python -m flywheel.bridge --host H --port P [--state-dir D] [--log-level L]`: serve the bridge with uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from flywheel.bridge.app import create_bridge_app
from flywheel.bridge.emit import Emit, prefect_emit
from flywheel.bridge.secrets import load_or_create_secret
from flywheel.bridge.webhooks import WEBHOOK_PATH

logger = logging.getLogger("flywheel.bridge")

MAX_CONNECTIONS = 256  # beyond this many open connections a delivery is answered 503 (MLflow retries it)


def run_bridge(
    host: str,
    port: int,
    secret: str | None,
    state_dir: Path,
    emit: Emit = prefect_emit,
    log_level: str = "info",
    tracking_uri: str | None = None,
) -> None:
    """Serve the bridge with uvicorn until interrupted; deliveries are checked against the MLflow registry at
    `tracking_uri` (default MLFLOW_TRACKING_URI)."""
    import uvicorn

    from flywheel.bridge.refusals import RegistryCheck
    from flywheel.core.http_server import uvicorn_limits

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    registry = RegistryCheck(tracking_uri) if tracking_uri else None
    if registry is None or not registry.enabled:
        logger.warning("no MLflow server to check deliveries against (MLFLOW_TRACKING_URI %s): names are checked, "
                       "existence is not", "unset" if not tracking_uri else "is not http(s)")  # fmt: skip
    app = create_bridge_app(secret, Path(state_dir), emit=emit, registry=registry)
    if emit is prefect_emit and not os.environ.get("PREFECT_API_URL"):
        logger.warning("PREFECT_API_URL is not set: every delivery will be answered 503 until it is")
    logger.info("bridge listening on http://%s:%s%s", host, port, WEBHOOK_PATH)
    # Connection limit and the header/body deadlines uvicorn lacks (flywheel.core.http_server).
    limits = uvicorn_limits(
        max_connections=MAX_CONNECTIONS,
        error_body=lambda code, message: json.dumps({"status": "error", "error": message}).encode(),
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, **limits)


def main(argv: list[str] | None = None) -> None:
    from flywheel.core.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m flywheel.bridge", description="MLflow webhook → Prefect event bridge."
    )
    parser.add_argument("--host", default=settings.host, help="bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=settings.bridge_port, help="port (default %(default)s)")
    parser.add_argument("--state-dir", type=Path, default=None, help="state dir (default FLYWHEEL_STATE_DIR)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = (args.state_dir or settings.state_path).expanduser().resolve()
    explicit = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    # The state dir's secret is always created: it is what `ensure_webhook` registers in the embedded stack.
    file_secret = load_or_create_secret(state_dir)
    run_bridge(args.host, args.port, explicit or file_secret, state_dir, log_level=args.log_level)


if __name__ == "__main__":
    main()
