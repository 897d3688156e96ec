"""Which signed deliveries the bridge refuses instead of emitting: names MLflow itself would never accept, and
models or versions that are not in the registry (issue 15, item 3: such deliveries became deploy-model runs that
Failed and raised failure alerts).

Two checks, after the signature and the timestamp (so forged traffic never reaches the registry):

* `name_problem`: MLflow's own naming rules (mlflow.utils.validation: a model name has no '/' or ':' and is at
  most 256 characters — its database column; an alias matches `^[\\w-]*$`, at most 255 characters, and is neither
  `latest` nor `v<digits>`; a version is a positive integer), and no control characters;
* `RegistryCheck`: the model (for `alias.deleted`) or the version (otherwise) exists, asked of the MLflow REST API
  with a short timeout and cached for `ttl` seconds, so a burst of deliveries costs one lookup per model version.
  A registry that cannot answer (down, timeout, 5xx) is `unavailable`: the app answers 503 and MLflow retries the
  delivery (3 times); the reconciler deploys any alias move whose deliveries were all lost. It is never cached.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

MAX_MODEL_NAME_LENGTH = 256  # MLflow's registered_models.name column (String(256))
MAX_ALIAS_LENGTH = 255  # mlflow.utils.validation.MAX_REGISTERED_MODEL_ALIAS_LENGTH
REGISTRY_TIMEOUT_SECONDS = 3.0
REGISTRY_CACHE_SECONDS = 10.0

_ALIAS_RE = re.compile(r"^[\w\-]+$")
_RESERVED_ALIAS_RE = re.compile(r"^[vV]\d+$")
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,9}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def name_problem(name: str, alias: str | None, version: str | None) -> str | None:
    """Why MLflow could never have sent these names (None when they are well formed)."""
    if len(name) > MAX_MODEL_NAME_LENGTH:
        return f"model name is {len(name)} characters long (MLflow's limit is {MAX_MODEL_NAME_LENGTH})"
    if _CONTROL_RE.search(name):
        return "model name contains control characters"
    if not name.strip() or "/" in name or ":" in name:
        return f"model name {name[:80]!r} is not a valid MLflow model name (blank, or contains '/' or ':')"
    if alias is not None:
        if len(alias) > MAX_ALIAS_LENGTH:
            return f"alias is {len(alias)} characters long (MLflow's limit is {MAX_ALIAS_LENGTH})"
        if not _ALIAS_RE.match(alias) or alias.lower() == "latest" or _RESERVED_ALIAS_RE.match(alias):
            return f"alias {alias[:80]!r} is not a valid MLflow alias"
    if version is not None and not _VERSION_RE.match(version):
        return f"version {version[:40]!r} is not a model version number"
    return None


@dataclass(frozen=True)
class Verdict:
    """`exists`: True (it exists), False (refuse: `reason` says why) or None (the registry could not answer)."""

    exists: bool | None
    reason: str = ""


class RegistryCheck:
    """Whether a registered model (and version) exists, asked of MLflow's REST API and cached for `ttl` s."""

    def __init__(
        self,
        tracking_uri: str | None,
        ttl: float = REGISTRY_CACHE_SECONDS,
        timeout: float = REGISTRY_TIMEOUT_SECONDS,
    ) -> None:
        self.base = tracking_uri.rstrip("/") if tracking_uri else None
        self.enabled = bool(self.base) and self.base.split("://", 1)[0] in ("http", "https")
        self.ttl, self.timeout = ttl, timeout
        self._cache: dict[tuple[str, str | None], tuple[float, Verdict]] = {}
        self._lock = threading.Lock()
        self.lookups = 0  # registry requests made (tests and logs)

    def check(self, name: str, version: str | None) -> Verdict:
        """Does model `name` (and its `version`, when given) exist? Registry answers are cached, failures not."""
        if not self.enabled:
            return Verdict(True)
        key, now = (name, version), time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        verdict = self._lookup(name, version)
        if verdict.exists is not None:
            with self._lock:
                if len(self._cache) > 10_000:  # a flood of distinct names: start again
                    self._cache.clear()
                self._cache[key] = (now + self.ttl, verdict)
        return verdict

    def _lookup(self, name: str, version: str | None) -> Verdict:
        import httpx

        if version is None:
            path, params, what = "/api/2.0/mlflow/registered-models/get", {"name": name}, f"model {name!r}"
        else:
            path = "/api/2.0/mlflow/model-versions/get"
            params, what = {"name": name, "version": version}, f"version {version} of model {name!r}"
        self.lookups += 1
        try:
            resp = httpx.get(self.base + path, params=params, timeout=self.timeout, headers=_auth_headers(),
                             auth=_basic_auth())  # fmt: skip
        except httpx.HTTPError as exc:
            return Verdict(None, f"MLflow registry unreachable: {type(exc).__name__}")
        if resp.status_code == 200:
            return Verdict(True)
        code = _error_code(resp)
        if resp.status_code == 404 or code == "RESOURCE_DOES_NOT_EXIST":
            return Verdict(False, f"{what} is not in the MLflow registry")
        if resp.status_code == 400 and code == "INVALID_PARAMETER_VALUE":
            return Verdict(False, f"MLflow refuses the name of {what}")
        return Verdict(None, f"MLflow registry answered {resp.status_code}")


def _error_code(resp) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("error_code") if isinstance(body, dict) else None


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _basic_auth() -> tuple[str, str] | None:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None
