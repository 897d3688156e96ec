"""Every metric the Grafana dashboard and the Prometheus alert rules (infra/) use exists in a real scrape.

The model server app (`flywheel.serving.app.create_app`) runs on uvicorn on 127.0.0.1 and a free port, serving a
small scikit-learn classifier registered twice in a file-based MLflow registry (SQLite in tmp). It takes good and
bad /invocations, an admin load + swap + rollback, then its /metrics is scraped over HTTP and parsed with
prometheus_client's parser, as Prometheus would read it.

The drift metrics come from the check-drift flow through the Pushgateway, not from the model server. Their names
are fixed in DRIFT_METRICS (tests/unit/test_infra.py); here a prometheus_client registry of exactly those gauges
(label `model`, as the push will carry) is exposed and parsed the same way, and the dashboard and the rules must
use only those names for drift. `test_drift_flow_pushes_the_dashboard_metrics` checks the flow's own code once
it pushes (it says so, as a skip with its reason, while the flow does not push yet).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "metrics-scrape-test"
ADMIN = "scrape-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _load_infra_checks():
    """The PromQL helpers and the drift contract of the unit tests (one definition for both)."""
    unit = str(ROOT / "tests" / "unit")
    if unit not in sys.path:
        sys.path.append(unit)  # test_infra.py imports its sibling offline_tools, as pytest does for the unit tests
    spec = importlib.util.spec_from_file_location("flywheel_infra_checks", ROOT / "tests" / "unit" / "test_infra.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infra = _load_infra_checks()


def referenced_metric_names() -> dict[str, set[str]]:
    """{metric name: where it is used} over the alert rules and the dashboard."""
    used: dict[str, set[str]] = {}
    for rule in infra.alert_rules():
        for name in infra.promql_metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in infra.dashboard_exprs():
        for name in infra.promql_metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


def scraped_names(text: str) -> set[str]:
    """Family names and every sample name (`_total`, `_bucket`, `_created`, ...) of an exposition."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def drift_registry_exposition() -> str:
    """What the check-drift flow's push exposes: one gauge per DRIFT_METRICS name, labelled by model."""
    registry = CollectorRegistry()
    helps = {
        "flywheel_drift_share": "Share of drifted columns in the latest drift check",
        "flywheel_drift_detected": "1 when the latest drift check found dataset drift",
        "flywheel_drift_last_check_timestamp_seconds": "Unix time of the latest drift check",
    }
    assert set(helps) == set(infra.DRIFT_METRICS)
    for name in infra.DRIFT_METRICS:
        Gauge(name, helps[name], ["model"], registry=registry).labels(model=MODEL).set(1)
    return generate_latest(registry).decode()


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory) -> str:
    """Two versions of a small classifier in a SQLite registry (version 2 predicts differently)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("metrics-scrape")
    uri = f"sqlite:///{root}/mlflow.db"
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"hour": rng.integers(5, 23, 400).astype(float), "distance": rng.uniform(100, 2500, 400)})
    y = ((X["hour"] > 16) ^ (rng.uniform(size=400) < 0.1)).astype(int)
    with _use_tracking_uri(uri):
        exp = mlflow.create_experiment("metrics-scrape", artifact_location=str(root / "artifacts"))
        for c in (1.0, 0.001):
            model = LogisticRegression(C=c, max_iter=300).fit(X, y)
            with mlflow.start_run(experiment_id=exp):
                mlflow.sklearn.log_model(
                    model, name="model", registered_model_name=MODEL, signature=infer_signature(X, y),
                    pip_requirements=["scikit-learn"], serialization_format="cloudpickle",
                )  # fmt: skip
    return uri


@pytest.fixture(scope="module")
def server_url(registry_uri, tmp_path_factory):
    """The real app on uvicorn, 127.0.0.1 and a free port, with the request log on."""
    import uvicorn

    from flywheel.serving.app import create_app
    from flywheel.stack.processes import free_port

    app = create_app(
        MODEL, registry_uri, admin_token=ADMIN, request_log_dir=tmp_path_factory.mktemp("request-log"),
        initial_version="1", request_log_flush_seconds=0.2,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="metrics-scrape-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ping", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        server.should_exit = True
        pytest.fail("the model server did not load version 1 within 60 s")
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def scrape(server_url) -> str:
    """Traffic of every kind the dashboard shows, then one /metrics scrape over HTTP."""
    with httpx.Client(base_url=server_url, timeout=60) as client:
        good = {"dataframe_records": [{"hour": 18.0, "distance": 900.0}, {"hour": 7.0, "distance": 300.0}]}
        for _ in range(3):
            resp = client.post("/invocations", json=good)
            assert resp.status_code == 200 and len(resp.json()["predictions"]) == 2, resp.text
        assert client.post("/invocations", json={"dataframe_records": [{"hour": 1.0}]}).status_code == 400
        assert client.post("/invocations", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
        assert client.post("/admin/swap", json={}).status_code == 401
        loaded = client.post("/admin/load", json={"version": "2"}, headers=AUTH)
        assert loaded.status_code == 200, loaded.text
        assert client.post("/admin/swap", json={"version": "2"}, headers=AUTH).json()["active"]["version"] == "2"
        assert client.post("/invocations", json=good).headers["X-Flywheel-Model-Version"] == "2"
        rolled = client.post("/admin/rollback", json={}, headers=AUTH)
        assert rolled.status_code == 200 and rolled.json()["active"]["version"] == "1", rolled.text
        assert client.post("/invocations", json=good).headers["X-Flywheel-Model-Version"] == "1"
        resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return resp.text


# --------------------------------------------------------------------------------------------------- tests
def test_every_referenced_model_server_metric_is_in_a_real_scrape(scrape):
    exposed = scraped_names(scrape)
    used = referenced_metric_names()
    drift = set(infra.DRIFT_METRICS)
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in exposed and name not in drift and name not in infra.PROMETHEUS_BUILTINS
    }
    assert not missing, f"used by infra/ but not in the model server's /metrics: {missing}"
    # The scrape carries what the panels break down by: status codes, versions, slots, the rollback itself.
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    statuses = {s.labels["status"] for s in families["flywheel_http_requests"].samples if s.name.endswith("_total")}
    assert {"200", "400", "415"} <= statuses
    assert {s.labels["version"] for s in families["flywheel_scored_rows"].samples} >= {"1", "2"}
    rollbacks = [s.value for s in families["flywheel_rollbacks"].samples if s.name == "flywheel_rollbacks_total"]
    swaps = [s.value for s in families["flywheel_swaps"].samples if s.name == "flywheel_swaps_total"]
    assert rollbacks == [1.0] and swaps == [2.0]
    active = [s.value for s in families["flywheel_active_model_version"].samples]
    assert active == [1.0]
    assert {s.labels["slot"] for s in families["flywheel_model_slot"].samples} == {"active", "standby"}
    assert {s.labels["state"] for s in families["flywheel_request_log_rows"].samples} >= {"written", "buffered"}


def test_every_model_server_metric_family_is_used_somewhere(scrape):
    """The reverse direction: nothing the server exports is forgotten by both the dashboard and the alerts."""
    used = set(referenced_metric_names())
    for family in text_string_to_metric_families(scrape):
        if family.name.endswith("_created"):  # a counter's creation time, parsed as a family of its own
            continue
        forms = {family.name} | {family.name + suffix for suffix in SUFFIXES}
        assert forms & used, f"{family.name} is exported but neither graphed nor alerted on"


def test_drift_metrics_used_are_exactly_the_pushed_ones():
    exposed = scraped_names(drift_registry_exposition())
    used = referenced_metric_names()
    drift_used = {n for n in used if re.match(r"flywheel_drift", n)}
    assert drift_used == set(infra.DRIFT_METRICS), drift_used ^ set(infra.DRIFT_METRICS)
    assert drift_used <= exposed
    assert any(w.startswith("alert") for n in drift_used for w in used[n]), "no alert on drift"
    assert "flywheel_drift_share" in {n for n in drift_used if "dashboard" in used[n]}


def test_drift_flow_pushes_the_dashboard_metrics():
    """The gauges the check-drift flow pushes to the Pushgateway are exactly DRIFT_METRICS, labelled by model."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from flywheel.tasks.metrics import drift_metrics

    registry = drift_metrics("m", SimpleNamespace(drift_share=0.6, dataset_drift=True), 1.7e9)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert {f.name for f in families} == set(infra.DRIFT_METRICS)
    assert all(s.labels == {"model": "m"} for f in families for s in f.samples)
