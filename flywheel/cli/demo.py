"""`flywheel demo`: the closed loop on the embedded default, replayed month by month on the 2013 flights.

Train on January–February → champion → deployed by the alias webhook. Then, for each later month: send that
month's flights to the model server (the request log records them, each batch under its own request id), hand
the loop that month's labels (request id, row, `late`: a flight's delay is known the same day), and run the
`check-drift/cron` deployment, which checks the latest drift window by the data's own event time (a calendar
month in New York) and lets the labels decide; when it schedules retraining, wait for the `train/on-drift` run
and, when its version passes the gate, for the deployment that follows. Everything runs through the real stack (MLflow,
Prefect, bridge, model server); this module only drives it and writes down what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import pandas as pd

from flywheel.core.errors import UserError
from flywheel.core.settings import Settings

FIRST_TRAIN = ("2013-01-01", "2013-03-01")
SUMMARY_JSON = "demo_summary.json"
SUMMARY_PNG = "demo_summary.png"


class DemoError(UserError, RuntimeError):
    """The loop did not do what it should have (a run failed, serving did not follow the champion)."""


@dataclass
class MonthRow:
    """One replayed month. `live_f1` and `champion_holdout_f1` hold the task's primary metric, named in `metric`
    (F1 of the positive class for binary tasks, macro F1 for multiclass, RMSE for regression)."""

    month: str
    rows_sent: int
    serving_errors: int
    live_f1: float | None
    drift_share: float | None
    dataset_drift: bool | None
    retrained: bool
    new_version: str | None
    promoted: bool
    champion_version: str  # the champion after this month's decision (serves the next month)
    champion_holdout_f1: float | None
    note: str = ""
    metric: str = "f1"
    live_champion: str = ""  # the champion that served this month's traffic (whose live metric this is)
    signal: str | None = None  # what decided the retraining: "labels", "data drift" or "none"
    window: str = ""  # the drift check's event-time window
    challenger_gain: float | None = None  # the shadow candidate's gain over the champion on the latest period
    gain_lower: float | None = None  # its lower bound at the policy's confidence (paired bootstrap)


def challenger_gain(labels: dict | None) -> tuple[float | None, float | None]:
    """(gain, lower bound) of the challenger over the champion on the same labelled rows, from a verdict's label
    evidence (higher is better, also for an error metric); (None, None) when none was compared."""
    if not labels or labels.get("challenger_live") is None:
        return None, None
    base = labels.get("champion_same_rows")
    base = labels.get("live") if base is None else base
    gain = labels["challenger_live"] - base
    if labels.get("metric") == "rmse":
        gain = -gain
    return round(gain, 4), labels.get("gain_lower")


METRIC_LABELS = {"f1": "F1", "f1_macro": "macro F1", "rmse": "RMSE"}


def live_score(truth: list, preds: list, spec) -> float | None:
    """Served predictions against the labels on the task's primary metric: F1 of the positive class, macro F1 over
    the classes, or RMSE. Rows without a label are left out; labels compare as text (JSON gives 1 for 1.0)."""
    import numpy as np
    from sklearn import metrics as skm

    from flywheel.tasks.training import positive_label

    y, p = pd.Series(truth, dtype=object), pd.Series(preds, dtype=object)
    known = y.notna().to_numpy()
    y, p = y[known], p[known]
    if y.empty:
        return None
    if spec.task == "regression":
        return float(np.sqrt(skm.mean_squared_error(y.astype(float), p.astype(float))))
    y, p = y.map(_label_text), p.map(_label_text)
    if spec.task == "multiclass":
        return float(skm.f1_score(y, p, average="macro", zero_division=0))
    positive = _label_text(positive_label(pd.Series(truth).dropna(), spec))
    return float(skm.f1_score(y, p, pos_label=positive, zero_division=0))


def _label_text(value) -> str:
    """A label as text, whole-number floats as integers (a JSON 1.0 is the class 1)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _wait(what: str, check: Callable[[], object], timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.HTTPError, ValueError):
            value = None
        if value:
            return value
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


class Loop:
    """The demo's view of a running stack."""

    def __init__(self, settings: Settings, urls: dict[str, str], echo: Callable[[str], None]):
        from mlflow import MlflowClient

        self.s, self.urls, self.echo = settings, urls, echo
        self.name = settings.model_name
        self.client = MlflowClient(tracking_uri=urls["mlflow_url"])
        self.http = httpx.Client(timeout=120)

    # ------------------------------------------------------------------------------------------- registry
    def champion(self):
        try:
            return self.client.get_model_version_by_alias(self.name, "champion")
        except Exception:  # noqa: BLE001 - no model or no alias yet
            return None

    def holdout_f1(self, version, metric: str = "f1") -> float | None:
        """The version's logged holdout metric (F1 by default; the task's primary metric)."""
        if version is None or not version.run_id:
            return None
        return self.client.get_run(version.run_id).data.metrics.get(f"holdout_{metric}")

    def newest_version(self) -> str | None:
        versions = self.client.search_model_versions(f"name = '{self.name}'")
        return max((v.version for v in versions), key=int) if versions else None

    # ------------------------------------------------------------------------------------------- serving
    def served_version(self) -> str | None:
        return self.http.get(self.urls["model_url"] + "/version").json().get("model_version")

    def wait_serving(self, version: str, timeout: float = 300) -> None:
        """Serving follows the champion through webhook → bridge → event → deploy-model; or the deploy fails."""

        def done():
            outcome = self.client.get_model_version(self.name, version).tags.get("deploy_outcome")
            if outcome == "serving" and self.served_version() == version:
                return True  # switched, watched, and in the ledger
            if outcome and outcome != "serving":
                reason = self.client.get_model_version(self.name, version).tags.get("deploy_reason", "")
                raise DemoError(f"v{version} was not deployed ({outcome}): {reason}")
            return False

        _wait(f"the model server to serve v{version}", done, timeout)

    def send(
        self, frame: pd.DataFrame, columns: list[str], spec, batch: int = 500, tag: str = "demo"
    ) -> tuple[int, float | None, pd.DataFrame]:
        """Score the rows through the model server in batches, each under its own request id; (rows that failed,
        the live primary metric against the labels: F1, macro F1 or RMSE, the labels as a user with late ground
        truth would hand them over: request_id, row within the request, target)."""
        target = spec.target
        errors, preds, truth, labels = 0, [], [], []
        for i in range(0, len(frame), batch):
            part = frame.iloc[i : i + batch]
            rid = f"{tag}-{i // batch:05d}"
            body = json.loads(part[columns].to_json(orient="split", index=False, date_format="iso"))
            resp = self.http.post(self.urls["model_url"] + "/invocations",
                                  json={"dataframe_split": body, "params": {"request_id": rid}})  # fmt: skip
            if resp.status_code != 200:
                errors += len(part)
                continue
            preds.extend(resp.json()["predictions"])
            truth.extend(part[target].tolist())
            labels.append(pd.DataFrame({"request_id": rid, "row": range(len(part)), target: part[target].to_numpy()}))
        frame_labels = pd.concat(labels, ignore_index=True) if labels else pd.DataFrame()
        return errors, live_score(truth, preds, spec), frame_labels

    def check_drift(self, labels_uri: str, timeout: float = 600) -> dict:
        """A run of the `check-drift/cron` deployment (its page in the Prefect UI lists it) on the latest drift
        window, with the labels; its verdict (the flow's persisted result, else the `last_drift` tag)."""
        from prefect.deployments import run_deployment

        run = run_deployment("check-drift/cron", parameters={"model_name": self.name, "labels_uri": labels_uri},
                             timeout=timeout)  # fmt: skip
        if run.state is None or not run.state.is_completed():
            state = run.state.name if run.state else "unknown"
            raise DemoError(f"check-drift/cron run {run.name} ended {state}")
        try:
            verdict = run.state.result()
            if isinstance(verdict, dict):
                return verdict
        except Exception:  # noqa: BLE001 - result not reachable from this process: the registry keeps the verdict
            pass
        tags = self.client.get_registered_model(self.name).tags
        for key in ("last_drift_json", "last_drift"):
            try:
                return json.loads(tags.get(key) or "")
            except ValueError:
                continue
        return {}

    def wait_request_log_flushed(self, timeout: float = 60) -> None:
        token = self.s.secret("admin_token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        def flushed():
            state = self.http.get(self.urls["model_url"] + "/admin/state", headers=headers).json()
            return (state.get("request_log") or {}).get("buffered_rows", 1) == 0

        _wait("the request log to reach disk", flushed, timeout, interval=0.5)

    # ------------------------------------------------------------------------------------------- Prefect
    def wait_deployments_idle(self, timeout: float = 180) -> None:
        """No deploy-model run still going (e.g. the challenger's), so stopping the stack cuts none short."""

        def idle():
            resp = self.http.post(
                self.urls["prefect_api_url"] + "/flow_runs/filter",
                json={"flows": {"name": {"any_": ["deploy-model"]}},
                      "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}}},
            )  # fmt: skip
            resp.raise_for_status()
            return not resp.json()

        _wait("the last deployments to finish", idle, timeout)

    def wait_retraining(self, since: float, timeout: float = 900) -> dict:
        """The `train/on-drift` run the drift event started (created after `since`), to its end."""
        api = self.urls["prefect_api_url"]

        def find():
            resp = self.http.post(
                api + "/flow_runs/filter",
                json={"flows": {"name": {"any_": ["train"]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 5},
            )
            resp.raise_for_status()
            fresh = [r for r in resp.json() if pd.Timestamp(r["created"]).timestamp() >= since - 1]
            return fresh[0] if fresh else None

        run = _wait("the drift event to start a train run", find, 120)

        def finished():
            r = self.http.get(f"{api}/flow_runs/{run['id']}").json()
            return r if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        return _wait(f"train run {run['name']} to finish", finished, timeout, interval=2)


def month_bounds(first: str = "2013-03-01", last: str = "2014-01-01", tz: str | None = None) -> list[tuple[str, str]]:
    """Calendar months [start, end): dates in UTC, or ISO times with the offset of `tz` (the data's time zone)."""
    if tz is None:
        starts = pd.date_range(first, last, freq="MS")
        return [(a.strftime("%Y-%m-%d"), b.strftime("%Y-%m-%d")) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    starts = pd.date_range(first, last, freq="MS", tz=tz)
    return [(a.isoformat(), b.isoformat()) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def replay(loop: Loop, months: int | None = None) -> list[MonthRow]:
    from flywheel.core.spec import load_spec
    from flywheel.flows.train import train as train_flow
    from flywheel.stack import local
    from flywheel.tasks import data
    from flywheel.tasks.evaluation import primary_metric

    s, echo = loop.s, loop.echo
    spec = load_spec(s.spec)
    metric = primary_metric(spec.task)
    echo(f"Training {loop.name} on {FIRST_TRAIN[0]} .. {FIRST_TRAIN[1]} ...")
    first = train_flow(start=FIRST_TRAIN[0], end=FIRST_TRAIN[1])
    champion = loop.champion()
    if champion is None:
        raise DemoError(f"the first model did not become champion: {first.get('gate')}")
    loop.wait_serving(champion.version)
    echo(f"v{champion.version} is champion and serves at {loop.urls['model_url']}")

    flights = data.pull_dataset(spec)
    columns = [*spec.numeric, *spec.categorical, spec.event_time]
    labels_dir = local.state_dir(s) / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    rows: list[MonthRow] = []
    for lo, hi in month_bounds(tz=spec.time_zone)[:months]:
        month = data.window(flights, spec.event_time, lo, hi)
        live_champion = champion.version
        errors, live_f1, labels = loop.send(month, columns, spec, tag=lo[:7])
        loop.wait_request_log_flushed()
        labels.to_parquet(labels_dir / f"labels-{lo[:7]}.parquet", index=False)  # late ground truth, by request id
        t0 = time.time()
        # Through the `check-drift/cron` deployment, on the latest window by event time (the month just served);
        # the retraining it schedules goes through the event and `train/on-drift`.
        verdict = loop.check_drift(str(labels_dir))
        window = verdict.get("window") or ["", ""]
        row = MonthRow(
            month=lo[:7], rows_sent=len(month), serving_errors=errors, live_f1=live_f1,
            drift_share=verdict.get("drift_share"), dataset_drift=verdict.get("dataset_drift"),
            retrained=bool(verdict.get("retrain")), new_version=None, promoted=False,
            champion_version=champion.version, champion_holdout_f1=loop.holdout_f1(champion, metric), metric=metric,
            live_champion=live_champion, signal=verdict.get("signal"), window=f"[{window[0]}, {window[1]})",
        )  # fmt: skip
        row.challenger_gain, row.gain_lower = challenger_gain(verdict.get("labels"))
        if row.retrained:
            before = loop.newest_version()
            run = loop.wait_retraining(t0)
            if run["state_type"] != "COMPLETED":
                row.note = f"retraining run {run['name']} ended {run['state_name']}"
            newest = loop.newest_version()
            row.new_version = newest if newest != before else None
            now = loop.champion()
            if now is not None and now.version != champion.version:
                row.promoted, champion = True, now
                loop.wait_serving(champion.version)
                row.champion_version, row.champion_holdout_f1 = champion.version, loop.holdout_f1(champion, metric)
            elif row.new_version:
                gate = loop.client.get_model_version(loop.name, row.new_version).tags.get("gate_reasons", "")
                row.note = row.note or f"v{row.new_version} kept as challenger: {gate[:160]}"
        else:
            row.note = "; ".join(verdict.get("reasons") or [])[:160]
        rows.append(row)
        echo(_format_row(row))
    return rows


def _format_row(r: MonthRow) -> str:
    share = f"{r.drift_share:.2f}" if r.drift_share is not None else "-"
    f1 = f"{r.live_f1:.3f}" if r.live_f1 is not None else "-"
    hf1 = f"{r.champion_holdout_f1:.3f}" if r.champion_holdout_f1 is not None else "-"
    label = METRIC_LABELS.get(r.metric, r.metric)
    return (
        f"{r.month}  served by v{r.live_champion or r.champion_version}  rows {r.rows_sent:>6}  drift {share:>5}  "
        f"decided by {r.signal or '-'}  challenger gain {_gain(r)}  retrained {'yes' if r.retrained else 'no ':3}  "
        f"promoted {'yes' if r.promoted else 'no ':3}  champion v{r.champion_version:<3} holdout {label} {hf1}  "
        f"live {label} {f1}  serving errors {r.serving_errors}"
    )


def _gain(r: MonthRow) -> str:
    """The challenger's gain over the champion and its lower bound, e.g. `+0.021 (>= +0.008)`."""
    if r.challenger_gain is None:
        return "-"
    low = "" if r.gain_lower is None else f" (>= {r.gain_lower:+.3f})"
    return f"{r.challenger_gain:+.3f}{low}"


def summary_table(rows: list[MonthRow]) -> str:
    label = METRIC_LABELS.get(rows[0].metric, rows[0].metric) if rows else "F1"
    head = (
        f"| month | served by | live {label} | drift share | decided by | challenger gain | retrained? | promoted? "
        f"| champion after | holdout {label} | serving errors |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.month} | v{r.live_champion or r.champion_version} "
            f"| {'-' if r.live_f1 is None else f'{r.live_f1:.3f}'} "
            f"| {'-' if r.drift_share is None else f'{r.drift_share:.2f}'} | {r.signal or '-'} | {_gain(r)} "
            f"| {'yes' if r.retrained else 'no'} "
            f"| {'yes' if r.promoted else 'no'} | v{r.champion_version} "
            f"| {'-' if r.champion_holdout_f1 is None else f'{r.champion_holdout_f1:.3f}'} | {r.serving_errors} |"
        )
    return "\n".join(lines)


def chart(rows: list[MonthRow], path: Path, drift_share_threshold: float) -> Path:
    """Drift share and F1 over the months, promotions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = [r.month for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot(months, [r.drift_share or 0 for r in rows], "o-", label="drift share (Evidently)")
    label = METRIC_LABELS.get(rows[0].metric, rows[0].metric) if rows else "F1"
    ax.plot(months, [r.live_f1 or 0 for r in rows], "s-", label=f"live {label} (served predictions vs labels)")
    ax.plot(months, [r.champion_holdout_f1 or 0 for r in rows], "^--", label=f"champion holdout {label}")
    ax.axhline(drift_share_threshold, color="grey", lw=0.8, ls=":", label=f"drift threshold {drift_share_threshold}")
    for i, r in enumerate(rows):
        if r.promoted:
            ax.axvline(i, color="green", alpha=0.3, lw=6)
            ax.annotate(f"v{r.champion_version}", (i, 0.97), ha="center", color="green", fontsize=8)
        elif r.retrained:
            ax.annotate("retrained,\nnot promoted", (i, 0.9), ha="center", color="darkorange", fontsize=7)
    if all(r.metric != "rmse" for r in rows):  # scores in [0, 1]; an RMSE has the target's scale
        ax.set_ylim(0, 1.02)
    ax.set_title("Flywheel demo: drift and quality month by month (green: new champion deployed)")
    ax.legend(loc="lower left", fontsize=8)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def publish(loop: Loop, rows: list[MonthRow], out_dir: Path) -> dict:
    """Summary JSON + PNG in the state dir, the same logged to an MLflow run, a Prefect artifact linking to it."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    from flywheel.tasks import tracking

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"model_name": loop.name, "months": [asdict(r) for r in rows]}
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    png = chart(rows, out_dir / SUMMARY_PNG, loop.s.drift_share)
    mlflow.set_tracking_uri(loop.urls["mlflow_url"])
    experiment = f"{loop.s.experiment_name}-demo"
    note = "Runs of `flywheel demo`: each holds the replay's month-by-month chart and summary (artifacts `demo/`)."
    look = tracking.ExperimentLook(note, "Open the demo runs", "flywheel-demo", ("attributes.`Source`",))
    experiment_id = tracking.ensure_experiment(loop.client, experiment, look)
    source = {tracking.TAG_SOURCE_NAME: "flywheel/cli/demo.py"}  # not this machine's path of the script
    with mlflow.start_run(experiment_id=experiment_id, run_name="demo-replay-2013", tags=source) as run:
        mlflow.log_artifact(str(png), "demo")
        mlflow.log_dict(summary, "demo/summary.json")
        mlflow.log_text(summary_table(rows), "demo/summary.md")
    page = tracking.run_page(experiment_id, run.info.run_id, "demo")  # relative: true on any host and port
    create_markdown_artifact(
        key="flywheel-demo",
        markdown=f"# Flywheel demo: 2013 replay\n\n{summary_table(rows)}\n\nChart and JSON: the MLflow run "
        f"`demo-replay-2013` of experiment `{experiment}`, at `{page}` in the MLflow UI",
        description="Month-by-month replay of the closed loop",
    )
    summary["mlflow_run"] = f"{loop.urls['mlflow_url']}/{page}"  # for the terminal, not stored
    return summary


# The schedules a replay must not meet: an hourly drift check (or the nightly retraining) firing mid-replay works on
# months the demo replays in seconds, and could schedule a retraining the demo never asked for.
PAUSED_DURING_REPLAY = ("check-drift/cron", "train/cron")


@contextlib.contextmanager
def schedules_paused(echo: Callable[[str], None], names: tuple[str, ...] = PAUSED_DURING_REPLAY):
    """Pause the schedules of `names` (Prefect's deployment pause: no new scheduled runs, pending ones deleted;
    runs started by hand still run) for the replay, and resume those this paused when it ends, however it ends.
    One already paused by a person stays paused."""
    from prefect.client.orchestration import get_client

    paused: list[str] = []
    with get_client(sync_client=True) as client:
        for name in names:
            deployment = client.read_deployment_by_name(name)
            if not deployment.paused:
                client.pause_deployment(deployment.id)
                paused.append(name)
    if paused:
        echo(f"Paused the schedules of {', '.join(paused)} while the months replay (resumed at the end).")
    try:
        yield paused
    finally:
        for name in paused:
            try:
                with get_client(sync_client=True) as client:
                    client.resume_deployment(client.read_deployment_by_name(name).id)
            except Exception as exc:  # noqa: BLE001 - the replay's own error (if any) is the one to show
                echo(f"Could not resume the schedule of {name} ({exc}): switch it back on from its page in the "
                     "Prefect UI.")  # fmt: skip


def run_demo(settings: Settings, *, months: int | None, keep: bool, echo: Callable[[str], None] = print) -> dict:
    from prefect.context import refresh_global_settings_context

    from flywheel.stack import local
    from flywheel.stack.supervisor import Stack

    stack = None
    urls = local.running_stack(settings)
    if urls is None:
        # A replay moves through months in seconds: watch each new version's live traffic briefly.
        os.environ.setdefault("FLYWHEEL_DEPLOY_WATCH_SECONDS", "5")
        stack = Stack(settings)
        echo("Starting the stack (MLflow, Prefect, model servers, webhook bridge, deployments) ...")
        urls = stack.start()
    os.environ["MLFLOW_TRACKING_URI"] = urls["mlflow_url"]
    os.environ["PREFECT_API_URL"] = urls["prefect_api_url"]
    refresh_global_settings_context()
    echo(f"MLflow UI: {urls['mlflow_url']}   Prefect UI: {urls['prefect_url']}   model: {urls['model_url']}")
    try:
        loop = Loop(settings, urls, echo)
        with schedules_paused(echo):
            rows = replay(loop, months)
        summary = publish(loop, rows, local.state_dir(settings))
        loop.wait_deployments_idle()
        echo("")
        echo(summary_table(rows))
        echo(
            f"\nSummary: {local.state_dir(settings) / SUMMARY_JSON} and {SUMMARY_PNG}; "
            f"MLflow run {summary['mlflow_run']}"
        )
        if stack is not None and keep:
            echo("The stack stays up for exploring (--keep); Ctrl-C stops it.")
            stack.run_until_signalled()
        return summary
    finally:
        if stack is not None:
            stack.stop()
