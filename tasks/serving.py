"""Serving targets: where a registered version goes to serve traffic.

- `local` (embedded default): Flywheel's model server process (flywheel.serving) at a stable URL. It keeps
  two slots in one process; the new version is loaded beside the old one, smoke-tested, then swapped in.
- `docker`: one container per version, from the image packaging built (`flywheel/<model>:<version>`, MLflow's
  serving image; for a version whose compiled form passed parity, one that serves it compiled with Flywheel's
  model server unless `FLYWHEEL_COMPILE_MODELS=false`: flywheel.tasks.serving_image), published on a loopback
  port; the model server stays the stable URL in front and forwards the version's predictions to its container
  (an "upstream" slot), so health check, smoke test, switch, live watch and rollback are the same as for `local`.
  The previous version's container keeps running for an instant switch back.
- `kubernetes`: blue/green Deployments of the same image (its own entrypoint, `FLYWHEEL_COMPILE_MODELS` passed
  on) behind one Service whose selector switches; rendered as manifests, and applied with kubectl only when a
  cluster context is configured.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd

from flywheel.core.names import slug
from flywheel.tasks.verdicts import Counts

_PREDICT_FAILED = "The model failed on this input"  # the model server's message when predict raises


class TargetError(RuntimeError):
    """A serving target refused or failed an operation."""


@dataclass
class SmokeResult:
    ok: bool
    rows: int
    error_rate: float
    p50_ms: float
    reason: str = ""
    failures: list[dict] = field(default_factory=list)  # the first failed rows: {"row", "status", "error"}
    source: str = ""  # what the rows were (e.g. "v3's holdout sample"), said in the ledger
    batch_ok: bool = True
    seconds: float = 0.0  # what the test cost, end to end

    @property
    def errors(self) -> int:
        return round(self.error_rate * self.rows)

    def failure_kind(self) -> str:
        """What failed, in the ledger's words: "predictions that error" (the model raised, or its container did),
        "wrong schema" (the input did not fit the version's signature), or "limits breached" (latency only)."""
        texts = [str(f.get("error") or "") for f in self.failures] + [self.reason]
        if any(int(f.get("status") or 0) >= 500 for f in self.failures) or any(
            _PREDICT_FAILED in t or "could not predict" in t for t in texts
        ):
            return "predictions that error"
        if self.failures or not self.batch_ok:
            return "wrong schema"
        return "limits breached"


@dataclass
class LocalTarget:
    """Client of a running Flywheel model server's admin API (bearer token)."""

    url: str
    admin_token: str | None
    name: str = "local"
    timeout: float = 120.0

    def _call(self, method: str, path: str, **kwargs) -> dict:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        try:
            resp = httpx.request(method, self.url + path, headers=headers, timeout=self.timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise TargetError(f"model server at {self.url} unreachable: {exc}") from exc
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        if resp.status_code >= 400:
            raise TargetError(f"{method} {path} → {resp.status_code}: {body.get('message') or resp.text[:300]}")
        return body

    def state(self) -> dict:
        return self._call("GET", "/admin/state")

    def active_version(self) -> str | None:
        active = self.state().get("active") or {}
        return str(active["version"]) if active.get("version") is not None else None

    def serves(self, version: str) -> bool:
        """Whether `version` serves here the way this target serves it (nothing left to deploy)."""
        return self.active_version() == str(version)

    def load(self, version: str) -> dict:
        return self._call("POST", "/admin/load", json={"version": str(version)})

    def prepare(self, version: str) -> dict:
        """Have the server load `version` ahead into its prepared slot (it never serves from there); `load` of the
        same version then takes it at once. Best effort, answered without waiting for the load."""
        return self._call("POST", "/admin/load", json={"version": str(version), "prepare": True})

    def smoke(
        self, records: list[dict], *, max_error_rate: float, max_p50_ms: float, slot: str = "standby"
    ) -> SmokeResult:
        """Score `records` on a slot (`standby`: the version about to serve; `active`: the one serving now)."""
        body = self._call(
            "POST",
            "/admin/smoke",
            json={"records": records, "max_error_rate": max_error_rate, "max_p50_ms": max_p50_ms, "slot": slot},
        )
        return SmokeResult(
            ok=bool(body.get("ok")),
            rows=int(body.get("rows", len(records))),
            error_rate=float(body.get("error_rate", 1.0)),
            p50_ms=float(body.get("p50_ms", 0.0)),
            reason=str(body.get("reason", "")),
            failures=list(body.get("failures") or []),
            batch_ok=bool(body.get("batch_ok", True)),
        )

    def swap(self, version: str | None = None) -> dict:
        """Switch traffic to the standby slot; with `version`, only if the standby holds that version."""
        return self._call("POST", "/admin/swap", json={"version": str(version)} if version is not None else None)

    def rollback(self) -> dict:
        return self._call("POST", "/admin/rollback")

    def counters(self, slot: str = "active") -> Counts:
        """(requests, failed predictions, refused inputs) of a slot since it was loaded."""
        info = self.state().get(slot) or {}
        return Counts(int(info.get("requests", 0)), int(info.get("errors", 0)), int(info.get("rejected", 0)))

    def slot_version(self, slot: str) -> str | None:
        info = self.state().get(slot) or {}
        return str(info["version"]) if info.get("version") is not None else None


def records_for_smoke(sample: pd.DataFrame, features: list[str], rows: int = 100) -> list[dict]:
    """Rows as JSON records, only the model's input columns (times as ISO text, missing values as null)."""
    cols = [c for c in features if c in sample.columns]
    frame = sample[cols].head(rows)
    times = [c for c in cols if pd.api.types.is_datetime64_any_dtype(frame[c])]
    if times:
        frame = frame.assign(**{c: frame[c].map(lambda t: t.isoformat() if pd.notna(t) else None) for c in times})
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


# ------------------------------------------------------------------------------------------------------- docker
CONTAINER_PORT = 8080  # the version's image listens here (MLflow's nginx → scoring server, or Flywheel's server)
_PING = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=3)"


def docker_engine(timeout: float = 30.0):
    """A client of the Docker-compatible engine at DOCKER_HOST (or the default socket); TargetError if none answers."""
    try:
        import docker

        engine = docker.from_env(timeout=timeout)
        engine.ping()
    except Exception as exc:  # DockerException, missing socket, permission denied
        raise TargetError(
            f"the docker target needs a Docker-compatible engine and none is reachable ({type(exc).__name__}: "
            f"{str(exc)[:200]}); set DOCKER_HOST, or FLYWHEEL_DEPLOY_TARGET=local"
        ) from exc
    return engine


def image_environment(compile_models: bool | None = None) -> dict[str, str]:
    """The environment a version's container runs with: whether it may serve its compiled model (its entrypoint,
    flywheel.serving.container, runs MLflow's scoring server when not)."""
    if compile_models is None:
        from flywheel.core.settings import get_settings

        compile_models = get_settings().compile_models
    return {"FLYWHEEL_COMPILE_MODELS": "true" if compile_models else "false"}


def _container_url(container) -> str | None:
    """The loopback URL the engine published the container's serving port on (None until it has)."""
    binding = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{CONTAINER_PORT}/tcp")
    return f"http://127.0.0.1:{binding[0]['HostPort']}" if binding else None


@dataclass
class DockerTarget(LocalTarget):
    """`local`'s blue/green through the model server's admin API, with each version predicted by its own container.

    load: run `flywheel/<model>:<version>` (labelled, loopback port chosen by the engine, restarted unless stopped),
    wait for its /ping, then load it as the standby slot's upstream. Containers neither slot uses any more are
    removed after each load, so the serving one and the one to switch back to stay.
    """

    model_name: str = ""
    role: str = "production"
    name: str = "docker"
    start_timeout: float = 300.0
    compile_models: bool | None = None  # None: the setting (FLYWHEEL_COMPILE_MODELS)

    def container_name(self, version: str) -> str:
        app = slug(self.model_name)
        return f"flywheel-{app}-{self.role}-v{version}"

    def labels(self, version: str) -> dict[str, str]:
        return {"flywheel.model": self.model_name, "flywheel.role": self.role, "flywheel.version": str(version),
                "flywheel.front": self.url}  # fmt: skip

    def _mine(self, engine) -> list:
        return [
            c for c in engine.containers.list(all=True, filters={"label": f"flywheel.model={self.model_name}"})
            if c.labels.get("flywheel.role") == self.role and c.labels.get("flywheel.front") == self.url
        ]  # fmt: skip

    def serves(self, version: str) -> bool:
        """`version` is active and predicted by its container. After a model server restart the active version
        predicts in-process: that counts as not deployed (so the reconciler deploys it into its container again),
        unless no engine answers, when in-process is the best there is."""
        active = self.state().get("active") or {}
        if active.get("version") is None or str(active["version"]) != str(version):
            return False
        if active.get("upstream"):
            return True
        try:
            docker_engine(timeout=5)
        except TargetError:
            return True
        return False

    def prepare(self, version: str) -> dict:
        return {"preparing": False, "reason": "the docker target loads a version by starting its container"}

    def load(self, version: str) -> dict:
        from flywheel.tasks.packaging import image_tag

        engine = docker_engine()
        tag = image_tag(self.model_name, version)
        try:
            engine.images.get(tag)
        except Exception as exc:
            raise TargetError(
                f"image {tag} is not in the engine ({type(exc).__name__}): packaging did not build it"
            ) from exc
        name = self.container_name(version)
        for old in engine.containers.list(all=True, filters={"name": f"^{name}$"}):
            old.remove(force=True)  # a leftover of an earlier attempt at this version
        container = engine.containers.run(
            tag, detach=True, name=name, labels=self.labels(version),
            ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1",)},  # the engine picks a free loopback port
            environment=image_environment(self.compile_models),
            healthcheck={"test": ["CMD", "python", "-c", _PING], "interval": 10**10, "timeout": 5 * 10**9,
                         "retries": 3, "start_period": 60 * 10**9},
            restart_policy={"Name": "unless-stopped"},
        )  # fmt: skip
        try:
            upstream = self._wait_ready(container)
            body = self._call("POST", "/admin/load", json={"version": str(version), "upstream": upstream})
        except Exception:
            container.remove(force=True)
            raise
        self.prune(engine)
        return {**body, "container": name, "upstream": upstream}

    def _wait_ready(self, container) -> str:
        """The container's URL once its /ping answers 200; TargetError (with its last log lines) if it exits first
        or does not get ready in time."""
        deadline = time.monotonic() + self.start_timeout
        url = None
        while time.monotonic() < deadline:
            container.reload()
            if container.status in ("exited", "dead"):
                raise TargetError(f"container {container.name} exited: {self._logs(container)}")
            url = url or _container_url(container)
            if url:
                try:
                    if httpx.get(url + "/ping", timeout=3).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(1.0)
        raise TargetError(
            f"container {container.name} not ready after {self.start_timeout:.0f}s: {self._logs(container)}"
        )

    @staticmethod
    def _logs(container, lines: int = 15) -> str:
        try:
            return container.logs(tail=lines).decode(errors="replace").strip()[-2000:] or "(no output)"
        except Exception as exc:
            return f"(logs unavailable: {exc})"

    def prune(self, engine=None) -> list[str]:
        """Remove this target's containers that neither slot of the model server uses."""
        engine = engine or docker_engine()
        st = self.state()
        keep = {(st.get(slot) or {}).get("upstream") for slot in ("active", "standby")} - {None}
        removed = []
        for c in self._mine(engine):
            if _container_url(c) not in keep:
                c.remove(force=True)
                removed.append(c.name)
        return removed

    def remove_all(self) -> list[str]:
        """Stop and remove every container of this target (when its stack stops)."""
        engine = docker_engine(timeout=10)
        names = []
        for c in self._mine(engine):
            c.remove(force=True)
            names.append(c.name)
        return names


# --------------------------------------------------------------------------------------------------- kubernetes
def kubernetes_manifests(
    model_name: str,
    version: str,
    image: str,
    *,
    color: str,
    namespace: str = "flywheel",
    port: int = 8080,
    replicas: int = 2,
    compile_models: bool | None = None,
) -> list[dict[str, Any]]:
    """A blue or green Deployment for one version and the Service whose selector points at `color`.

    The pods run the version's image as the docker target does — its own entrypoint, no command of ours, and
    `FLYWHEEL_COMPILE_MODELS` (None: the setting) — so they serve the compiled model exactly when a docker
    container of it would. Applying the new color's Deployment first and the Service second is the switch; the
    other color's Deployment stays up for an instant switch back.
    """
    app = slug(model_name)
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "flywheel", "flywheel/color": color}
    probe = {"httpGet": {"path": "/ping", "port": port}, "initialDelaySeconds": 5, "periodSeconds": 5}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{app}-{color}",
            "namespace": namespace,
            "labels": {**labels, "flywheel/model-version": str(version)},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, "flywheel/model-version": str(version)}},
                "spec": {
                    "containers": [
                        {
                            "name": "model",
                            "image": image,
                            "ports": [{"containerPort": port, "name": "http"}],
                            "env": [{"name": k, "value": v} for k, v in image_environment(compile_models).items()],
                            "readinessProbe": probe,
                            "livenessProbe": {**probe, "initialDelaySeconds": 15},
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "512Mi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                        }
                    ]
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": app, "namespace": namespace, "labels": {"app.kubernetes.io/name": app}},
        "spec": {
            "selector": {"app.kubernetes.io/name": app, "flywheel/color": color},
            "ports": [{"name": "http", "port": 80, "targetPort": port}],
        },
    }
    return [deployment, service]


def kubectl_context() -> str | None:
    """The current kubectl context, or None when kubectl or a context is missing."""
    if not shutil.which("kubectl"):
        return None
    out = subprocess.run(["kubectl", "config", "current-context"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or None if out.returncode == 0 else None


def render_kubernetes(
    model_name: str,
    version: str,
    image: str,
    out_dir: str,
    *,
    live_color: str | None,
    namespace: str,
    compile_models: bool | None = None,
) -> tuple[str, str]:
    """Write the blue/green manifests for `version` (the color that is not live) to `out_dir`; (path, color)."""
    import yaml

    color = "green" if live_color == "blue" else "blue"
    docs = kubernetes_manifests(model_name, version, image, color=color, namespace=namespace,
                                compile_models=compile_models)  # fmt: skip
    path = f"{out_dir.rstrip('/')}/kubernetes-{color}.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump_all(docs, fh, sort_keys=False)
    return path, color


def apply_blue_green(path: str, deployment_name: str, namespace: str, timeout_s: int = 300) -> str:
    """Apply the new color's Deployment, wait for its rollout (readiness on /ping), then switch the Service."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        deployment, service = list(yaml.safe_load_all(fh))
    for doc in (deployment,):
        out = subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(doc), capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        if out.returncode != 0:
            raise TargetError(f"kubectl apply failed: {out.stderr.strip()}")
    status = subprocess.run(
        ["kubectl", "rollout", "status", f"deployment/{deployment_name}", "-n", namespace, f"--timeout={timeout_s}s"],
        capture_output=True, text=True, timeout=timeout_s + 30,
    )  # fmt: skip
    if status.returncode != 0:
        raise TargetError(f"rollout of {deployment_name} did not become ready: {status.stderr.strip()}")
    out = subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(service), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    if out.returncode != 0:
        raise TargetError(f"kubectl apply (service switch) failed: {out.stderr.strip()}")
    return f"{deployment_name} ready; service switched"
