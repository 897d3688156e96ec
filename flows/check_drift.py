"""The `check-drift` flow: the champion's training sample vs the latest window of serving data (Evidently).

reference = the sample saved with the champion's training run (found through its lineage, so it follows the
champion); current = the latest `drift_window_days` of what the model server scored, by the data's own event
time (or any data source given as `current_uri`). Drift outside the cooldown schedules retraining by emitting
`flywheel.drift.detected`, which triggers the `train/on-drift` deployment on a rolling window.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pandas as pd
from flywheel.tasks import data, drift, registry
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from flywheel.core.events import DRIFT_CHECKED_EVENT, DRIFT_EVENT
from flywheel.core.names import slug
from flywheel.core.settings import get_settings
from flywheel.core.spec import DatasetSpec, load_spec
from flywheel.core.timeutil import to_utc

TAG_LAST_RETRAIN = "last_retrain_scheduled_event_time"
TAG_LAST_DRIFT = "last_drift"


class DriftCheckError(RuntimeError):
    """No champion, or no usable serving data to compare with."""


def serving_log_dir() -> Path | str:
    """Where the production model server records what it scores (FLYWHEEL_REQUEST_LOG_URI, or the state dir)."""
    s = get_settings()
    return (
        f"{s.request_log_uri.rstrip('/')}/production" if s.request_log_uri else s.state_path / "serving" / "production"
    )


@task(name="load-current-data", cache_policy=NO_CACHE)
def load_current(spec: DatasetSpec, model_name: str, current_uri: str | None, start: str | None, end: str | None):
    """Serving data (or `current_uri`) in [start, end); without bounds, the latest drift window by event time."""
    if current_uri:
        frame = data.read_source(current_uri)
    else:
        from flywheel.model_server import read_request_log

        frame = read_request_log(serving_log_dir(), model_name)
    if frame is None or frame.empty:
        where = current_uri or f"the model server's request log ({serving_log_dir()})"
        raise drift.DriftDataError(f"no current data in {where}: nothing has been scored yet")
    time_col = spec.event_time if spec.event_time and spec.event_time in frame.columns else "timestamp"
    if time_col not in frame.columns:
        raise drift.DriftDataError(
            f"current data has neither the event_time column '{spec.event_time}' nor a timestamp"
        )
    ts = to_utc(frame[time_col])
    if ts.notna().sum() == 0:
        raise drift.DriftDataError(f"current data has no readable event times in '{time_col}'")
    hi = pd.Timestamp(end, tz="UTC") if end else ts.max() + pd.Timedelta(microseconds=1)
    lo = pd.Timestamp(start, tz="UTC") if start else hi - pd.Timedelta(days=get_settings().drift_window_days)
    window = frame.loc[(ts >= lo) & (ts < hi)].reset_index(drop=True)
    return window, lo, hi


async def _train_in_flight(model_name: str) -> bool:
    from flywheel.tasks.runs import in_flight
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        runs = await in_flight(client, "train")
    return any((r.parameters.get("model_name") or get_settings().model_name) == model_name for r in runs)


PREDICTION = "prediction"  # the request log's prediction column (flywheel.request_log)


@task(name="join-labels", cache_policy=NO_CACHE)
def with_labels(reference: pd.DataFrame, current: pd.DataFrame, spec: DatasetSpec, champion, labels_uri: str):
    """Served rows that have a label (joined by request id), and the champion's own predictions on its reference
    sample, so Evidently compares its quality then and now."""
    import mlflow

    labels = data.read_source(labels_uri)
    missing = {"request_id", spec.target} - set(labels.columns)
    if missing:
        raise drift.DriftDataError(f"labels at {labels_uri} lack column(s) {sorted(missing)}")
    if "request_id" not in current.columns or PREDICTION not in current.columns:
        raise drift.DriftDataError("current data has no request_id/prediction columns to join labels to")
    labels = labels[["request_id", spec.target]].drop_duplicates("request_id", keep="last")
    joined = current.drop(columns=[spec.target], errors="ignore").merge(labels, on="request_id", how="inner")
    if joined.empty:
        raise drift.DriftDataError(f"no label in {labels_uri} matches a served request id in the window")
    model = mlflow.pyfunc.load_model(f"models:/{champion.name}/{champion.version}")
    features = reference[spec.features].astype({c: "float64" for c in spec.numeric})  # as the model was trained
    reference = reference.assign(**{PREDICTION: list(model.predict(features))})
    return reference, joined


@task(name="log-drift-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 5])
def log_report(result, html_path: str, model_name: str, version: str, lo, hi) -> str:
    """A monitoring run in MLflow, linked to the champion version, holding the Evidently HTML report."""
    import mlflow

    mlflow.set_experiment(f"{get_settings().experiment_name}-monitoring")
    with mlflow.start_run(
        run_name=f"drift-{model_name}-v{version}-{lo:%Y%m%d}",
        tags={"flywheel.model_name": model_name, "flywheel.model_version": str(version), "flywheel.kind": "drift"},
    ) as run:
        mlflow.log_metrics({"drift_share": result.drift_share, "n_drifted": result.n_drifted})
        mlflow.log_params({"window_start": str(lo), "window_end": str(hi), "sampled": result.sampled})
        mlflow.log_artifact(html_path, artifact_path="drift")
        mlflow.log_dict(result.as_dict(), "drift/summary.json")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return (
        f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        if uri.startswith("http")
        else run.info.run_id
    )


def drift_metrics(name: str, result, checked_at: float):
    """The verdict as Prometheus gauges (what infra/'s dashboard and alert rules read)."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    labels = {"model": name}
    Gauge("flywheel_drift_share", "Share of drifted columns in the last check", ["model"], registry=reg).labels(
        **labels
    ).set(result.drift_share)
    Gauge("flywheel_drift_detected", "1 when the last check found dataset drift", ["model"], registry=reg).labels(
        **labels
    ).set(1 if result.dataset_drift else 0)
    Gauge(
        "flywheel_drift_last_check_timestamp_seconds", "When the last drift check ran (Unix time)", ["model"],
        registry=reg,
    ).labels(**labels).set(checked_at)  # fmt: skip
    return reg


def push_drift_metrics(name: str, result) -> str:
    """Push the gauges to the Prometheus Pushgateway at FLYWHEEL_PUSHGATEWAY_URL (a batch job has no endpoint of
    its own to scrape); without one configured, say so and go on."""
    import time

    from prometheus_client import push_to_gateway

    url = get_settings().pushgateway_url
    if not url:
        return "no Pushgateway configured (FLYWHEEL_PUSHGATEWAY_URL): drift metrics not pushed"
    try:
        push_to_gateway(
            url, job="flywheel-drift", grouping_key={"model": name}, registry=drift_metrics(name, result, time.time())
        )
    except OSError as exc:  # monitoring must not fail the check
        return f"could not push drift metrics to {url}: {exc}"
    return f"drift metrics pushed to {url}"


@flow(name="check-drift", log_prints=True)
def check_drift(
    model_name: str | None = None,
    current_uri: str | None = None,
    start: str | None = None,
    end: str | None = None,
    spec_path: str | None = None,
    labels_uri: str | None = None,
) -> dict:
    """Compare the champion's reference with current data; schedule retraining on drift (outside the cooldown).

    `labels_uri` (or FLYWHEEL_LABELS_URI): ground truth that arrived later — a file, folder or s3:// prefix with
    `request_id` and the target column — joined to the served rows by request id; the check then also measures
    the champion's quality on them (Evidently's classification/regression preset) and a decay counts as drift."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    logger = get_run_logger()
    s = get_settings()
    name = model_name or s.model_name
    spec = load_spec(spec_path or s.spec)
    client = registry.client()
    champion = registry.get_alias_version(client, name, registry.CHAMPION)
    if champion is None:
        raise DriftCheckError(f"{name} has no champion: nothing to check drift against")
    reference = registry.load_reference_sample(client, champion)
    current, lo, hi = load_current(spec, name, current_uri, start, end)
    columns = drift.drift_columns(spec)
    labels_uri = labels_uri or s.labels_uri
    target = prediction = None
    if labels_uri:
        reference, current = with_labels(reference, current, spec, champion, labels_uri)
        target, prediction = spec.target, PREDICTION

    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "drift_report.html"
        result = drift.compute_drift(
            reference, current, columns, drift_share=s.drift_share, sample_cap=s.drift_sample_cap,
            seed=s.seed, min_rows=s.drift_min_rows, html_path=html, categorical=spec.categorical,
            target=target, prediction=prediction, task=spec.task, pos_label=spec.positive_class,
        )  # fmt: skip
        link = log_report(result, str(html), name, champion.version, lo, hi)

    last = client.get_registered_model(name).tags.get(TAG_LAST_RETRAIN)
    decision = drift.should_retrain(
        result,
        now_event_time=hi,
        last_retrain_event_time=pd.Timestamp(last) if last else None,
        cooldown=timedelta(days=s.retrain_cooldown_days),
        min_rows=s.drift_min_rows,
        in_flight=run_coro_as_sync(_train_in_flight(name)),
    )
    summary = {
        "model_name": name, "champion": champion.version, "window": [str(lo), str(hi)],
        "dataset_drift": result.dataset_drift, "drift_share": result.drift_share, "rows": result.rows_current,
        "retrain": decision.retrain, "reasons": decision.reasons, "report": link,
        "quality": result.quality, "quality_decay": result.quality_decay,
    }  # fmt: skip
    client.set_registered_model_tag(name, TAG_LAST_DRIFT, json.dumps(summary)[:4900])
    logger.info("%s", push_drift_metrics(name, result))

    emit_event(  # every verdict, for alerts; the resource label lets an automation match drift only
        event=DRIFT_CHECKED_EVENT,
        resource={
            "prefect.resource.id": f"flywheel.model.{name}",
            "prefect.resource.name": name,
            "flywheel.dataset_drift": str(bool(result.dataset_drift)).lower(),
        },
        payload={"model_name": name, "drift_share": round(result.drift_share, 4), "start": str(lo), "end": str(hi),
                 "retrain": decision.retrain, "champion": champion.version},
    )  # fmt: skip
    create_markdown_artifact(
        key=f"drift-{slug(name)}",
        markdown=drift.drift_markdown(result, link) + "\n\n**Retrain:** " + "; ".join(decision.reasons),
        description=f"Drift check of {name} v{champion.version}",
    )
    if decision.retrain:
        train_start = (hi - pd.Timedelta(days=s.retrain_window_days)).strftime("%Y-%m-%dT%H:%M:%S")
        train_end = hi.strftime("%Y-%m-%dT%H:%M:%S")
        client.set_registered_model_tag(name, TAG_LAST_RETRAIN, hi.isoformat())
        emit_event(
            event=DRIFT_EVENT,
            resource={"prefect.resource.id": f"flywheel.model.{name}", "prefect.resource.name": name},
            payload={"model_name": name, "start": train_start, "end": train_end, "drift_share": result.drift_share},
        )
        logger.info("drift in [%s, %s): retraining scheduled on [%s, %s)", lo, hi, train_start, train_end)
        summary["retrain_window"] = [train_start, train_end]
    else:
        logger.info("no retraining: %s", "; ".join(decision.reasons))
    return summary
