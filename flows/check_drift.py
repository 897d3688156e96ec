"""The `check-drift` flow: the champion's training sample vs the latest window of serving data (Evidently).

reference = the sample saved with the champion's training run (found through its lineage, so it follows the
champion); current = the latest `drift_window_days` of what the model server scored, by the data's own event
time (or any data source given as `current_uri`). Drift outside the cooldown schedules retraining by emitting
`flywheel.drift.detected`, which triggers the `train/on-drift` deployment on a rolling window. A champion registered
outside Flywheel has no training sample: the rows it served before the window are its reference (until it has
served enough, the check says so and decides nothing). A multiclass model's predicted-class mix is checked too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger

from flywheel.core.settings import get_settings
from flywheel.core.spec import load_spec
from flywheel.tasks import events, metrics, monitoring, registry


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
    logger = get_run_logger()
    s = get_settings()
    name = model_name or s.model_name
    spec = load_spec(spec_path or s.spec)
    client = registry.client()
    champion, reference = monitoring.champion_reference(client, name)
    current, lo, hi = monitoring.load_current(spec, name, current_uri, start, end)
    if reference is None:  # registered outside Flywheel: what it served itself before the window is the reference
        reference = monitoring.served_reference(spec, name, champion, lo)
        if reference is None:
            return monitoring.no_reference(client, name, champion.version, lo, hi, len(current))
    labels_uri = labels_uri or s.labels_uri
    if labels_uri:
        reference, current = monitoring.with_labels(reference, current, spec, champion, labels_uri)
    elif spec.task == "multiclass":
        reference = monitoring.with_predictions(reference, spec, champion)

    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "drift_report.html"
        result = monitoring.measure_drift(reference, current, spec, html, labelled=bool(labels_uri))
        link = monitoring.log_report(result, str(html), name, champion.version, lo, hi)

    decision = monitoring.retrain_decision(client, name, result, hi)
    retraining = monitoring.schedule_retraining(client, name, result, hi) if decision.retrain else None
    summary = monitoring.verdict(name, champion.version, lo, hi, result, decision, link, retraining)
    monitoring.record_verdict(client, name, summary)
    logger.info("%s", metrics.push_drift_metrics(name, result))
    events.announce_drift_checked(name, result, lo, hi, summary["retrain"], champion.version)
    monitoring.publish_verdict(name, champion.version, result, link, summary["reasons"])
    if retraining is None:
        logger.info("no retraining: %s", "; ".join(decision.reasons))
    elif retraining.scheduled:
        logger.info("drift in [%s, %s): retraining scheduled on [%s, %s)", lo, hi, retraining.start, retraining.end)
        summary["retrain_window"] = [retraining.start, retraining.end]
    else:
        logger.error("drift in [%s, %s): retraining not scheduled, its event was not sent: %s", lo, hi,
                     retraining.error)  # fmt: skip
    return summary
