"""A slot whose version predicts in another process (its own container) over MLflow's scoring protocol.

With `"upstream": "http://127.0.0.1:PORT"` in `/admin/load`, the version's own container (the image
`mlflow models build-docker` makes, see the `docker` target in flywheel.tasks.serving) does the predicting while
this server stays the stable URL in front of it, with the same input checks, request log, metrics and blue/green
switch.

The container is MLflow's scoring server, or — for a version whose compiled form passed parity — Flywheel's own
model server serving it compiled (flywheel.serving.container); its `/version` says which (`engine`), and the slot
reports that engine in /version, /admin/state and the ledger.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pandas as pd

from flywheel.serving.errors import MAX_ERROR_MESSAGE, ApiError, _clip
from flywheel.tasks.compiling import ENGINE_PYFUNC

_UPSTREAM_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")
UPSTREAM_TIMEOUT_SECONDS = 60.0


class UpstreamError(RuntimeError):
    """The process that predicts for a slot did not answer, or answered with a server error."""


class _Upstream:
    """A version that predicts in another process speaking MLflow's scoring protocol (its own container).

    Written by hand: MLflow's scoring server serves one model and has no routing between versions, so this server
    stays in front as the stable URL. The input is parsed and checked against the version's signature here, as for
    an in-process model; the parsed frame goes on as `dataframe_split`, and the answer comes back as predictions.
    A 4xx answer is the caller's fault (raised as MlflowException → 400 here); no answer or a 5xx is the upstream's
    (UpstreamError → 502, counted as a model error, which the live error watch after a switch sees).
    """

    def __init__(self, url: str, metadata: Any, timeout: float = UPSTREAM_TIMEOUT_SECONDS) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.metadata = metadata
        self._client = httpx.Client(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=8))
        self.engine, self.engine_reason = ENGINE_PYFUNC, None  # what predicts there (see `describe`)

    def ping(self) -> int:
        return self._client.get(self.url + "/ping").status_code

    def describe(self) -> None:
        """Learn what predicts there: Flywheel's model server answers /version as JSON with its engine; MLflow's
        scoring server answers its version as text (pyfunc)."""
        try:
            body = self._client.get(self.url + "/version").json()
        except Exception:  # text, no answer: MLflow's scoring server, or one that will fail its smoke test anyway
            body = None
        if isinstance(body, dict) and body.get("engine"):
            self.engine = str(body["engine"])
            why = str(body.get("compiled") or "")
            self.engine_reason = _clip(f"{why}; in the version's own container (Flywheel's model server)", 500)

    def predict(self, data: Any, params: dict | None = None) -> Any:
        import httpx
        from mlflow.exceptions import MlflowException

        if isinstance(data, pd.DataFrame):  # pandas writes the JSON once; no decode and re-encode on the hot path
            split = data.to_json(orient="split", date_format="iso", index=False)
            extra = f', "params": {json.dumps(params)}' if params else ""
            body = f'{{"dataframe_split": {split}{extra}}}'.encode()
        else:
            inputs = data.tolist() if isinstance(data, np.ndarray) else data
            body = json.dumps({"inputs": inputs, **({"params": params} if params else {})}).encode()
        try:
            resp = self._client.post(
                self.url + "/invocations", content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{self.url} did not answer: {type(exc).__name__}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 500 or not isinstance(body, dict):
            raise UpstreamError(f"{self.url} answered {resp.status_code}: {_clip(resp.text, 300)}")
        if resp.status_code >= 400:
            from mlflow.protos.databricks_pb2 import BAD_REQUEST, ErrorCode

            try:
                code = ErrorCode.Value(str(body.get("error_code")))
            except ValueError:
                code = BAD_REQUEST
            raise MlflowException(str(body.get("message") or resp.text)[:MAX_ERROR_MESSAGE], error_code=code)
        if "predictions" not in body:
            raise UpstreamError(f"{self.url} answered without predictions: {_clip(resp.text, 300)}")
        preds = body["predictions"]
        if isinstance(preds, list) and preds and isinstance(preds[0], dict):
            return pd.DataFrame(preds)
        return np.asarray(preds) if isinstance(preds, list) else preds

    def close(self) -> None:
        self._client.close()


def _upstream_model(url: str, local_dir: str) -> _Upstream:
    """The version's metadata (signature, input example) from the registry, its predictions from `url`."""
    from mlflow.models import Model

    model = _Upstream(url, Model.load(local_dir))
    try:
        status = model.ping()
    except Exception as exc:
        model.close()
        raise ApiError(502, "LOAD_FAILED", f"upstream {url} unreachable: {type(exc).__name__}: {exc}") from exc
    if status != 200:
        model.close()
        raise ApiError(502, "LOAD_FAILED", f"upstream {url} is not ready: /ping answered {status}")
    model.describe()
    return model
