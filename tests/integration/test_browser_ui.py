"""The Prefect and MLflow UIs as a person opens them, in headless Chromium (Debian's `chromium`, driven by Playwright's
Python client), against one real `flywheel up` stack after one short training and one drift check.

It checks that the Prefect deployments page lists every deployment with its schedule or trigger, that the train
run's `gate-*` artifact shows the verdict, that the registered model's page shows `@champion` and `@challenger`,
that the training run shows F1 in the experiment's runs table (nested runs folded), that the monitoring experiment
opens in the same model-training mode and that the drift check's Evidently report opens from the verdict's link.
Each page's screenshot goes to the test's tmp folder. Both UIs are single-page apps: every wait is for a positive
selector or text, never a sleep.

Under CI=true a missing browser or client fails, naming what to install (`make browser`); elsewhere it skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from needs import missing

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
CHROMIUM = Path(os.environ.get("FLYWHEEL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TRAIN_WINDOW = ("2013-01-01", "2013-01-15")
DRIFT_WINDOW = ("2013-01-08", "2013-01-15")  # inside the training window: a report, and (likely) no retraining
WAIT_MS = 60_000  # the longest a page may take to show what is waited for (a loaded 2-core machine)


@pytest.fixture(scope="module")
def playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the browser tests need Playwright's Python client", "`playwright` (the test extra, `make install`)")
    if not CHROMIUM.exists():
        missing(f"the browser tests need Chromium at {CHROMIUM}", "the Debian package `chromium` (`make browser`)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory):
    """One `flywheel up` stack after one `flywheel train` (v1: champion and challenger, a gate artifact) and one
    `check-drift/cron` run on a week of July (an Evidently report in MLflow): (urls, env, model name)."""
    from stacks import running_stack

    from flywheel.core.spec import load_spec
    from flywheel.tasks import data

    root = tmp_path_factory.mktemp("browser-stack")
    model = "flights-browser"
    current = root / "july-week.parquet"
    data.pull_dataset(load_spec(None), *DRIFT_WINDOW).to_parquet(current)
    with running_stack(root / "state", model) as (_, urls, env):
        full = {**os.environ, **env}
        train = [str(BIN / "flywheel"), "train", "--start", TRAIN_WINDOW[0], "--end", TRAIN_WINDOW[1]]
        done = subprocess.run(train, env=full, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        drift = [str(BIN / "prefect"), "deployment", "run", "check-drift/cron", "--watch", "--watch-timeout", "900",
                 "--param", f"current_uri={current}", "--param", f"model_name={model}"]  # fmt: skip
        done = subprocess.run(drift, env=full, capture_output=True, text=True, timeout=960)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield urls, env, model


@pytest.fixture
def page(playwright, tmp_path):
    """A fresh Chromium (its own user-data dir) and page; `page.shot(name)` saves a screenshot in tmp_path, and the
    last page is saved as `last.png` whatever happens."""
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1600, "height": 1000},
    )  # fmt: skip
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> Path:
        path = shots / f"{name}.png"
        pg.screenshot(path=str(path), full_page=True)
        return path

    pg.shot = shot
    try:
        yield pg
    finally:
        try:
            shot("last")
        finally:
            context.close()


def _mlflow(urls) -> str:
    return urls["mlflow_url"].rstrip("/")


def _prefect(urls) -> str:
    return urls["prefect_url"].rstrip("/")


def _see(scope, needle: str | re.Pattern) -> None:
    """Wait until `scope` (a page or a frame) shows an element whose text is or matches `needle`."""
    scope.get_by_text(needle).first.wait_for(state="visible")


def _api(urls, path: str, body: dict | None = None):
    url = urls["prefect_api_url"] + path
    resp = httpx.post(url, json=body, timeout=30) if body is not None else httpx.get(url, timeout=30)
    return resp.raise_for_status().json()


# ------------------------------------------------------------------------------------------------------ Prefect
def test_the_deployments_page_lists_every_deployment_with_its_schedule_or_trigger(ui_stack, page):
    """The list shows each deployment under its flow, and the schedule the server holds for it in words; a
    deployment's own page names its trigger; one with neither says so (no schedule, no trigger)."""
    from flywheel.deployments.definitions import DEPLOYMENTS

    urls, _, _ = ui_stack
    page.goto(_prefect(urls) + "/deployments")
    _see(page, f"{len(DEPLOYMENTS)} Deployments")
    page.shot("prefect-deployments")
    held = {(d["name"], d["flow_id"]): d for d in _api(urls, "/deployments/filter", {})}
    flows = {f["id"]: f["name"] for f in _api(urls, "/flows/filter", {})}
    served = {f"{flows[fid]}/{name}": d for (name, fid), d in held.items()}
    assert set(served) == {d.full_name for d in DEPLOYMENTS}
    for d in DEPLOYMENTS:
        row = (
            page.get_by_role("row")
            .filter(has=page.get_by_text(d.name, exact=True))
            .filter(has=page.get_by_text(d.flow, exact=True))
        )
        row.first.wait_for()
        schedules = [s for s in served[d.full_name]["schedules"] if s["active"]]
        if schedules:
            words = row.first.inner_text()
            assert re.search(r"\bAt \d\d:\d\d|Every ", words), f"{d.full_name}: no schedule in its row: {words!r}"
        page.goto(f"{_prefect(urls)}/deployments/deployment/{served[d.full_name]['id']}")
        _see(page, d.name)
        _see(page, "Triggers")
        if d.trigger is not None:
            _see(page, d.trigger.name)
        page.shot(f"prefect-deployment-{d.flow}-{d.name}")
        page.goto(_prefect(urls) + "/deployments")
        _see(page, f"{len(DEPLOYMENTS)} Deployments")


def test_the_gate_artifact_shows_the_verdict(ui_stack, page):
    urls, _, model = ui_stack
    found = _api(urls, "/artifacts/filter", {"artifacts": {"key": {"any_": [f"gate-{model}"]}}})
    [artifact] = [a for a in found if a["description"].endswith(" v1")]
    page.goto(_prefect(urls) + "/artifacts")
    page.get_by_text(f"gate-{model}", exact=True).first.click()
    page.get_by_role("link", name=artifact["id"][:8]).click()
    _see(page, re.compile(rf"Gate for {model} v1: PASSED"))
    _see(page, "Reasons:")
    _see(page, re.compile("needs ≥"))
    page.shot("prefect-gate-artifact")


def test_the_drift_artifact_states_its_window_and_names_the_report(ui_stack, page):
    urls, _, model = ui_stack
    [artifact] = _api(urls, "/artifacts/filter", {"artifacts": {"key": {"any_": [f"drift-{model}"]}}})
    page.goto(_prefect(urls) + "/artifacts")
    page.get_by_text(f"drift-{model}", exact=True).first.click()
    page.get_by_role("link", name=artifact["id"][:8]).click()
    _see(page, re.compile("^Data drift: "))
    _see(page, "Window (event time):")
    _see(page, "Evidently report:")
    assert "http://" not in artifact["data"]  # no host or port of this machine
    page.shot("prefect-drift-artifact")


# ------------------------------------------------------------------------------------------------------ MLflow
def test_the_registered_model_page_shows_champion_and_challenger(ui_stack, page):
    urls, _, model = ui_stack
    page.goto(f"{_mlflow(urls)}/#/models/{model}")
    _see(page, "Version 1")
    for alias in ("champion", "challenger"):
        _see(page, re.compile(rf"^@?\s*{alias}$"))
    page.shot("mlflow-registered-model")
    page.goto(f"{_mlflow(urls)}/#/models/{model}/versions/1")
    _see(page, "gate_reasons")
    _see(page, re.compile("needs ≥"))
    assert "\\u2265" not in page.inner_text("body")
    page.shot("mlflow-model-version")


def test_the_training_run_shows_f1_in_the_runs_table(ui_stack, page):
    """The experiment's runs page in model-training mode with Flywheel's view: the parent run's row (nested runs
    folded) has its F1, row count and registered version."""
    from mlflow import MlflowClient

    from flywheel.tasks import tracking

    urls, _, model = ui_stack
    client = MlflowClient(urls["mlflow_url"])
    experiment = client.get_experiment_by_name("flywheel")
    found = f"tags.`flywheel.model_name` = '{model}' and tags.`flywheel.registered_version` = '1'"
    [parent] = client.search_runs([experiment.experiment_id], found)
    f1 = parent.data.metrics["holdout_f1"]
    page.goto(f"{_mlflow(urls)}/{tracking.runs_page(experiment.experiment_id)}")
    _see(page, "Model registry")  # the model-training sidebar, not GenAI's
    page.set_viewport_size({"width": 2560, "height": 1000})  # the grid renders only the columns in view
    named = page.get_by_role("row").filter(has=page.get_by_text(parent.info.run_name, exact=True)).first
    named.wait_for()
    _see(page, "holdout_f1")
    # The grid draws a row in parts (the pinned run-name column, the scrolled columns): all parts of its index.
    parts = page.locator(f'[role="row"][row-index="{named.get_attribute("row-index")}"]')
    parts.filter(has_text=str(f1)[:5]).first.wait_for()
    cells = " ".join(parts.all_inner_texts())
    assert str(int(parent.data.metrics["rows"])) in cells and TRAIN_WINDOW[0] in cells, cells
    page.shot("mlflow-runs-table")
    page.goto(f"{_mlflow(urls)}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}")
    _see(page, "holdout_f1")
    page.shot("mlflow-training-run")


def test_the_monitoring_experiment_and_the_evidently_report_open(ui_stack, page):
    """The monitoring experiment opens in model-training mode with its saved view (the drift run on a row, its
    window and drift share), and the report page the verdict names (relative to the MLflow UI) shows Evidently's
    report; the registered model's `last_drift` reads as a sentence."""
    import json

    from mlflow import MlflowClient

    from flywheel.tasks import monitoring, tracking

    urls, _, model = ui_stack
    client = MlflowClient(urls["mlflow_url"])
    experiment = client.get_experiment_by_name("flywheel-monitoring")
    assert experiment.tags[tracking.TAG_EXPERIMENT_KIND] == tracking.KIND_MODEL_TRAINING
    [run] = client.search_runs([experiment.experiment_id], f"tags.`flywheel.model_name` = '{model}'")
    page.goto(f"{_mlflow(urls)}/{tracking.runs_page(experiment.experiment_id, monitoring.MONITORING.view_key)}")
    _see(page, "Model registry")  # the model-training sidebar, not GenAI's
    page.set_viewport_size({"width": 2560, "height": 1000})
    named = page.get_by_role("row").filter(has=page.get_by_text(run.info.run_name, exact=True)).first
    named.wait_for()
    _see(page, "drift_share")
    parts = page.locator(f'[role="row"][row-index="{named.get_attribute("row-index")}"]')
    parts.filter(has_text=run.data.params["window_start"][:10]).first.wait_for()  # the window it checked, on its row
    page.shot("mlflow-monitoring-runs")

    tags = client.get_registered_model(model).tags
    verdict = json.loads(tags["last_drift_json"])
    assert verdict["report"].startswith("#/experiments/") and "{" not in tags["last_drift"], tags["last_drift"]
    page.goto(f"{_mlflow(urls)}/{verdict['report']}")
    _see(page, "drift_report.html")
    _see(page.frame_locator("iframe").first, "Dataset Drift")
    page.shot("mlflow-evidently-report")
