"""prefect.yaml, generated from the one declaration of the deployments (deployments/definitions.py).

    python -m flywheel.deployments.render > prefect.yaml

The committed file is rendered with the Settings defaults, so it is the same on every machine; a unit test
(tests/unit/test_deployments_declared_once.py) fails when it differs from what this renders.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from flywheel.core.settings import Settings
from flywheel.deployments.definitions import DEPLOYMENTS, WORK_POOL, WORK_QUEUE, Deployment

PREFECT_VERSION = "3.8.8"  # the lower bound of prefect in pyproject.toml

HEADER = """\
# GENERATED from deployments/definitions.py, the one declaration of Flywheel's deployments; do not edit by hand:
#
#   python -m flywheel.deployments.render > prefect.yaml
#
# (tests/unit/test_deployments_declared_once.py fails when this file is stale). Schedules are the defaults of
# FLYWHEEL_TRAIN_CRON, FLYWHEEL_DRIFT_CRON and FLYWHEEL_RECONCILE_SECONDS (flywheel/core/settings.py).
#
# Flywheel's deployments for Prefect work pools (the scale-out path). The embedded default serves the same
# deployments from one process instead (flywheel/deployments: `python -m flywheel.deployments.serve`).
#
#   prefect work-pool create flywheel --type process      # or: --type docker / --type kubernetes
#   prefect --no-prompt deploy --all                      # idempotent
#   prefect worker start --pool flywheel
#
# The worker's environment needs MLFLOW_TRACKING_URI, PREFECT_API_URL and the FLYWHEEL_* settings (see
# infra/.env.example). Flows import the installed `flywheel` package, so no pull step is needed on a process
# worker started from this repository; the docker pool runs the project's image (infra/Dockerfile).
"""


class _Dumper(yaml.SafeDumper):
    """Indented block sequences, double quotes where a scalar needs quoting, and the shared work pool as `&pool`."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def choose_scalar_style(self) -> str:
        style = super().choose_scalar_style()
        return '"' if style == "'" else style

    def generate_anchor(self, node: yaml.Node) -> str:
        return "pool"  # the work pool is the only node used more than once


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _entry(d: Deployment, settings: Settings, pool: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": d.name, "entrypoint": d.entrypoint, "description": d.description}
    schedule = d.schedule(settings)
    if schedule:
        entry["schedules"] = [{k: _number(v) if k == "interval" else v for k, v in schedule.items()}]
    if d.trigger:
        t = d.trigger
        match = {"prefect.resource.id": t.resource}
        entry["triggers"] = [
            {"type": "event", "name": t.name, "enabled": True, "expect": [t.event], "match": match,
             "parameters": dict(t.parameters)}
        ]  # fmt: skip
    if d.parameters:
        entry["parameters"] = dict(d.parameters)
    if d.concurrency_limit is not None:
        entry["concurrency_limit"] = d.concurrency_limit
    entry["work_pool"] = pool
    return entry


def prefect_yaml(settings: Settings | None = None) -> str:
    """The text of prefect.yaml for `settings` (default: the Settings defaults, not this environment)."""
    settings = settings or Settings.model_construct()
    pool = {"name": WORK_POOL, "work_queue_name": WORK_QUEUE}
    doc = {
        "name": "flywheel",
        "prefect-version": PREFECT_VERSION,
        "definitions": {"work_pool": pool},
        "deployments": [_entry(d, settings, pool) for d in DEPLOYMENTS],
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    # Blank lines between the top-level sections and between deployments, for a reader.
    body = body.replace("\ndefinitions:", "\n\ndefinitions:").replace("\ndeployments:", "\n\ndeployments:")
    body = body.replace("\n  - name: ", "\n\n  - name: ").replace("deployments:\n\n", "deployments:\n")
    return HEADER + body


def main() -> None:
    sys.stdout.write(prefect_yaml())


if __name__ == "__main__":
    main()
