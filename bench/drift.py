"""Drift: `flywheel.tasks.drift.compute_drift` against Evidently's DataDriftPreset on all rows, and against a bare
scipy pass computing the same statistics Evidently picks (the limit).

Evidently 0.7.23 picks a test per column from the reference's size: above 1,000 rows the Wasserstein distance
normed by the reference's standard deviation for numeric columns with more than 5 values, the Jensen-Shannon
distance otherwise (threshold 0.1, drift if the distance is at or above it); at 1,000 rows or fewer the K-S
p-value for numeric columns, chi-squared (Z-test for two values) for categorical ones (drift if p < 0.05). The bare
pass mirrors that choice. The data is flights-like: the real 2013 flights resampled with replacement to the size
asked, reference January–February, current July (drifted) — and January–February again (not drifted) at the
smaller size to check that the verdicts agree both ways. Only the drift computation is timed, in this process;
Evidently's import is a fixed cost.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bench.common import BenchResult, ratio, stopwatch
from bench.fixtures import flights, import_seconds

if TYPE_CHECKING:
    from flywheel.tasks.drift_snapshot import ColumnDrift

TITLE = "compute_drift vs Evidently on all rows vs bare scipy"
DISTANCE_THRESHOLD = 0.1
P_VALUE_THRESHOLD = 0.05
DRIFT_GOAL = 2.0
REFERENCE_MONTHS = (1, 2)
DRIFTED_MONTHS = (7,)


@dataclass
class Verdict:
    """One contender's answer: per-column drift and the dataset verdict."""

    columns: dict[str, bool]
    dataset: bool
    methods: dict[str, str]
    scores: dict[str, float]

    @classmethod
    def of(cls, columns: list[ColumnDrift], dataset: bool) -> Verdict:
        """From flywheel.tasks.drift's per-column results (a DriftResult's, or `parse_columns` of a snapshot)."""
        return cls(
            {c.column: c.drifted for c in columns},
            dataset,
            {c.column: c.method for c in columns},
            {c.column: c.score for c in columns},
        )

    @property
    def share(self) -> float:
        return sum(self.columns.values()) / len(self.columns) if self.columns else 0.0


def agreement(a: Verdict, b: Verdict) -> tuple[int, int, bool]:
    """(columns with the same verdict, columns compared, same dataset verdict)."""
    common = sorted(set(a.columns) & set(b.columns))
    same = sum(a.columns[c] == b.columns[c] for c in common)
    return same, len(common), a.dataset == b.dataset


# --------------------------------------------------------------------------------------------------- bare scipy
def pick_method(reference_rows: int, n_unique: int, kind: str) -> str:
    """The statistic Evidently 0.7.23 picks by default (`_get_default_stattest`): ks, chisquare, z, wasserstein
    or jensenshannon."""
    if kind not in ("numerical", "categorical"):
        raise ValueError(f"kind {kind!r} must be 'numerical' or 'categorical'")
    if reference_rows <= 1000:
        if kind == "numerical" and n_unique > 5:
            return "ks"
        return "chisquare" if n_unique > 2 else "z"
    if kind == "numerical" and n_unique > 5:
        return "wasserstein"
    return "jensenshannon"


def _shares(ref: pd.Series, cur: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each value's share of the rows, over the union of values (Evidently's binning for few-valued columns)."""
    r, c = ref.value_counts(), cur.value_counts()
    keys = r.index.union(c.index)
    return (r.reindex(keys, fill_value=0) / len(ref)).to_numpy(), (c.reindex(keys, fill_value=0) / len(cur)).to_numpy()


def column_statistic(ref: pd.Series, cur: pd.Series, kind: str) -> tuple[str, float, bool]:
    """(method, score, drifted) for one column, the way Evidently computes it; nulls are dropped first."""
    from scipy import stats
    from scipy.spatial import distance

    ref, cur = ref.dropna(), cur.dropna()
    n_unique = pd.concat([ref, cur]).nunique()
    method = pick_method(len(ref), n_unique, kind)
    if method == "wasserstein":
        a, b = ref.to_numpy(dtype="float64"), cur.to_numpy(dtype="float64")
        score = stats.wasserstein_distance(a, b) / max(float(np.std(a)), 0.001)
        return method, float(score), score >= DISTANCE_THRESHOLD
    if method == "jensenshannon":
        if kind == "numerical" and ref.nunique() > 20:  # pragma: no cover - wasserstein takes these
            bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
            p, q = np.histogram(ref, bins)[0] / len(ref), np.histogram(cur, bins)[0] / len(cur)
        else:
            p, q = _shares(ref, cur)
        score = float(distance.jensenshannon(p, q))
        return method, score, score >= DISTANCE_THRESHOLD
    if method == "ks":
        score = float(stats.ks_2samp(ref, cur).pvalue)
        return method, score, score < P_VALUE_THRESHOLD
    p, q = _shares(ref, cur)
    if method == "chisquare":
        keep = p > 0
        score = float(stats.chisquare(q[keep] * len(cur), p[keep] * len(cur) * q[keep].sum() / p[keep].sum()).pvalue)
        return method, score, score < P_VALUE_THRESHOLD
    # z: two-proportion z-test on the first value
    p1, p2, n1, n2 = p[0], q[0], len(ref), len(cur)
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2)) or 1e-12
    score = float(2 * stats.norm.sf(abs(p1 - p2) / se))
    return "z", score, score < P_VALUE_THRESHOLD


def bare_drift(reference: pd.DataFrame, current: pd.DataFrame, kinds: dict[str, str], drift_share: float) -> Verdict:
    columns, methods, scores = {}, {}, {}
    for col, kind in kinds.items():
        methods[col], scores[col], columns[col] = column_statistic(reference[col], current[col], kind)
    share = sum(columns.values()) / len(columns)
    return Verdict(columns, bool(share >= drift_share), methods, scores)


# --------------------------------------------------------------------------------------------------- contenders
def evidently_full(
    reference: pd.DataFrame, current: pd.DataFrame, kinds: dict[str, str], drift_share: float
) -> Verdict:
    """Evidently's DataDriftPreset on every row, called directly; its snapshot read as compute_drift reads one."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from flywheel.tasks.drift_snapshot import parse_columns

    numerical = [c for c, k in kinds.items() if k == "numerical"]
    categorical = [c for c, k in kinds.items() if k == "categorical"]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset(columns=list(kinds), drift_share=drift_share)]).run(
            current_data=Dataset.from_pandas(current, data_definition=definition),
            reference_data=Dataset.from_pandas(reference, data_definition=definition),
        )
        dump = snapshot.dict()
    columns, _, _ = parse_columns(dump, kinds)
    share = sum(c.drifted for c in columns) / len(columns)
    return Verdict.of(columns, bool(share >= drift_share))


def flywheel_drift(
    reference: pd.DataFrame, current: pd.DataFrame, kinds: dict[str, str], drift_share: float
) -> Verdict:
    from flywheel.tasks.drift import compute_drift

    categorical = [c for c, k in kinds.items() if k == "categorical"]
    result = compute_drift(reference, current, list(kinds), drift_share=drift_share, categorical=categorical)
    return Verdict.of(result.columns, result.dataset_drift)


# --------------------------------------------------------------------------------------------------- data
def flights_like(rows: int, months: tuple[int, ...], columns: list[str], seed: int) -> pd.DataFrame:
    """`rows` flights of the given months, resampled with replacement from the real 2013 data."""
    df = flights()
    base = df.loc[df["month"].isin(months), columns]
    return base.sample(n=rows, replace=True, random_state=seed).reset_index(drop=True)


def _kinds() -> dict[str, str]:
    from flywheel.core.spec import load_spec
    from flywheel.tasks.drift import drift_columns

    spec = load_spec()
    return {c: ("categorical" if c in spec.categorical else "numerical") for c in drift_columns(spec)}


def _timed(fn, *args: Any) -> tuple[Verdict, float]:
    with stopwatch() as t:
        out = fn(*args)
    return out, t["seconds"]


def run(quick: bool, root: Path) -> BenchResult:
    from flywheel.tasks.drift import DEFAULT_DRIFT_SHARE, DEFAULT_SAMPLE_CAP

    res = BenchResult("drift", TITLE, quick)
    res.fixed("import evidently (fresh interpreter)", import_seconds("evidently"))
    import evidently  # noqa: F401 - imported here so no timing below pays for it

    sizes = (20_000, 100_000) if quick else (100_000, 1_000_000)
    kinds = _kinds()
    share = DEFAULT_DRIFT_SHARE
    columns = list(kinds)
    # Warm-up: first calls of each path (lazy imports inside Evidently and scipy).
    warm_ref = flights_like(5_000, REFERENCE_MONTHS, columns, 1)
    warm_cur = flights_like(5_000, DRIFTED_MONTHS, columns, 2)
    for fn in (flywheel_drift, evidently_full, bare_drift):
        fn(warm_ref, warm_cur, kinds, share)

    verdicts: dict[tuple[str, int, str], Verdict] = {}
    times: dict[tuple[str, int, str], float] = {}
    scenarios = [("July vs Jan–Feb", DRIFTED_MONTHS)]
    for n in sizes:
        ref = flights_like(n, REFERENCE_MONTHS, columns, 11)
        plan = scenarios + ([("Jan–Feb vs Jan–Feb", REFERENCE_MONTHS)] if n == sizes[0] else [])
        for scenario, months in plan:
            cur = flights_like(n, months, columns, 12)
            for label, fn in (
                ("bare scipy", bare_drift),
                ("compute_drift", flywheel_drift),
                ("Evidently", evidently_full),
            ):
                verdicts[(label, n, scenario)], times[(label, n, scenario)] = _timed(fn, ref, cur, kinds, share)

    drifted = scenarios[0][0]
    for n in sizes:
        for label, note in (
            ("bare scipy", "all rows, the statistics Evidently picks"),
            ("compute_drift", f"samples to {DEFAULT_SAMPLE_CAP:,} rows per side"),
            ("Evidently", "DataDriftPreset on all rows"),
        ):
            res.add(f"{label}, {n:,} rows per side", times[(label, n, drifted)], "s", note=note)
        base = times[("bare scipy", n, drifted)]
        res.add(f"compute_drift / bare scipy at {n:,}", ratio(times[("compute_drift", n, drifted)], base), "×")
        res.add(f"Evidently all rows / bare scipy at {n:,}", ratio(times[("Evidently", n, drifted)], base), "×")
    for (label, n, scenario), v in verdicts.items():
        if label == "bare scipy":
            continue
        same, total, dataset_same = agreement(v, verdicts[("bare scipy", n, scenario)])
        res.add(
            f"verdicts {label} = bare scipy, {scenario}, {n:,} rows",
            same / total,
            "",
            "info",
            f"{same}/{total} columns; dataset verdict {'same' if dataset_same else 'DIFFERENT'} "
            f"({'drift' if v.dataset else 'no drift'}, share {v.share:.2f})",
        )
    big = sizes[-1]
    fly, bare = verdicts[("compute_drift", big, drifted)], verdicts[("bare scipy", big, drifted)]
    same, total, dataset_same = agreement(fly, bare)
    res.goal(f"compute_drift ≤ 2× bare scipy at {big:,} rows", ratio(times[("compute_drift", big, drifted)],
             times[("bare scipy", big, drifted)]), "<=", DRIFT_GOAL)  # fmt: skip
    res.goal(f"same dataset verdict as bare scipy at {big:,} rows", float(dataset_same), ">=", 1.0,
             note=f"{same}/{total} column verdicts agree", unit="")  # fmt: skip
    methods = sorted(set(bare.methods.values()))
    res.notes.append(
        f"Statistics used at {big:,} rows: {', '.join(methods)} (Evidently reports: "
        f"{', '.join(sorted(set(verdicts[('Evidently', big, drifted)].methods.values())))})."
    )
    res.notes.append(
        f"Columns: {', '.join(f'{c} ({k[:3]})' for c, k in kinds.items())}; dataset drift at share ≥ {share}."
    )
    return res
