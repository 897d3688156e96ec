"""The `check-drift` flow: the champion's training sample vs the latest window of serving data (Evidently).

reference = the sample saved with the champion's training run (found through its lineage, so it follows the
champion); current = the latest drift window (the spec's `drift_window`, e.g. a calendar month) of what the model
server scored, by the data's own event time (or any data source given as `current_uri`). With labels, the
champion's quality on recent labelled traffic decides: against the shadow candidate a retraining would make now
(trained on the retrain window before the latest period, both scored on it), else against its own holdout;
without labels, data drift does. A decision to retrain outside the cooldown emits `flywheel.drift.detected`, which
triggers the `train/on-drift` deployment on the spec's `retrain_window`. A champion registered
outside Flywheel has no training sample: the rows it served before the window are its reference (until it has
served enough, the check says so and decides nothing). A multiclass model's predicted-class mix is checked too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger

from flywheel.core.settings import get_settings
from flywheel.core.spec import load_spec
from flywheel.tasks import events, metrics, monitoring, registry, retrain_policy


@flow(name="check-drift", log_prints=True, persist_result=True)  # the demo reads the verdict of a cron run
def check_drift(
    model_name: str | None = None,
    current_uri: str | None = None,
    start: str | None = None,
    end: str | None = None,
    spec_path: str | None = None,
    labels_uri: str | None = None,
) -> dict:
    """Compare the champion's reference with current data; schedule retraining on drift (outside the cooldown).

    `labels_uri` (or the spec's, or FLYWHEEL_LABELS_URI): ground truth that arrived later — a file, folder or s3://
    prefix with `request_id` (and `row` within a request) and the target column — joined to the served rows; the
    champion's quality on them then decides (against its holdout, and the challenger on the same rows), and the
    verdict's `signal` says so."""
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
    labels_uri = labels_uri or spec.labels_uri or s.labels_uri
    evidence = None
    if labels_uri:
        reference, current = monitoring.with_labels(reference, current, spec, champion, labels_uri)
        evidence = monitoring.label_evidence(client, name, spec, champion, current)
        if evidence is not None:  # the candidate a retraining would make now, against the champion
            evidence = retrain_policy.shadow_check(spec, name, champion.version, hi, evidence)
    elif spec.task == "multiclass":
        reference = monitoring.with_predictions(reference, spec, champion)

    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "drift_report.html"
        result = monitoring.measure_drift(reference, current, spec, html, labelled=bool(labels_uri))
        link = monitoring.log_report(result, str(html), name, champion.version, lo, hi)

    decision = monitoring.retrain_decision(client, name, result, hi, spec, evidence)
    retraining = monitoring.schedule_retraining(client, name, result, hi, spec=spec) if decision.retrain else None
    summary = monitoring.verdict(name, champion.version, lo, hi, result, decision, link, retraining)
    summary["labels"] = evidence.as_dict() if evidence else None
    monitoring.record_verdict(client, name, summary)
    logger.info("%s", metrics.push_drift_metrics(name, result))
    events.announce_drift_checked(name, result, lo, hi, summary["retrain"], champion.version)
    monitoring.publish_verdict(name, champion.version, result, link, summary["reasons"], (lo, hi), decision.signal)
    if retraining is None:
        logger.info("no retraining: %s", "; ".join(decision.reasons))
    elif retraining.scheduled:
        logger.info("drift in [%s, %s): retraining scheduled on [%s, %s)", lo, hi, retraining.start, retraining.end)
        summary["retrain_window"] = [retraining.start, retraining.end]
    else:
        logger.error("drift in [%s, %s): retraining not scheduled, its event was not sent: %s", lo, hi,
                     retraining.error)  # fmt: skip
    return summary
