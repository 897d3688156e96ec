"""Monitoring: the drift check's I/O around tasks/drift.py — the champion's reference, the current window of
serving data, late labels, the monitoring run in MLflow, the verdict on the registered model, and the retraining
it schedules."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.names import slug
from flywheel.core.settings import get_settings
from flywheel.core.spec import DatasetSpec
from flywheel.core.timeutil import to_utc, utc_timestamp
from flywheel.tasks import data, drift, drift_windows, events, registry, retrain_policy, runs, tracking

TAG_LAST_RETRAIN = "last_retrain_scheduled_event_time"
TAG_LAST_DRIFT = "last_drift"  # a sentence a person reads in the registry UI
TAG_LAST_DRIFT_JSON = "last_drift_json"  # the same verdict for code
TAG_LIMIT = 4900  # characters; MLflow keeps at most 5000 in a tag value
PREDICTION = "prediction"  # the request log's prediction column (flywheel.tasks.request_log)
_EVENT_TIME = "%Y-%m-%dT%H:%M:%S"


class DriftCheckError(RuntimeError):
    """No champion, or no usable serving data to compare with."""


def serving_log_dir() -> Path | str:
    """Where the production model server records what it scores (FLYWHEEL_REQUEST_LOG_URI, or the state dir)."""
    return get_settings().request_log_dir("production")


def champion_reference(mlflow_client, name: str):
    """(champion version, the training sample saved with it): what the current data is compared with. The sample
    is None for a champion registered outside Flywheel (see `served_reference`)."""
    champion = registry.get_alias_version(mlflow_client, name, registry.CHAMPION)
    if champion is None:
        raise DriftCheckError(f"{name} has no champion: nothing to check drift against")
    return champion, registry.find_sample(mlflow_client, champion, registry.REFERENCE_ARTIFACT)


def served_reference(spec: DatasetSpec, model_name: str, champion, before) -> pd.DataFrame | None:
    """For a champion with no training sample (registered outside Flywheel): the rows it served itself before the
    checked window, as the request log holds them (prediction included); None while that is fewer than
    FLYWHEEL_DRIFT_MIN_ROWS rows."""
    from flywheel.tasks.request_log import read_request_log

    frame = read_request_log(serving_log_dir(), model_name)
    if frame.empty:
        return None
    frame = frame.loc[frame["model_version"].astype(str) == str(champion.version)]
    time_col = spec.event_time if spec.event_time and spec.event_time in frame.columns else "timestamp"
    frame = frame.loc[to_utc(frame[time_col]) < utc_timestamp(before)].reset_index(drop=True)
    return frame if len(frame) >= get_settings().drift_min_rows else None


def monitored_columns(spec: DatasetSpec, reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """The spec's drift columns; for a served reference (a champion registered outside Flywheel) that lacks some
    of them, the input columns both sides have instead (not the request log's own, the target, the event time
    or `drift_exclude`)."""
    from flywheel.tasks.request_log import META_COLUMNS

    columns = drift.drift_columns(spec)
    if "request_id" not in reference.columns or all(c in reference.columns for c in columns):
        return columns
    skip = {*META_COLUMNS, spec.target, spec.event_time, *spec.drift_exclude}
    return [c for c in reference.columns if c in current.columns and c not in skip and not c.startswith(PREDICTION)]


def no_reference(mlflow_client, name: str, champion: str, lo, hi, rows: int) -> dict:
    """The verdict when there is nothing to compare with yet — a champion registered outside Flywheel (no training
    sample) that has not served enough rows before the window: no drift, no retraining, and why."""
    from prefect.artifacts import create_markdown_artifact

    why = (
        f"not checked: v{champion} has no training sample (registered outside Flywheel) and served fewer than "
        f"{get_settings().drift_min_rows} rows before {lo}; it is compared with its own served rows once it has"
    )
    summary = {
        "checked": False, "model_name": name, "champion": champion, "window": [str(lo), str(hi)],
        "dataset_drift": False, "drift_share": None, "rows": rows, "retrain": False, "reasons": [why], "report": None,
        "quality": None, "quality_decay": None,
    }  # fmt: skip
    record_verdict(mlflow_client, name, summary)
    markdown = f"# Data drift: not checked\n\n**Window (event time):** [{lo}, {hi}), {rows:,} rows.\n\n{why}"
    create_markdown_artifact(key=f"drift-{slug(name)}", markdown=markdown,
                             description=f"Drift check of {name} v{champion}")  # fmt: skip
    return summary


@task(name="load-current-data", cache_policy=NO_CACHE)
def load_current(spec: DatasetSpec, model_name: str, current_uri: str | None, start: str | None, end: str | None):
    """Serving data (or `current_uri`) in [start, end); without bounds, the latest drift window by the data's own
    event time, on clean boundaries of the spec's `drift_window` (a `1 month` window is a calendar month in the
    spec's `time_zone`, ending at the boundary after the last event)."""
    if current_uri:
        frame = data.read_source(current_uri)
    else:
        from flywheel.tasks.request_log import read_request_log

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
    plan = drift_windows.monitoring_plan(spec)
    if end:
        hi = utc_timestamp(end)
    else:
        hi = drift_windows.latest_window(ts.max(), plan.drift_window, plan.time_zone)[1]
    lo = utc_timestamp(start) if start else drift_windows.window_before(hi, plan.drift_window, plan.time_zone)[0]
    window = frame.loc[(ts >= lo) & (ts < hi)].reset_index(drop=True)
    return window, lo, hi


def champion_predictions(reference: pd.DataFrame, spec: DatasetSpec, champion) -> pd.DataFrame:
    """The reference with the champion's own predictions on it (a served reference already has them)."""
    if PREDICTION in reference.columns:
        return reference
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{champion.name}/{champion.version}")
    features = reference[spec.features].astype({c: "float64" for c in spec.numeric})  # as the model was trained
    return reference.assign(**{PREDICTION: list(model.predict(features))})


@task(name="predict-reference", cache_policy=NO_CACHE)
def with_predictions(reference: pd.DataFrame, spec: DatasetSpec, champion) -> pd.DataFrame:
    """The champion's predictions on its reference sample: a multiclass model's predicted-class mix drifts too."""
    return champion_predictions(reference, spec, champion)


LABEL_ROW = "row"  # a label's row within its request (0-based), for requests of many rows


def _join_labels(frame: pd.DataFrame, labels: pd.DataFrame, target: str, which: str, labels_uri: str):
    if "request_id" not in frame.columns or PREDICTION not in frame.columns:
        raise drift.DriftDataError(f"{which} data has no request_id/prediction columns to join labels to")
    keys = ["request_id"]
    if LABEL_ROW in labels.columns:  # the served row's position in its request, as the request log keeps them
        frame = frame.assign(**{LABEL_ROW: frame.groupby("request_id", sort=False).cumcount()})
        keys.append(LABEL_ROW)
    joined = frame.drop(columns=[target], errors="ignore").merge(labels, on=keys, how="inner")
    if joined.empty:
        raise drift.DriftDataError(f"no label in {labels_uri} matches a served request id in the {which} window")
    return joined


@task(name="join-labels", cache_policy=NO_CACHE)
def with_labels(reference: pd.DataFrame, current: pd.DataFrame, spec: DatasetSpec, champion, labels_uri: str):
    """Served rows that have a label (joined by request id, and by `row` within the request when the labels
    carry it), and the champion's own predictions on its reference
    sample, so Evidently compares its quality then and now. A served reference (a champion registered outside
    Flywheel) gets its labels by request id too."""
    labels = data.read_source(labels_uri)
    missing = {"request_id", spec.target} - set(labels.columns)
    if missing:
        raise drift.DriftDataError(f"labels at {labels_uri} lack column(s) {sorted(missing)}")
    keys = ["request_id", LABEL_ROW] if LABEL_ROW in labels.columns else ["request_id"]
    labels = labels[[*keys, spec.target]].drop_duplicates(keys, keep="last")
    joined = _join_labels(current, labels, spec.target, "current", labels_uri)
    if spec.target not in reference.columns:
        reference = _join_labels(reference, labels, spec.target, "reference", labels_uri)
    return champion_predictions(reference, spec, champion), joined


def measure_drift(
    reference: pd.DataFrame, current: pd.DataFrame, spec: DatasetSpec, html_path: Path, labelled: bool
) -> drift.DriftResult:
    """Evidently on the spec's drift columns with the configured thresholds; quality too when `labelled`. For a
    multiclass model the predicted class is a drift column as well (when the reference carries the champion's
    predictions, see `with_predictions`)."""
    s = get_settings()
    predicted = labelled or spec.task == "multiclass"
    return drift.compute_drift(
        reference, current, monitored_columns(spec, reference, current), drift_share=s.drift_share,
        sample_cap=s.drift_sample_cap, seed=s.seed, min_rows=s.drift_min_rows, html_path=html_path,
        categorical=spec.categorical, target=spec.target if labelled else None,
        prediction=PREDICTION if predicted else None, task=spec.task, pos_label=spec.positive_class,
    )  # fmt: skip


MONITORING = tracking.ExperimentLook(
    note="Drift checks of Flywheel's `check-drift` flow. Each run is one check of a champion: the window it "
    "checked (`window_start`, `window_end`, event time), the drift share, how many columns drifted and how many "
    "rows it compared; its artifacts hold Evidently's HTML report (`drift/drift_report.html`) and the summary.",
    link_text="Open the drift checks",
    view_key="flywheel-monitoring",
    columns=("tags.`flywheel.model_version`", "params.`window_start`", "params.`window_end`", "metrics.`drift_share`",
             "metrics.`n_drifted`", "metrics.`rows`"),
)  # fmt: skip
REPORT_ARTIFACT = "drift/drift_report.html"


def monitoring_experiment() -> str:
    return f"{get_settings().experiment_name}-monitoring"


@task(name="log-drift-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 5])
def log_report(result, html_path: str, model_name: str, version: str, lo, hi) -> str:
    """A monitoring run in MLflow, linked to the champion version, holding the Evidently HTML report, in the
    monitoring experiment (opened like the training one: model-training mode, a description, a saved view). The
    report's page in the MLflow UI, relative to the UI (true on any host and port)."""
    mlflow_client = registry.client()
    experiment_id = tracking.ensure_experiment(mlflow_client, monitoring_experiment(), MONITORING)
    tags = {"flywheel.model_name": model_name, "flywheel.model_version": str(version), "flywheel.kind": "drift"}
    run_id = tracking.start_run(mlflow_client, experiment_id, f"drift-{model_name}-v{version}-{lo:%Y%m%d}", tags,
                                source="flows/check_drift.py")  # fmt: skip
    page = tracking.run_page(experiment_id, run_id, REPORT_ARTIFACT)
    found = "dataset drift" if result.dataset_drift else "no dataset drift"
    note = (f"Drift check of **{model_name} v{version}** over [{lo}, {hi}) (event time): {found}, "
            f"{result.n_drifted} of {result.n_columns} columns drifted (share {result.drift_share:.0%}), "
            f"{result.rows_current:,} rows. [Evidently report]({page})")  # fmt: skip
    try:
        tracking.log_run_data(
            mlflow_client, run_id, params={"window_start": str(lo), "window_end": str(hi), "sampled": result.sampled},
            metrics={"drift_share": result.drift_share, "n_drifted": result.n_drifted, "rows": result.rows_current},
            tags={tracking.TAG_NOTE: note},
        )  # fmt: skip
        mlflow_client.log_artifact(run_id, html_path, artifact_path="drift")
        mlflow_client.log_dict(run_id, result.as_dict(), "drift/summary.json")
    except BaseException:
        tracking.end_run(mlflow_client, run_id, "FAILED")
        raise
    tracking.end_run(mlflow_client, run_id)
    return page


def label_evidence(mlflow_client, name: str, spec: DatasetSpec, champion, labelled: pd.DataFrame):
    """The label signal (retrain_policy.LabelEvidence): the champion's primary metric on the labelled rows it
    served itself, against its own logged holdout value; and, where a challenger other than the champion exists,
    both scored on those same rows."""
    from flywheel.tasks.evaluation import primary_metric, score_predictions

    metric = primary_metric(spec.task)
    rows = labelled.loc[labelled["model_version"].astype(str) == str(champion.version)] if (
        "model_version" in labelled.columns) else labelled  # fmt: skip
    if rows.empty:
        rows = labelled
    rows = rows.loc[rows[spec.target].notna()].reset_index(drop=True)
    if rows.empty:
        return None
    live = score_predictions(rows[spec.target], rows[PREDICTION], spec)
    holdout = registry.version_metrics(mlflow_client, champion).get(metric)
    tolerance = spec.label_tolerance if spec.label_tolerance is not None else retrain_policy.DEFAULT_LABEL_TOLERANCE
    ev = retrain_policy.LabelEvidence(metric, len(rows), str(champion.version), live, holdout, tolerance)
    challenger = registry.get_alias_version(mlflow_client, name, registry.CHALLENGER)
    if challenger is not None and str(challenger.version) != str(champion.version):
        try:
            model = registry.load_sklearn_model(name, challenger.version)
            X = rows[spec.features].astype({c: "float64" for c in spec.numeric})
            ev.challenger_version = str(challenger.version)
            ev.challenger_live = score_predictions(rows[spec.target], model.predict(X), spec)
            ev.champion_same_rows = live
        except Exception:  # noqa: BLE001 - a challenger that cannot score these rows gives no comparison
            ev.challenger_version = None
    return ev


def retrain_decision(
    mlflow_client, name: str, result: drift.DriftResult, hi: pd.Timestamp, spec: DatasetSpec | None = None,
    labels: retrain_policy.LabelEvidence | None = None,
) -> retrain_policy.RetrainDecision:  # fmt: skip
    """`retrain_policy.should_retrain` with the cooldown read from the registry and its length from the spec
    (settings as fallback), the thresholds from settings, the label signal when given, and whether a training run
    of this model is already in flight."""
    s = get_settings()
    plan = drift_windows.monitoring_plan(spec) if spec is not None else None
    last = mlflow_client.get_registered_model(name).tags.get(TAG_LAST_RETRAIN)
    return retrain_policy.should_retrain(
        result,
        now_event_time=hi,
        last_retrain_event_time=utc_timestamp(last) if last else None,
        cooldown=plan.cooldown if plan else s.retrain_cooldown_days,
        min_rows=s.drift_min_rows,
        in_flight=runs.train_in_flight(name),
        labels=labels,
        time_zone=plan.time_zone if plan else "UTC",
    )


@dataclass
class Retraining:
    """The retraining a drift check scheduled: its window, and why not when its event could not be sent."""

    start: str
    end: str
    error: str | None = None

    @property
    def scheduled(self) -> bool:
        return self.error is None


def schedule_retraining(
    mlflow_client, name: str, result: drift.DriftResult, hi: pd.Timestamp, send: Callable[..., object] | None = None,
    spec: DatasetSpec | None = None,
) -> Retraining:  # fmt: skip
    """Send the drift event that retrains on the spec's `retrain_window` (FLYWHEEL_RETRAIN_WINDOW_DAYS without one)
    before `hi`, then start the cooldown (`send` is `events.request_retraining` unless given).

    The cooldown tag is set only once the event is sent: set before a send that fails, it would block retraining
    for the whole cooldown with nothing scheduled. An unsent event leaves no tag, so the next check tries again.
    """
    if spec is not None:
        plan = drift_windows.monitoring_plan(spec)
        lo = drift_windows.window_before(hi, plan.retrain_window, plan.time_zone)[0]
    else:
        lo = drift_windows.window_before(hi, drift_windows.parse_period(get_settings().retrain_window_days))[0]
    start, end = lo.strftime(_EVENT_TIME), utc_timestamp(hi).strftime(_EVENT_TIME)
    try:
        (send or events.request_retraining)(name, start, end, result.drift_share)
    except Exception as exc:  # any failure to send: nothing is scheduled
        return Retraining(start, end, error=f"{type(exc).__name__}: {exc}")
    mlflow_client.set_registered_model_tag(name, TAG_LAST_RETRAIN, hi.isoformat())
    return Retraining(start, end)


def verdict(
    name: str,
    champion: str,
    lo,
    hi,
    result: drift.DriftResult,
    decision: retrain_policy.RetrainDecision,
    link: str,
    retraining: Retraining | None,
) -> dict:
    """What the check found and decided, as the flow returns it and the registry keeps it (`last_drift`). A
    retraining whose event was not sent is no retraining, and the reasons say so."""
    reasons = list(decision.reasons)
    if retraining is not None and not retraining.scheduled:
        reasons.append(f"retraining event not sent ({retraining.error}): no cooldown started, the next check retries")
    return {
        "model_name": name, "champion": champion, "window": [str(lo), str(hi)],
        "dataset_drift": result.dataset_drift, "drift_share": result.drift_share, "rows": result.rows_current,
        "retrain": decision.retrain and (retraining is None or retraining.scheduled), "reasons": reasons,
        "report": link, "quality": result.quality, "quality_decay": result.quality_decay,
        "signal": decision.signal,
    }  # fmt: skip


def drift_sentence(summary: dict) -> str:
    """One line a person reads for a verdict (`verdict` or `no_reference`): what was found, over which window,
    against which champion, and whether retraining was scheduled and why."""
    found = {True: "dataset drift", False: "no dataset drift"}.get(summary.get("dataset_drift"), "no verdict")
    if summary.get("checked") is False:
        found = "not checked"
    parts = [found]
    window = summary.get("window")
    if isinstance(window, list | tuple) and len(window) == 2:
        parts.append(f"over [{window[0]}, {window[1]})")
    if summary.get("rows") is not None:
        rows = summary["rows"]
        parts.append(f"on {rows:,} rows" if isinstance(rows, int) else f"on {rows} rows")
    if summary.get("champion"):
        parts.append(f"against champion v{summary['champion']}")
    text = " ".join(parts)
    share = summary.get("drift_share")
    if isinstance(share, int | float):
        text += f" (drift share {share:.0%})"
    if summary.get("signal") and summary["signal"] != retrain_policy.SIGNAL_NONE:
        text += f"; decided by {summary['signal']}"
    retrain = "retraining scheduled" if summary.get("retrain") else "no retraining"
    reasons = "; ".join(str(r) for r in summary.get("reasons") or [])
    return f"{text}; {retrain}" + (f" — {reasons}" if reasons else "")


def verdict_json(summary: dict) -> str:
    """The verdict as JSON that fits a tag whole (valid JSON, not cut mid-way): the label evidence, the quality
    figures and then the reasons give way first when it is too long."""
    fitted = dict(summary)
    text = json.dumps(fitted, ensure_ascii=False, default=str)
    for key in ("labels", "quality", "reasons"):
        if len(text) <= TAG_LIMIT:
            break
        fitted[key] = None if key != "reasons" else [_clip(r, 300) for r in (fitted.get(key) or [])][:5]
        text = json.dumps(fitted, ensure_ascii=False, default=str)
    return text if len(text) <= TAG_LIMIT else json.dumps({k: fitted.get(k) for k in (
        "model_name", "champion", "window", "dataset_drift", "drift_share", "rows", "retrain", "report", "signal")},
        ensure_ascii=False, default=str)  # fmt: skip


def _clip(text, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def record_verdict(mlflow_client, name: str, summary: dict) -> None:
    """The verdict on the registered model: `last_drift` a sentence (what the registry UI and `flywheel status`
    show), `last_drift_json` the same verdict for code."""
    mlflow_client.set_registered_model_tag(name, TAG_LAST_DRIFT_JSON, verdict_json(summary))
    mlflow_client.set_registered_model_tag(name, TAG_LAST_DRIFT, _clip(drift_sentence(summary), TAG_LIMIT))


def publish_verdict(
    name: str, champion: str, result: drift.DriftResult, link: str, reasons: list[str], window=None,
    signal: str | None = None,
) -> None:  # fmt: skip
    """The verdict as a Prefect markdown artifact of the flow run: the window checked, what was found, and which
    signal decided."""
    from prefect.artifacts import create_markdown_artifact

    decided = f" (decided by {signal})" if signal else ""
    report = (f"\n\n**Evidently report:** the monitoring run's `{REPORT_ARTIFACT}` in MLflow experiment "
              f"`{monitoring_experiment()}`, at `{link}` in the MLflow UI" if link else "")  # fmt: skip
    found = drift.drift_markdown(result, None, window=window, reference=f"champion v{champion}'s reference")
    create_markdown_artifact(
        key=f"drift-{slug(name)}",
        markdown=f"{found}\n\n**Retrain{decided}:** " + "; ".join(reasons) + report,
        description=f"Drift check of {name} v{champion}",
    )
