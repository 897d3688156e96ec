"""Rollout: the steps that take one registered version to the target serving an alias, blue/green — which target,
which move wins (flywheel.tasks.verdicts.coalesce), package → load beside the serving version → health + smoke
test (the standby), the post-switch watch (outside the deployment lock, ended early by a newer move), and moving
the alias back when the version does not stay."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flywheel.core.errors import UserError
from flywheel.core.settings import Settings, get_settings
from flywheel.tasks import events, ledger, locks, registry, serving, verdicts
from flywheel.tasks.packaging import package
from flywheel.tasks.verdicts import SMOKE_ROWS, Counts, Move

if TYPE_CHECKING:
    import pandas as pd

WATCHED_ALIASES = (registry.CHAMPION, registry.CHALLENGER)
WATCH_MIN_REQUESTS = 20  # scored requests before the watch may call a breach
WATCH_TICK_SECONDS = 1.0  # how often the watch reads the counters and looks for a newer move
BREACH_LOCK_SECONDS = 30.0  # a breach waits this long for the deployment lock before switching back
# Where a smoke test's rows come from: (what they are, a reader giving a frame or None), tried in order.
SmokeSource = tuple[str, Callable[[], "pd.DataFrame | None"]]


def target_for(alias: str) -> serving.LocalTarget:
    """`champion` serves production traffic; `challenger` goes to the staging server. With
    `FLYWHEEL_DEPLOY_TARGET=docker` each version predicts in its own container behind that server."""
    s = get_settings()
    url = s.serving_url if alias == registry.CHAMPION else s.staging_url
    role = "production" if alias == registry.CHAMPION else "staging"
    if s.deploy_target == "docker":
        return serving.DockerTarget(url=url, admin_token=s.secret("admin_token"), model_name=s.model_name, role=role,
                                    name="docker" if role == "production" else "docker-staging")  # fmt: skip
    name = "local" if alias == registry.CHAMPION else "staging"
    return serving.LocalTarget(url=url, admin_token=s.secret("admin_token"), name=name)


def not_served_here(name: str, alias: str) -> dict | None:
    """The flow's answer when this move deploys nothing here (another registered model, or an alias no target
    serves); None when it does."""
    logger = get_run_logger()
    s = get_settings()
    if name != s.model_name:  # an event about another registered model: nothing of it is ever loaded here
        logger.info("'%s' is not the model served here ('%s'): ignored", name, s.model_name)
        return {"outcome": "ignored", "reason": f"{name} is not served here ({s.model_name})"}
    if alias not in WATCHED_ALIASES:
        logger.info("alias '%s' is not deployed anywhere (watched: %s)", alias, ", ".join(WATCHED_ALIASES))
        return {"outcome": "ignored", "alias": alias}
    return None


def latest_move(name: str, version: str, alias: str, trigger: str, target: serving.LocalTarget) -> Move:
    """The coalescing decision (verdicts.coalesce) from the registry's alias and what the target serves now."""
    client = registry.client()
    current = registry.get_alias_version(client, name, alias)
    # serves: active the way this target serves it (docker: not in-process after a model server restart)
    same = current is not None and current.version == str(version)
    serving_version = str(version) if same and target.serves(str(version)) else None
    return verdicts.coalesce(str(version), current.version if current else None, serving_version,
                             alias=alias, trigger=trigger)  # fmt: skip


@task(name="resolve-version", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 5])
def resolve_version(name: str, version: str, alias: str, trigger: str, target: serving.LocalTarget) -> Move:
    """Under the deployment lock: what this run does (verdicts.coalesce). A manual run moves the alias to the
    asked version first; a run for a move the alias has since left is superseded."""
    client = registry.client()
    client.get_model_version(name, str(version))  # raises for a version that is not in this registry
    move = latest_move(name, str(version), alias, trigger, target)
    if move.action == "deploy" and trigger == "manual":
        current = registry.get_alias_version(client, name, alias)
        if current is None or current.version != str(version):
            registry.set_alias(client, name, alias, str(version))
            return Move("deploy", str(version), f"manual deployment moved '{alias}' to v{version}")
    return move


def moved_on(name: str, alias: str, version: str) -> str | None:
    """Why `version` is no longer the latest move of `alias` (a newer move supersedes it), or None."""
    current = registry.get_alias_version(registry.client(), name, alias)
    if current is None:
        return f"alias '{alias}' was removed"
    return f"'{alias}' moved on to v{current.version}" if current.version != str(version) else None


def end_early(move: Move, name: str, alias: str):
    """The final state of a run that deploys nothing: Completed, named after what happened (`Superseded`,
    `AlreadyServing`), with the reason as its message; no ledger row, no alert."""
    from prefect.states import Completed

    _logger().info("%s", move.reason)
    state_name = {"superseded": "Superseded", "already-serving": "AlreadyServing"}.get(move.action, "Ignored")
    result = {"outcome": move.action, "version": move.version, "name": name, "alias": alias, "reason": move.reason}
    return Completed(name=state_name, message=move.reason[:500], data=result)


def _logger():
    """The run's logger inside Prefect, the module's outside (plain calls in tests)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


def first_input(sources: Iterable[SmokeSource]) -> tuple[str, pd.DataFrame | None, list[str]]:
    """(what, rows, what was looked for and not found) of the first source that gives rows; later sources are
    never read. `rows` is None when none does."""
    missing: list[str] = []
    for what, read in sources:
        frame = read()
        if frame is not None and len(frame) > 0:
            return what, frame, missing
        missing.append(what)
    return "", None, missing


def served_rows(name: str, rows: int = SMOKE_ROWS) -> pd.DataFrame | None:
    """The latest rows the production model server scored in the last drift window (the request log), as they
    were sent: inputs only, the log's own columns (prediction, timestamp, version, request id) dropped."""
    import pandas as pd

    from flywheel.tasks.request_log import META_COLUMNS, PREDICTION_COLUMN, read_request_log

    s = get_settings()
    since = pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=s.drift_window_days)
    try:
        frame = read_request_log(s.request_log_dir("production"), name, start=since)
    except Exception as exc:  # an unreachable log is no fault of the version: the next source is tried
        _logger().warning("request log unreadable for the smoke test (%s: %s)", type(exc).__name__, exc)
        return None
    if frame.empty:
        return None
    logged = set(META_COLUMNS) | {c for c in frame.columns if c == PREDICTION_COLUMN or
                                  c.startswith(PREDICTION_COLUMN + "_")}  # fmt: skip
    inputs = frame.drop(columns=[c for c in frame.columns if c in logged]).tail(rows).reset_index(drop=True)
    clashed = {c: c.removeprefix("input_") for c in inputs.columns if c.removeprefix("input_") in logged}
    return inputs.rename(columns=clashed)


# What never changes for a registered version (its MLmodel's inputs, its holdout sample), read once per process: the
# warm executor runs every deployment in one process, and these downloads were half a second of every move. The key
# holds the version's run and source, so a model deleted and registered again (its numbers start over) is read anew.
_PER_VERSION: dict[tuple, Any] = {}
_PER_VERSION_MAX = 64


def _per_version(kind: str, mv, read: Callable[[], Any]) -> Any:
    import mlflow

    key = (kind, mlflow.get_registry_uri(), mv.name, str(mv.version), mv.run_id, str(mv.source))
    if key not in _PER_VERSION:
        if len(_PER_VERSION) >= _PER_VERSION_MAX:
            _PER_VERSION.pop(next(iter(_PER_VERSION)))
        _PER_VERSION[key] = read()
    return _PER_VERSION[key]


def _model_version(client, name: str, version: str):
    """The registered version; None when it is gone."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise


def _sample_of(client, name: str, version: str) -> pd.DataFrame | None:
    """A version's holdout sample; None when it has none or the version is gone."""
    mv = _model_version(client, name, version)
    if mv is None:
        return None
    return _per_version("holdout", mv, lambda: registry.find_sample(client, mv, registry.HOLDOUT_ARTIFACT))


def _inputs_of(client, name: str, version: str) -> registry.ModelInputs:
    """The version's signature columns and input example (registry.model_inputs), read once per version."""
    mv = _model_version(client, name, version)
    if mv is None:  # gone: model_inputs says so
        return registry.model_inputs(name, version)
    return _per_version("inputs", mv, lambda: registry.model_inputs(name, version))


def smoke_sources(client, name: str, version: str, champion: str | None, example) -> list[SmokeSource]:
    """The first input found for any version of the model: its own holdout sample; else the current champion's;
    else the latest window of served data; else the version's own input example."""
    sources: list[SmokeSource] = [(f"v{version}'s holdout sample", lambda: _sample_of(client, name, version))]
    if champion and str(champion) != str(version):
        sources.append((f"the champion v{champion}'s holdout sample", lambda: _sample_of(client, name, champion)))
    sources.append(("the latest served rows", lambda: served_rows(name)))
    sources.append((f"v{version}'s input example", lambda: example))
    return sources


def champion_for_smoke(client, name: str, alias: str, previous: str | None, version: str) -> str | None:
    """The champion whose holdout sample a version without its own is tried on: for a `champion` deployment the
    version serving until now (the alias already points at the new one), else the `champion` alias."""
    if alias == registry.CHAMPION:
        champion = previous
    else:
        found = registry.get_alias_version(client, name, registry.CHAMPION)
        champion = found.version if found is not None else None
    return str(champion) if champion and str(champion) != str(version) else None


@task(name="smoke-test", cache_policy=NO_CACHE)
def smoke_test(
    target: serving.LocalTarget, name: str, version: str, champion: str | None = None
) -> serving.SmokeResult:
    """Predictions on the standby slot, before any traffic moves, on the first input found (`smoke_sources`), as
    the version's own signature says (no Flywheel tag needed: a version registered outside Flywheel works too).
    Rows that fail are tried on the version serving now too: those it also refuses are the input's fault and do
    not count (verdicts.shared_smoke_errors). The result says which rows it tried (`source`)."""
    s = get_settings()
    t0 = time.perf_counter()
    client = registry.client()
    inputs = _inputs_of(client, name, version)
    what, frame, missing = first_input(smoke_sources(client, name, version, champion, inputs.example))
    if frame is None:
        return serving.SmokeResult(ok=False, rows=0, error_rate=0.0, p50_ms=0.0, source="nothing",
                                   reason="no input to try it on (none found: " + ", ".join(missing) + ")")  # fmt: skip
    known = inputs.columns if inputs.columns and set(inputs.columns) & set(frame.columns) else None
    records = serving.records_for_smoke(frame, known or list(frame.columns), rows=SMOKE_ROWS)  # none known: as is
    result = target.smoke(records, max_error_rate=s.smoke_max_error_rate, max_p50_ms=s.smoke_max_p50_ms)
    result.source = f"{len(records)} rows of {what}" + (f" (none found: {', '.join(missing)})" if missing else "")
    if result.errors and target.active_version() not in (None, str(version)):
        excused = _excused_by_previous(target, records, result, s.smoke_max_error_rate, s.smoke_max_p50_ms)
        result.source += excused
    result.seconds = time.perf_counter() - t0
    _logger().info(
        "smoke test of v%s: %d rows (%s), error rate %.1f%%, p50 %.1f ms, batch %s, %.2f s: %s",
        version, result.rows, what, 100 * result.error_rate, result.p50_ms, "ok" if result.batch_ok else "failed",
        result.seconds, "passed" if result.ok else "FAILED",
    )  # fmt: skip
    return result


def _excused_by_previous(target, records, result: serving.SmokeResult, max_error_rate: float, max_p50: float) -> str:
    """Try the rows on the serving (previous) version; when it fails at least as many, the new version's failures
    are the input's and its smoke test passes on its latency alone. What the ledger says about it."""
    old = target.smoke(records, max_error_rate=1.0, max_p50_ms=10**9, slot="active")
    counted = verdicts.shared_smoke_errors(result.errors, old.errors)
    if counted / max(1, result.rows) > max_error_rate:
        return f"; the serving version fails {old.errors} of them"
    latency_ok = result.p50_ms <= max_p50
    result.ok, result.error_rate = latency_ok, counted / max(1, result.rows)
    result.reason = "" if latency_ok else f"p50 latency {result.p50_ms:.1f} ms > {max_p50:.1f} ms"
    return f"; {result.errors - counted} failing rows also fail on the serving version (input errors, not counted)"


def smoke_note(smoke: serving.SmokeResult) -> str:
    """The smoke test in the ledger's words: which rows it tried, its figures and sample size, what failed."""
    if smoke.rows == 0:
        return f"smoke test not run: {smoke.reason}"
    figures = f"error rate {smoke.error_rate:.1%}, p50 {smoke.p50_ms:.0f} ms"
    sample = verdicts.smoke_sample_note(smoke.rows)
    if smoke.ok:
        return f"smoke test passed on {smoke.source}, {figures} ({sample})"
    return f"smoke test failed on {smoke.source}: {smoke.failure_kind()}: {smoke.reason} ({figures})"


def kubernetes_step(name: str, version: str, pkg, s: Settings) -> None:
    """Blue/green manifests for the version, always rendered into its package; applied (new color, rollout, then
    the Service switch) only with `FLYWHEEL_DEPLOY_TARGET=kubernetes`, a kubectl context and a built image."""
    import yaml

    logger = get_run_logger()
    client = registry.client()
    live = client.get_registered_model(name).tags.get("k8s_live_color")
    path, color = serving.render_kubernetes(name, version, pkg.image_tag, pkg.context_dir, live_color=live,
                                            namespace=s.kubernetes_namespace)  # fmt: skip
    if s.deploy_target != "kubernetes":
        return
    context = serving.kubectl_context()
    if context is None or not pkg.image_id:
        why = "no kubectl context" if context is None else f"no image ({pkg.engine})"
        logger.warning("kubernetes target: %s; manifests rendered at %s, not applied", why, path)
        return
    with open(path, encoding="utf-8") as fh:
        deployment = next(yaml.safe_load_all(fh))["metadata"]["name"]
    logger.info("%s", serving.apply_blue_green(path, deployment, s.kubernetes_namespace))
    client.set_registered_model_tag(name, "k8s_live_color", color)


def relative_to_state(path: str, s: Settings) -> str:
    """A path in the state dir as the ledger records it: relative to that dir (no machine's absolute path)."""
    try:
        return str(Path(path).resolve().relative_to(s.state_path.resolve()))
    except ValueError:
        return Path(path).name


def stage(rec: ledger.DeploymentRecord, target: serving.LocalTarget) -> ledger.DeploymentRecord:
    """Package the version, load it beside the serving one and smoke-test it there; no traffic moves. A failure
    sets the record's outcome (`failed`, `failed-smoke`) and reason; the outcome stays `pending` when it passed."""
    s = get_settings()
    name, version = rec.model_name, rec.version
    try:
        with locks.held(locks.package_lock(name), timeout_seconds=1800):
            pkg = package(name, version, str(s.state_path / "packages"), s.build_images)
        rec.context, rec.image = relative_to_state(pkg.context_dir, s), pkg.image_id or f"not built: {pkg.engine}"
        kubernetes_step(name, version, pkg, s)
        if isinstance(target, serving.DockerTarget) and not pkg.image_id:
            raise serving.TargetError(f"the docker target runs image {pkg.image_tag} and there is none: {pkg.engine}")
        loaded = target.load(version)
        rec.container, slot = loaded.get("container"), loaded.get("loaded") or {}
        rec.engine, rec.engine_reason = slot.get("engine"), slot.get("compiled")  # onnxruntime or pyfunc, and why
        champion = champion_for_smoke(registry.client(), name, rec.alias, rec.previous_version, version)
        smoke = smoke_test(target, name, version, champion)
    except Exception as exc:  # anything before the switch: the version never serves
        rec.outcome, rec.reason = "failed", f"{type(exc).__name__}: {exc}"
        return rec
    rec.reason = smoke_note(smoke)
    if not smoke.ok:
        rec.outcome = "failed-smoke"
    return rec


def move_alias_back(name: str, alias: str, previous: str | None, version: str) -> str:
    client = registry.client()
    if previous == version:  # it kept serving throughout: the alias is right as it is
        return f"v{version} keeps serving as before"
    if previous:
        registry.set_alias(client, name, alias, previous)
        return f"'{alias}' moved back to v{previous}"
    client.delete_registered_model_alias(name, alias)
    return f"'{alias}' removed (no earlier version had served)"


def give_up(rec: ledger.DeploymentRecord) -> dict:
    """A version that failed before the switch: the alias goes back, the version's tags and the ledger say why,
    and an event tells the alerts."""
    rec.reason += "; " + move_alias_back(rec.model_name, rec.alias, rec.previous_version, rec.version)
    failed = {ledger.tag_prefix(rec.alias) + "failed_reason": rec.reason[:4000]}
    registry.set_version_tags(registry.client(), rec.model_name, rec.version, failed)
    ledger.record(rec)
    events.announce_not_deployed(rec)
    get_run_logger().error("v%s not deployed: %s", rec.version, rec.reason)
    return rec.as_dict()


def watch(
    rec: ledger.DeploymentRecord,
    target: serving.LocalTarget,
    seconds: float,
    before: Counts | None = None,
    newer_move: Callable[[], str | None] | None = None,
) -> ledger.DeploymentRecord:
    """The post-switch watch, run outside the deployment lock: the live error rate of the new version against the
    previous version's (verdicts.watch_verdict; `before` is the previous version's counts when this deployment
    started). `serving` when it holds; `superseded` when `newer_move` says a newer move came first (the watch ends
    at once, and that move deploys); else switch back (`rolled-back-live`) — or, for a first deployment, which has
    nothing to roll back to, keep serving and say so."""
    s = get_settings()
    limit, first = s.deploy_max_live_error_rate, not rec.previous_version or rec.previous_version == rec.version
    window = lifetime = None
    if not first and target.slot_version("standby") == rec.previous_version:
        lifetime = target.counters("standby")  # the previous version, frozen at the switch
        window = lifetime.minus(before) if before is not None else None
    baseline, what = verdicts.baseline_of(window, lifetime, WATCH_MIN_REQUESTS)
    live = lambda: Counts(*target.counters())  # noqa: E731 - the active slot, since it was switched in
    start, began = live(), time.monotonic()
    deadline, superseded, verdict = began + seconds, None, None
    while time.monotonic() < deadline and superseded is None:
        time.sleep(min(WATCH_TICK_SECONDS, max(0.0, deadline - time.monotonic())))
        verdict = _verdict(live().minus(start), baseline, what, rec, limit)
        if verdict.breached:
            break
        superseded = newer_move() if newer_move is not None else None
    if verdict is None or not verdict.breached:
        verdict = _verdict(live().minus(start), baseline, what, rec, limit)
    took = time.monotonic() - began
    smoke = rec.reason + "; " if rec.reason else ""  # which rows the smoke test passed on
    rule = verdicts.watch_rule(limit, WATCH_MIN_REQUESTS)
    rec.watch = f"watched {took:.0f}s of {seconds:.0f}s: {verdict.note} (rule: {rule})"
    if superseded is not None:
        rec.outcome, rec.reason = "superseded", f"{smoke}watch ended early after {took:.0f}s: {superseded}"
    elif not verdict.breached:
        note = "; first deployment: nothing to roll back to" if first and not rec.previous_version else ""
        rec.outcome, rec.reason = "serving", smoke + verdict.note + note
    elif first:
        rec.outcome, rec.reason = "serving", (f"{smoke}{verdict.note}; keeps serving: "
                                              f"{'a first deployment has' if not rec.previous_version else 'it had'}"
                                              " nothing to roll back to")  # fmt: skip
    else:
        rec.outcome, rec.reason = switch_back(rec, target, smoke + verdict.note)
    _logger().info("post-switch watch of v%s: %s → %s", rec.version, rec.watch, rec.outcome)
    return rec


def _verdict(new: Counts, baseline: Counts | None, what: str, rec, limit: float) -> verdicts.WatchVerdict:
    return verdicts.watch_verdict(new, baseline, max_excess=limit, min_requests=WATCH_MIN_REQUESTS,
                                  previous=rec.previous_version, baseline_what=what)  # fmt: skip


def switch_back(rec: ledger.DeploymentRecord, target: serving.LocalTarget, why: str) -> tuple[str, str]:
    """A breach: under the deployment lock (the watch runs without it), switch back to the previous version —
    unless a newer move got there first (then it is superseded, and that move's deployment stands)."""
    with locks.held(locks.deploy_lock(rec.model_name, rec.alias), timeout_seconds=BREACH_LOCK_SECONDS):
        newer = moved_on(rec.model_name, rec.alias, rec.version)
        if newer is not None or target.active_version() != rec.version:
            return "superseded", f"{why}; not switched back: {newer or 'another version serves by now'}"
        if target.slot_version("standby") != rec.previous_version:
            return "superseded", f"{why}; not switched back: v{rec.previous_version} is no longer loaded beside it"
        target.rollback()
        back = move_alias_back(rec.model_name, rec.alias, rec.previous_version, rec.version)
        ledger.record_rolled_back(registry.client(), rec.model_name, rec.version, rec.alias, to=rec.previous_version,
                                  by=f"the post-switch watch of deploy-model run {rec.flow_run_id or '-'}",
                                  reason=why, outcome="rolled-back-live")  # fmt: skip
    return "rolled-back-live", f"{why}; {back}"


def ledger_row_for_rollback(name: str, version: str, alias: str, to: str, at: str, by: str, reason: str) -> None:
    """The deployments table's row for a version rolled back by a `rollback` run (its tags say so already)."""
    from prefect.runtime import flow_run

    rec = ledger.DeploymentRecord(
        model_name=name, version=str(version), alias=alias, target=target_for(alias).name, url="", trigger=by,
        outcome="rolled-back", reason=f"{reason}; '{alias}' moved back to v{to}", started_at=at, finished_at=at,
        flow_run_id=str(flow_run.id or ""),
    )  # fmt: skip
    ledger.record_in_prefect(rec)


class NothingToRollBackTo(UserError, ValueError):
    """No earlier version of the model has served (and stayed): a rollback has nowhere to go."""


def last_good_version(mlflow_client, name: str, before) -> str:
    """The newest version that served (`deploy_outcome=serving`: not rolled back, superseded or failed) older than
    `before` (the alias' version now, or None); ValueError when there is none."""
    good = [
        v for v in mlflow_client.search_model_versions(f"name = '{name}'")
        if v.tags.get("deploy_outcome") == "serving" and (before is None or int(v.version) < int(before.version))
    ]  # fmt: skip
    if not good:
        raise NothingToRollBackTo(f"no earlier version of {name} has served and stayed: nothing to roll back to "
                                  "(name one with --to)")  # fmt: skip
    return str(max(good, key=lambda v: int(v.version)).version)
