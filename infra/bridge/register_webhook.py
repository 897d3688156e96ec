"""Register the bridge with the MLflow server (one-shot job of the scale-out stack).

The embedded stack does this in `flywheel up` (flywheel/stack/launch.py); in infra/ the bridge runs in its own
container, so this job calls the same `ensure_webhook` — idempotent: one ACTIVE webhook named `flywheel-bridge`,
updated in place when the URL or the secret changed. The secret is FLYWHEEL_WEBHOOK_SECRET, the one the bridge
verifies with.

    MLFLOW_TRACKING_URI=http://mlflow:5000 FLYWHEEL_BRIDGE_URL=http://bridge:5055 \
    FLYWHEEL_WEBHOOK_SECRET=... python infra/bridge/register_webhook.py
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    from flywheel.bridge.webhooks import WEBHOOK_PATH, ensure_webhook
    from flywheel.tasks import registry

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    bridge_url = os.environ.get("FLYWHEEL_BRIDGE_URL")
    secret = os.environ.get("FLYWHEEL_WEBHOOK_SECRET")
    missing = [n for n, v in (("MLFLOW_TRACKING_URI", tracking_uri), ("FLYWHEEL_BRIDGE_URL", bridge_url),
                              ("FLYWHEEL_WEBHOOK_SECRET", secret)) if not v]  # fmt: skip
    if missing:
        print(f"register_webhook: {', '.join(missing)} must be set", file=sys.stderr)
        return 2
    deadline = time.monotonic() + float(os.environ.get("FLYWHEEL_REGISTER_TIMEOUT_SECONDS", "120"))
    while True:
        try:
            hook = ensure_webhook(registry.client(tracking_uri), bridge_url.rstrip("/") + WEBHOOK_PATH, secret)
        except Exception as exc:  # noqa: BLE001 - the server may still be migrating its database
            if time.monotonic() > deadline:
                print(
                    f"register_webhook: MLflow did not accept the webhook: {type(exc).__name__}: {exc}", file=sys.stderr
                )
                return 1
            time.sleep(3)
            continue
        print(f"webhook {hook.name} → {hook.url} ({hook.status})")
        return 0


if __name__ == "__main__":
    sys.exit(main())
