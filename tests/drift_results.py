"""Shared by the unit tests of the drift and retraining decisions (not a test module): a DriftResult as
`measure_drift` returns it, with the fields a test cares about changed."""

from __future__ import annotations

from flywheel.tasks.drift import DriftResult


def drift_result(rows: int = 1000, **changes) -> DriftResult:
    """No dataset drift over `rows` reference and current rows (none sampled), unless `changes` say otherwise."""
    fields = dict(
        dataset_drift=False, drift_share=0.2, drift_share_threshold=0.55, n_drifted=1, n_columns=5, columns=[],
        rows_reference=rows, rows_current=rows, rows_reference_used=rows, rows_current_used=rows, sampled=False,
        sample_cap=50_000,
    )  # fmt: skip
    return DriftResult(**{**fields, **changes})
