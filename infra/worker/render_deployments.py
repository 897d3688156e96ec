"""Point Flywheel's deployments (prefect.yaml) at one work pool, with the job variables that pool type needs.

prefect.yaml names the work pool `flywheel` (a process pool). A worker started for another pool — the docker or
kubernetes variant of infra/ — renders a copy of it where every deployment uses that pool, then runs
`prefect --no-prompt deploy --all --prefect-file <copy>` from the repository root (the flows' entrypoints are
paths relative to it). `prefect deploy --all` ignores `--pool` for multiple deployments, hence this copy.

    python infra/worker/render_deployments.py deployments --source prefect.yaml --out /tmp/prefect.yaml
    python infra/worker/render_deployments.py base-job-template --in default.json --out pool.json

Everything comes from the worker's environment (infra/.env.example, infra/k8s/configmap.yaml):

| variable                     | used for                                                                        |
|------------------------------|---------------------------------------------------------------------------------|
| FLYWHEEL_WORK_POOL           | pool name (default `flywheel`)                                                  |
| FLYWHEEL_WORK_POOL_TYPE      | process, docker or kubernetes (default process)                                 |
| FLYWHEEL_IMAGE               | image of the flow-run containers / pods (docker, kubernetes)                    |
| FLYWHEEL_JOB_ENV             | comma-separated names of worker variables copied to flow runs (never secrets)   |
| FLYWHEEL_DOCKER_NETWORK      | docker network the flow-run containers join (default `flywheel`)                |
| FLYWHEEL_STATE_VOLUME        | docker volume mounted at FLYWHEEL_STATE_DIR in flow-run containers              |
| FLYWHEEL_K8S_NAMESPACE       | namespace of the flow-run Jobs (default `flywheel`)                             |
| FLYWHEEL_K8S_SERVICE_ACCOUNT | service account of the flow-run pods (default `flywheel-flow-run`)              |
| FLYWHEEL_K8S_CONFIGMAP       | ConfigMap every flow-run pod gets as envFrom (default `flywheel-config`)        |
| FLYWHEEL_K8S_SECRET          | Secret every flow-run pod gets as envFrom (default `flywheel-secrets`)          |
| FLYWHEEL_K8S_STATE_PVC       | PersistentVolumeClaim mounted at FLYWHEEL_STATE_DIR in flow-run pods (optional) |

Secrets never go into job variables (Prefect stores those in its database and shows them in its UI): a docker
flow run reads the admin token from the shared state volume (the worker writes it there, mode 0600), a kubernetes
flow run gets the Secret through `envFrom` in the pool's base job template.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

POOL_TYPES = ("process", "docker", "kubernetes")
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|_KEY$|ACCESS_KEY)", re.IGNORECASE)


class RenderError(ValueError):
    """The environment does not describe a usable work pool."""


def _job_env(env: Mapping[str, str]) -> dict[str, str]:
    names = [n.strip() for n in env.get("FLYWHEEL_JOB_ENV", "").split(",") if n.strip()]
    secret = [n for n in names if SECRET_NAME.search(n)]
    if secret:
        raise RenderError(f"FLYWHEEL_JOB_ENV names secrets ({', '.join(secret)}): job variables are not secret storage")
    return {n: env[n] for n in names if env.get(n)}


def job_variables(pool_type: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Job variables every deployment gets on a pool of `pool_type` (none for a process pool)."""
    if pool_type not in POOL_TYPES:
        raise RenderError(f"unknown work pool type {pool_type!r}: use one of {', '.join(POOL_TYPES)}")
    if pool_type == "process":
        return {}
    image = env.get("FLYWHEEL_IMAGE")
    if not image:
        raise RenderError(f"FLYWHEEL_IMAGE must name the flow-run image for a {pool_type} pool")
    variables: dict[str, Any] = {
        "image": image,
        "image_pull_policy": env.get("FLYWHEEL_IMAGE_PULL_POLICY", "IfNotPresent"),
    }
    job_env = _job_env(env)
    if job_env:
        variables["env"] = job_env
    if pool_type == "docker":
        state_dir = env.get("FLYWHEEL_STATE_DIR", "/state")
        variables["networks"] = [env.get("FLYWHEEL_DOCKER_NETWORK", "flywheel")]
        variables["volumes"] = [f"{env.get('FLYWHEEL_STATE_VOLUME', 'flywheel-state')}:{state_dir}"]
        variables["auto_remove"] = True
    else:
        variables["namespace"] = env.get("FLYWHEEL_K8S_NAMESPACE", "flywheel")
        variables["service_account_name"] = env.get("FLYWHEEL_K8S_SERVICE_ACCOUNT", "flywheel-flow-run")
        variables["finished_job_ttl"] = int(env.get("FLYWHEEL_K8S_FINISHED_JOB_TTL", "3600"))
    return variables


def render_deployments(source: Mapping[str, Any], pool: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the parsed prefect.yaml whose every deployment runs on `pool` with `variables`."""
    if not pool:
        raise RenderError("the work pool name is empty")
    rendered = copy.deepcopy(dict(source))
    deployments = rendered.get("deployments") or []
    if not deployments:
        raise RenderError("prefect.yaml declares no deployments")
    for deployment in deployments:
        old = deployment.get("work_pool") or {}
        new: dict[str, Any] = {"name": pool, "work_queue_name": old.get("work_queue_name") or "default"}
        if variables:
            new["job_variables"] = copy.deepcopy(dict(variables))
        deployment["work_pool"] = new
    rendered.pop("definitions", None)  # its anchors are resolved already
    return rendered


def patch_base_job_template(
    template: Mapping[str, Any], configmap: str, secret: str, state_pvc: str | None = None, state_dir: str = "/state"
) -> dict[str, Any]:
    """The kubernetes pool's default base job template with the ConfigMap and the Secret as `envFrom` of the
    flow-run container (the worker still adds PREFECT_API_URL and the run's own variables through `env`) and, when
    `state_pvc` is given, the shared state volume (the model servers' request log the drift check reads)."""
    patched = copy.deepcopy(dict(template))
    try:
        pod = patched["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise RenderError(f"not a kubernetes base job template (no job_manifest container): {exc!r}") from None
    refs = [{"configMapRef": {"name": configmap}}, {"secretRef": {"name": secret}}]
    container["envFrom"] = [e for e in container.get("envFrom", []) if e not in refs] + refs
    if state_pvc:
        volume = {"name": "flywheel-state", "persistentVolumeClaim": {"claimName": state_pvc}}
        mount = {"name": "flywheel-state", "mountPath": state_dir}
        pod["volumes"] = [v for v in pod.get("volumes", []) if v.get("name") != "flywheel-state"] + [volume]
        mounts = container.get("volumeMounts", [])
        container["volumeMounts"] = [m for m in mounts if m.get("name") != "flywheel-state"] + [mount]
        pod.setdefault("securityContext", {}).setdefault("fsGroup", 10001)
    return patched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="render_deployments.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dep = sub.add_parser("deployments", help="write prefect.yaml for FLYWHEEL_WORK_POOL / FLYWHEEL_WORK_POOL_TYPE")
    dep.add_argument("--source", type=Path, default=Path("prefect.yaml"))
    dep.add_argument("--out", type=Path, required=True)
    tpl = sub.add_parser("base-job-template", help="add envFrom ConfigMap + Secret to a kubernetes job template")
    tpl.add_argument("--in", dest="source", type=Path, required=True)
    tpl.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    env = os.environ
    try:
        if args.command == "deployments":
            pool_type = env.get("FLYWHEEL_WORK_POOL_TYPE", "process")
            source = yaml.safe_load(args.source.read_text())
            rendered = render_deployments(
                source, env.get("FLYWHEEL_WORK_POOL", "flywheel"), job_variables(pool_type, env)
            )
            args.out.write_text(yaml.safe_dump(rendered, sort_keys=False))
        else:
            template = json.loads(args.source.read_text())
            patched = patch_base_job_template(
                template, env.get("FLYWHEEL_K8S_CONFIGMAP", "flywheel-config"),
                env.get("FLYWHEEL_K8S_SECRET", "flywheel-secrets"),
            )  # fmt: skip
            args.out.write_text(json.dumps(patched, indent=2))
    except RenderError as exc:
        print(f"render_deployments: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
