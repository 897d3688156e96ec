"""The pure decisions of a deployment, free of I/O so a test can call them: which alias move wins (coalescing),
how big the smoke test is and what it proves, and whether the post-switch watch holds.

The watch compares like with like. A request refused as bad input (parse or schema error, a 4xx of the request's
own making) never counts. A prediction that fails counts against the new version only beyond the previous
version's own error rate on the traffic before the switch: a client sending input that both versions refuse
cannot veto a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# Each alone and all as one batch. A row alone through pyfunc costs 5-15 ms of CPU on the demo's boosted-trees
# pipeline (MLflow's schema enforcement + a ColumnTransformer + the trees), so the alone rows are what the smoke test
# costs: 60 rows keep it under a second and still mean something stated in the ledger (no error in 60 rows rules
# out an error rate above 4.9% at 95% confidence). The batch of the same rows costs a few ms.
SMOKE_ROWS = 60
SMOKE_CONFIDENCE = 0.95


class Counts(NamedTuple):
    """A serving slot's request counters (the model server's /admin/state)."""

    requests: int = 0
    errors: int = 0  # the prediction failed after the input passed the schema (model faults, PREDICTION_FAILED)
    rejected: int = 0  # refused as bad input (parse or schema errors): the request's own making

    @property
    def scored(self) -> int:
        """Requests that reached the model (refused input left out)."""
        return max(0, self.requests - self.rejected)

    def minus(self, earlier: Counts) -> Counts:
        return Counts(*(max(0, a - b) for a, b in zip(self, earlier, strict=True)))

    def rate(self) -> float:
        return self.errors / self.scored if self.scored else 0.0


def zero_failure_bound(rows: int, confidence: float = SMOKE_CONFIDENCE) -> float:
    """The error rate that `rows` rows without a failure rule out at `confidence` (1 - (1-c)^(1/n); ~3/n)."""
    return 1.0 - (1.0 - confidence) ** (1.0 / rows) if rows > 0 else 1.0


def smoke_sample_note(rows: int) -> str:
    """The smoke test's sample size and what it proves, as the ledger states it."""
    return (f"{rows} rows, each alone and all as one batch; no error in {rows} rows rules out an error rate above "
            f"{zero_failure_bound(rows):.1%} at {SMOKE_CONFIDENCE:.0%} confidence")  # fmt: skip


def shared_smoke_errors(new_errors: int, old_errors: int | None) -> int:
    """Smoke-test errors that count against the new version: those beyond what the previous version gets on the
    very same rows (None: no previous version to try them on, so all count)."""
    return new_errors if old_errors is None else max(0, new_errors - old_errors)


WATCH_RULE = (
    "requests refused as bad input never count; a failed prediction counts only beyond the previous version's "
    "error rate on the traffic before the switch; the watch breaches when, over at least {min} scored requests, "
    "the new version's error rate exceeds that baseline by more than {limit:.1%}"
)


@dataclass(frozen=True)
class WatchVerdict:
    breached: bool
    note: str  # what was seen, in the ledger's words


def watch_rule(max_excess: float, min_requests: int) -> str:
    return WATCH_RULE.format(min=min_requests, limit=max_excess)


def baseline_of(window: Counts | None, lifetime: Counts | None, min_requests: int) -> tuple[Counts | None, str]:
    """The previous version's counts to compare with, and what they are: the requests it scored while this
    deployment ran (the traffic just before the switch) when there are enough, else all it scored while active."""
    if window is not None and window.scored >= min_requests:
        return window, "just before the switch"
    if lifetime is not None and lifetime.scored > 0:
        return lifetime, "while it served"
    return None, ""


def watch_verdict(
    new: Counts,
    baseline: Counts | None,
    *,
    max_excess: float,
    min_requests: int,
    previous: str | None = None,
    baseline_what: str = "",
) -> WatchVerdict:
    """Whether the new version's live error rate (`new`, counted since the switch) breaches the rule above against
    the previous version's (`baseline`; None for a first deployment or a previous version that scored nothing,
    when the baseline rate is 0)."""
    base_rate = baseline.rate() if baseline is not None else 0.0
    seen = f"{new.scored} scored requests, {new.errors} failed ({new.rate():.1%})"
    if new.rejected:
        seen += f", {new.rejected} refused as bad input (not counted)"
    if baseline is not None and previous:
        seen += (f"; v{previous} {baseline_what or 'before'}: {baseline.errors} of {baseline.scored} failed "
                 f"({base_rate:.1%})")  # fmt: skip
    elif previous:
        seen += f"; v{previous} scored nothing to compare with (baseline 0%)"
    breached = new.scored >= min_requests and new.rate() - base_rate > max_excess
    if breached:
        return WatchVerdict(True, f"breach: {seen}; excess {new.rate() - base_rate:.1%} > {max_excess:.1%}")
    return WatchVerdict(False, f"held: {seen}")


@dataclass(frozen=True)
class Move:
    """What a deploy-model run does with the move it was started for."""

    action: str  # deploy | superseded | already-serving | ignored
    version: str
    reason: str


def coalesce(
    event_version: str, alias_version: str | None, serving_version: str | None, *, alias: str, trigger: str
) -> Move:
    """Moves of one model and alias coalesce: the registry's alias now is the latest move, and only a run for it
    deploys. A run for an older move ends at once as superseded (the run for the latest move deploys that); a run
    for what already serves ends as already-serving. A manual run deploys the version it was asked for."""
    v = str(event_version)
    if trigger == "manual":
        if serving_version == v and alias_version == v:
            return Move("already-serving", v, f"v{v} already serves '{alias}'")
        return Move("deploy", v, f"manual deployment of v{v} to '{alias}'")
    if alias_version is None:
        return Move("superseded", v, f"superseded: alias '{alias}' no longer exists (the event was for v{v})")
    if alias_version != v:
        return Move("superseded", v, f"superseded: '{alias}' moved on to v{alias_version} since the event for v{v}; "
                                     f"the run for that move deploys it")  # fmt: skip
    if serving_version == v:
        return Move("already-serving", v, f"v{v} already serves '{alias}'")
    return Move("deploy", v, f"'{alias}' points at v{v}")
