"""MLflow tracking: Flywheel's experiments (opened in the UI's model-training mode, with their descriptions), the
train flow's parent run and the nested runs under it, and what the parent run shows a person once it closes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.tasks.registry import RETRIES, client

# MLflow 3's UI reads the experiment kind from this tag: `custom_model_development` opens it in the classic
# machine-learning view (runs table, model registry), not the GenAI one (traces). The values are the UI's own
# (ExperimentKind in mlflow/server/js); the Python package has no constant for them.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
KIND_MODEL_TRAINING = "custom_model_development"
TAG_NOTE = "mlflow.note.content"  # an experiment's or run's description in the UI (markdown)
TAG_SOURCE_NAME, TAG_SOURCE_TYPE = "mlflow.source.name", "mlflow.source.type"
TRAIN_SOURCE = "flows/train.py"  # a run's source: a relative name, not this machine's path

# A saved runs-table view (MLflow's "shared view": the UI loads it from the experiment tag
# `mlflow.sharedViewState.<key>` for a page opened with `viewStateShareKey=<key>`): the columns a person reads on each
# top-level row, so a training's F1 is on its row without choosing columns or expanding nested runs.
VIEW_KEY = "flywheel-training"
VIEW_METRICS = ("f1", "roc_auc", "f1_macro", "rmse", "r2")  # metrics of every task
VIEW_COLUMNS = (
    "attributes.`Source`", *(f"metrics.`holdout_{m}`" for m in VIEW_METRICS),
    "metrics.`rows`", "params.`data_window`", "tags.`flywheel.registered_version`",
)  # fmt: skip

EXPERIMENT_NOTE = (
    "Training runs of Flywheel's `train` flow. Each top-level run is one training: its metrics are the winning "
    "candidate's holdout metrics (`holdout_f1`, ...), its params the data window, row count and candidates, and "
    "its tags link the registered model version. Expand a run to see every candidate as a nested run."
)


@dataclass(frozen=True)
class ExperimentLook:
    """How an experiment of Flywheel opens in the MLflow UI: its description, the link text to its runs table,
    and that table's saved view (`view_key`, `columns`)."""

    note: str
    link_text: str
    view_key: str
    columns: tuple[str, ...]


TRAINING = ExperimentLook(EXPERIMENT_NOTE, "Open the training runs with their metrics", VIEW_KEY, VIEW_COLUMNS)


def runs_page(experiment_id: str, view_key: str = VIEW_KEY) -> str:
    """The experiment's runs table in the MLflow UI's model-training mode with a saved view, relative to the UI.
    MLflow 3.17's UI picks GenAI or model-training mode from a global toggle (GenAI by default) or this page's
    `workflowType`, not from the experiment's kind tag, so links to it carry the mode."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={view_key}"


def run_page(experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page in the MLflow UI (opened on `artifact`, a path in its artifacts, when given), relative to the
    UI: true on any host and port."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/artifacts/{artifact}" if artifact else page


def experiment_tags(experiment_id: str, look: ExperimentLook = TRAINING) -> dict[str, str]:
    note = f"{look.note}\n\n[{look.link_text}]({runs_page(experiment_id, look.view_key)})"
    view = json.dumps({"selectedColumns": list(look.columns)})
    return {TAG_EXPERIMENT_KIND: KIND_MODEL_TRAINING, TAG_NOTE: note, f"mlflow.sharedViewState.{look.view_key}": view}


def ensure_experiment(mlflow_client, name: str, look: ExperimentLook = TRAINING) -> str:
    """The id of the named experiment, created if missing (safe when two flows create it at once), tagged as a
    model-training experiment with `look`'s description and saved view; an existing experiment gets the tags it
    lacks (a description a person wrote is kept)."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            mlflow_client.create_experiment(name, tags={TAG_EXPERIMENT_KIND: KIND_MODEL_TRAINING})
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        found = mlflow_client.get_experiment_by_name(name)
    wanted = experiment_tags(found.experiment_id, look)
    have = found.tags or {}
    for key, value in wanted.items():
        if have.get(key) != value and not (key == TAG_NOTE and have.get(key)):
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def start_run(
    mlflow_client, experiment_id: str, run_name: str, tags: dict[str, Any], parent_run_id: str | None = None,
    source: str = TRAIN_SOURCE,
) -> str:  # fmt: skip
    """Create a RUNNING run from the flow file `source` (relative to the repository); with `parent_run_id` it is
    nested under that run (the `mlflow.parentRunId` tag that `mlflow.start_run(nested=True)` sets). The client API
    keeps no active-run state, so threads and Dask workers can each open their own nested run under one parent."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run_tags = {TAG_SOURCE_NAME: source, TAG_SOURCE_TYPE: "JOB", **{k: str(v) for k, v in tags.items()}}
    if parent_run_id:
        run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return mlflow_client.create_run(experiment_id, tags=run_tags, run_name=run_name).info.run_id


def log_run_data(
    mlflow_client,
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    """Params, metrics and tags of a run in one request."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    mlflow_client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def end_run(mlflow_client, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client.set_terminated(run_id, status=status)


def version_page(model_name: str, version: str) -> str:
    """The registered version's page in the MLflow UI, relative to the UI (true on any host and port)."""
    from urllib.parse import quote

    return f"#/models/{quote(model_name, safe='')}/versions/{version}"


def parent_summary(
    model_name: str, version: str, best_name: str, best_run_id: str | None, metrics: dict[str, float],
    window: str, rows: int, metric: str,
) -> tuple[dict[str, float], dict[str, str]]:  # fmt: skip
    """What the parent run shows once its winner is registered: the winner's holdout metrics (so the runs table has
    F1 on the row a person sees, nested runs folded), the row count as a metric too (sortable), and tags naming the
    winner, the data window and the registered version with a link to its page and a description that says it."""
    page = version_page(model_name, version)
    value = metrics.get(metric)
    shown = f"{metric} {value:.4f}" if isinstance(value, int | float) else metric
    note = (
        f"Registered **[{model_name} v{version}]({page})** (`models:/{model_name}/{version}`): candidate "
        f"`{best_name}`, {shown} on the holdout; trained on {rows} rows, data window `{window}`."
    )
    tags = {
        "flywheel.best_candidate": best_name,
        "flywheel.best_run_id": best_run_id or "",
        "flywheel.registered_model": model_name,
        "flywheel.registered_version": version,
        "flywheel.registered_model_uri": f"models:/{model_name}/{version}",
        "flywheel.registered_version_page": page,
        "flywheel.data_window": window,
        "flywheel.rows": str(rows),
        TAG_NOTE: note,
    }
    return {**{f"holdout_{k}": v for k, v in metrics.items()}, "rows": float(rows)}, tags


# --------------------------------------------------------------------------------------------------- tasks
@task(name="open-parent-run", cache_policy=NO_CACHE, **RETRIES)
def open_parent_run(experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> tuple[str, str]:
    """The flow's parent MLflow run, under which every candidate logs a nested run: (experiment id, run id)."""
    mlflow_client = client()
    experiment_id = ensure_experiment(mlflow_client, experiment)
    run_id = start_run(mlflow_client, experiment_id, run_name, tags)
    log_run_data(mlflow_client, run_id, params=params)
    return experiment_id, run_id


@task(name="close-run", cache_policy=NO_CACHE, **RETRIES)
def close_run(
    run_id: str, status: str = "FINISHED", tags: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> None:  # fmt: skip
    mlflow_client = client()
    if tags or metrics:
        log_run_data(mlflow_client, run_id, tags=tags, metrics=metrics)
    end_run(mlflow_client, run_id, status)


@contextmanager
def parent_run(
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    *,
    opener: Callable[..., tuple[str, str]] = open_parent_run,
    closer: Callable[..., None] = close_run,
) -> Iterator[tuple[str, str, dict[str, str], dict[str, float]]]:
    """The flow's parent MLflow run: (experiment id, run id, tags and metrics to log when it closes); it ends
    FAILED if the block raises, else FINISHED. Opened and closed by the tasks above, or by the callables given
    (their `.fn` outside Prefect)."""
    experiment_id, run_id = opener(experiment, run_name, tags, params)
    on_close: dict[str, str] = {}
    closing_metrics: dict[str, float] = {}
    try:
        yield experiment_id, run_id, on_close, closing_metrics
    except BaseException:
        closer(run_id, "FAILED", on_close, closing_metrics)
        raise
    closer(run_id, "FINISHED", on_close, closing_metrics)
