"""The plan of one training run (spec, candidates, selection metric, lineage) and its result."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from flywheel.core.errors import UserError
from flywheel.core.names import slug
from flywheel.core.sampling import sample_rows
from flywheel.core.settings import get_settings
from flywheel.core.spec import DatasetSpec
from flywheel.tasks.candidates import CandidateResult, candidate_run_name
from flywheel.tasks.data import DEMO_SCHEME, resolve_spec
from flywheel.tasks.evaluation import confusion_figure
from flywheel.tasks.model_specs import ModelSpec, candidate_set_hash, resolve_model_specs, selection_metric
from flywheel.tasks.training import Split, servable_model


@dataclass
class TrainResult:
    status: str  # "registered" | "unchanged" | "resumed"
    model_name: str
    version: str
    promoted: bool
    data_hash: str  # of the labelled rows: what the model is trained and evaluated on
    rows: int  # labelled rows (training + holdout)
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict | None = None
    window: tuple[str | None, str | None] = (None, None)
    selection_metric: str | None = None
    candidates: list[dict] = field(default_factory=list)  # every candidate of the run, the winner first
    rows_unlabeled: int = 0  # pulled rows without a value in the target: left out of training and evaluation
    warnings: list[str] = field(default_factory=list)  # validation's warnings (e.g. a rare class)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainingPlan:
    """What one training run trains on and how it picks its winner, from the flow's parameters and settings; and
    what it records about that in the registry."""

    model_name: str
    spec: DatasetSpec
    model_specs: list[ModelSpec]
    metric: str
    params_hash: str
    start: str | None
    end: str | None

    @property
    def window(self) -> str:
        return f"{self.start or ''}..{self.end or ''}"

    def run_name(self, data_key: str) -> str:
        return f"{self.model_name}-{data_key[:8]}"

    def lineage_lock(self, data_key: str, code_ver: str) -> str:
        """The lock of this lineage (model, data, candidates and code): one training of it at a time, so the lookup
        of a version with this lineage and its registration are one step two runs cannot both pass."""
        digest = hashlib.sha256(f"{data_key}|{self.params_hash}|{code_ver}".encode()).hexdigest()[:12]
        return f"train-{slug(self.model_name)}-{digest}"

    def parent_params(self, data_key: str, rows: int, rows_unlabeled: int = 0) -> dict[str, Any]:
        return {
            "candidates": ",".join(m.name for m in self.model_specs), "selection_metric": self.metric,
            "params_hash": self.params_hash, "data_hash": data_key, "data_window": self.window, "rows": rows,
            "rows_unlabeled": rows_unlabeled,
        }  # fmt: skip

    def version_tags(
        self, data_key: str, code_ver: str, flow_run_id: str, best: CandidateResult, results: list[CandidateResult],
        rows_unlabeled: int = 0,
    ) -> dict[str, str]:  # fmt: skip
        """The registered version's lineage: data, params and code, where it came from, and how it won."""
        from flywheel.tasks import registry

        return {
            registry.TAG_DATA_HASH: data_key,
            registry.TAG_PARAMS_HASH: self.params_hash,
            registry.TAG_CODE_VERSION: code_ver,
            registry.TAG_FLOW_RUN: flow_run_id,
            registry.TAG_SOURCE: self.spec.source,
            registry.TAG_WINDOW: self.window,
            registry.TAG_ESTIMATOR: best.model_spec.class_path,
            "candidate": best.model_spec.name,
            "candidates": ",".join(r.name for r in results),
            "selection_metric": self.metric,
            "rows_unlabeled": str(rows_unlabeled),
            **{f"metric_{k}": f"{v:.6f}" for k, v in best.metrics.items()},
        }

    def description(
        self, best: CandidateResult, results: list[CandidateResult], rows: int, rows_unlabeled: int = 0
    ) -> str:
        left_out = f" ({rows_unlabeled} without a label left out)" if rows_unlabeled else ""
        return (
            f"{best.model_spec.name} (best of {len(results)} on {self.metric}) on {self.spec.name} "
            f"[{self.start or '…'}, {self.end or '…'}), {rows} rows{left_out}"
        )

    def log_kwargs(
        self, df: pd.DataFrame, parts: Split, best: CandidateResult, data_key: str, run_tags: dict[str, str], settings
    ) -> dict[str, Any]:
        """What `registry.log_candidate` logs with the winner: the model behind its raw-input step, raw rows as its
        examples (the signature is inferred from them), the training frame, the reference and holdout samples (the
        drift check's reference, the deployment's smoke test), plots and its run."""
        spec = self.spec
        sample_cols = [c for c in [*spec.features, spec.target, spec.event_time] if c]
        classifier = spec.task != "regression"
        return dict(
            model=servable_model(best.model, df, spec),
            model_spec=best.model_spec,
            metrics=best.metrics,
            X_example=df.loc[parts.X_test.index[:100], list(parts.X_test.columns)],
            y_example=parts.y_test.head(100),
            training_frame=df[sample_cols],
            reference_sample=sample_rows(df[sample_cols], settings.reference_sample_rows, settings.seed),
            holdout_sample=parts.X_test.assign(**{spec.target: parts.y_test}).head(500),
            dataset_name=spec.name,
            dataset_source=spec.source,
            target=spec.target,
            data_hash=data_key,
            tags={**run_tags, "flywheel.selected": "true"},
            confusion_fig=confusion_figure(best.model, parts.X_test, parts.y_test) if classifier else None,
            experiment=settings.experiment_name,
            run_name=candidate_run_name(best.model_spec, data_key),
            run_id=best.run_id,
        )

    def result(
        self, status: str, version: str, promoted: bool, data_key: str, report: Any, metrics: dict[str, float],
        gate: dict | None = None, candidates: list[dict] | None = None,
    ) -> dict:  # fmt: skip
        """The flow's result (TrainResult as a dict); `report` is validation's (rows, rows without a label)."""
        return TrainResult(
            status, self.model_name, version, promoted, data_key, report.rows_labeled, metrics, gate,
            (self.start, self.end), self.metric, candidates or [], report.rows_unlabeled, list(report.warnings),
        ).as_dict()  # fmt: skip


LINEAGE_LOCK_TIMEOUT = 1800.0  # a training of the same lineage that has not finished in 30 min is stuck


class LineageBusyError(UserError, TimeoutError):
    """Another run has held this lineage's lock for longer than a training may take."""


@contextmanager
def lineage_held(lock: str, timeout_seconds: float = LINEAGE_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lineage lock (a Prefect global concurrency limit of 1, created first and taken strictly, renewed
    while this run lives) for the block: a second identical run waits here and then finds the first's version."""
    from flywheel.tasks import locks

    stack = ExitStack()
    try:
        stack.enter_context(locks.held(lock, timeout_seconds))
    except TimeoutError as exc:
        raise LineageBusyError(
            f"another train run has held lock {lock} (this model, data, candidates and code) for over "
            f"{timeout_seconds:.0f}s; see its concurrency limit in the Prefect UI"
        ) from exc
    with stack:
        yield


@contextmanager
def lineage_unlocked(lock: str, timeout_seconds: float = LINEAGE_LOCK_TIMEOUT) -> Iterator[None]:
    """`lineage_held` without Prefect (the benchmark's bare steps): no lock."""
    yield


def plan_training(
    spec_path: str | None = None,
    data_uri: str | None = None,
    params_path: str | None = None,
    candidates: list[Any] | None = None,
    start: str | None = None,
    end: str | None = None,
    model_name: str | None = None,
) -> TrainingPlan:
    """The plan of a `train` run. The demo source without a window trains on the spec's default window."""
    settings = get_settings()
    model_name = model_name or settings.model_name
    spec = resolve_spec(spec_path, data_uri)
    model_specs = resolve_model_specs(params_path, candidates, spec.task, dataset=spec)
    metric = selection_metric(spec.task, settings.candidate_metric)
    params_hash = candidate_set_hash(model_specs, metric)
    if start is None and end is None and spec.source.startswith(DEMO_SCHEME):
        start, end = spec.default_start, spec.default_end
    return TrainingPlan(model_name, spec, model_specs, metric, params_hash, start, end)
