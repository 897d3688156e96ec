"""What a training run can get wrong that no server is needed to find: checked by `flywheel train` and `flywheel ci`
before any server starts, so a user's mistake is reported in seconds rather than after half a minute of start-up.

The checks are the `train` flow's own: its plan (`plan_training`: the spec with its source override, the params
file or default model, the selection metric, the demo's default window), then its first two steps as the plain
functions its tasks wrap — pull the data, validate it against the spec. Every source the flow can read is read
here too: a local file, folder or glob, an S3 object or prefix, and the built-in demo table (read in-process in a
second or two; a spec or command-line override can still name a column it lacks). Each mistake raises its
UserError (SpecError, ModelSpecError, DataSourceError, DataValidationError listing every problem). The flow checks
everything again when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flywheel.core.settings import get_settings
from flywheel.tasks.data import TransientSourceError, pull_dataset
from flywheel.tasks.training_run import TrainingPlan, plan_training
from flywheel.tasks.validation import ValidationReport, validate_dataset


@dataclass(frozen=True)
class CheckedInput:
    """The run's plan and the validation of its data; or, when the data could not be reached just now (a
    transient S3 error: the flow's pull retries those), why it was not checked."""

    plan: TrainingPlan
    report: ValidationReport | None = None
    unreachable: str | None = None

    def summary(self) -> str:
        """One line for the user: what was checked, before the servers start."""
        where = self.plan.spec.source
        if self.plan.start or self.plan.end:
            where += f" [{self.plan.start or '…'}, {self.plan.end or '…'})"
        if self.report is None:
            return f"data not checked yet: {self.unreachable} (the train flow retries)"
        return f"data checked: {self.report.rows} rows, {self.report.columns} columns from {where}"


def check_train_input(
    spec_path: str | Path | None = None,
    data_uri: str | None = None,
    params_path: str | Path | None = None,
    start: str | None = None,
    end: str | None = None,
    model_name: str | None = None,
) -> CheckedInput:
    """Plan the run as the `train` flow will, pull its data and validate it; raise the first UserError found (a
    DataValidationError lists all the data's problems)."""
    settings = get_settings()
    plan = plan_training(
        spec_path=str(spec_path) if spec_path else None, data_uri=data_uri,
        params_path=str(params_path) if params_path else None, start=start, end=end, model_name=model_name,
    )  # fmt: skip
    try:
        df = pull_dataset(plan.spec, plan.start, plan.end)
    except TransientSourceError as exc:
        return CheckedInput(plan, unreachable=str(exc))
    report = validate_dataset(df, plan.spec, min_rows=settings.min_rows, max_null_share=settings.max_null_share)
    return CheckedInput(plan, report)
