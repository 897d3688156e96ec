"""Rollout: the steps that take one registered version to the target serving an alias, blue/green — which target,
which version, package → load beside the serving version → health + smoke test (the standby), the post-switch
watch, and moving the alias back when the version does not stay."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flywheel.core.settings import Settings, get_settings
from flywheel.tasks import events, ledger, locks, registry, serving
from flywheel.tasks.packaging import package

if TYPE_CHECKING:
    import pandas as pd

WATCHED_ALIASES = (registry.CHAMPION, registry.CHALLENGER)
SMOKE_ROWS = 200
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


@task(name="resolve-version", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 5])
def resolve_version(name: str, version: str, alias: str, trigger: str) -> tuple[str, str]:
    """The version to deploy and why. A manual run moves the alias to the asked version; an event that the
    alias has since moved past is superseded by what the alias points at now (serving ends on the last move)."""
    client = registry.client()
    client.get_model_version(name, str(version))  # raises for a version that is not in this registry
    current = registry.get_alias_version(client, name, alias)
    if trigger == "manual" and (current is None or current.version != str(version)):
        registry.set_alias(client, name, alias, str(version))
        return str(version), f"manual deployment moved '{alias}' to v{version}"
    if current is None:
        return "", f"alias '{alias}' no longer exists"
    if current.version != str(version):
        return current.version, f"'{alias}' moved on to v{current.version} since the event for v{version}"
    return str(version), f"'{alias}' points at v{version}"


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


def _sample_of(client, name: str, version: str) -> pd.DataFrame | None:
    """A version's holdout sample; None when it has none or the version is gone."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    return registry.find_sample(client, mv, registry.HOLDOUT_ARTIFACT)


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
    The result says which rows it tried (`source`)."""
    s = get_settings()
    client = registry.client()
    inputs = registry.model_inputs(name, version)
    what, frame, missing = first_input(smoke_sources(client, name, version, champion, inputs.example))
    if frame is None:
        return serving.SmokeResult(ok=False, rows=0, error_rate=0.0, p50_ms=0.0, source="nothing",
                                   reason="no input to try it on (none found: " + ", ".join(missing) + ")")  # fmt: skip
    known = inputs.columns if inputs.columns and set(inputs.columns) & set(frame.columns) else None
    records = serving.records_for_smoke(frame, known or list(frame.columns), rows=SMOKE_ROWS)  # none known: as is
    result = target.smoke(records, max_error_rate=s.smoke_max_error_rate, max_p50_ms=s.smoke_max_p50_ms)
    result.source = f"{len(records)} rows of {what}" + (f" (none found: {', '.join(missing)})" if missing else "")
    return result


def smoke_note(smoke: serving.SmokeResult) -> str:
    """The smoke test in the ledger's words: which rows it tried, and what failed if it did."""
    if smoke.ok:
        return f"smoke test passed on {smoke.source}, p50 {smoke.p50_ms:.0f} ms"
    if smoke.rows == 0:
        return f"smoke test not run: {smoke.reason}"
    return (f"smoke test failed on {smoke.source}: {smoke.failure_kind()}: {smoke.reason} "
            f"(error rate {smoke.error_rate:.1%}, p50 {smoke.p50_ms:.0f} ms)")  # fmt: skip


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


def stage(rec: ledger.DeploymentRecord, target: serving.LocalTarget) -> ledger.DeploymentRecord:
    """Package the version, load it beside the serving one and smoke-test it there; no traffic moves. A failure
    sets the record's outcome (`failed`, `failed-smoke`) and reason; the outcome stays `pending` when it passed."""
    s = get_settings()
    name, version = rec.model_name, rec.version
    try:
        with locks.held(locks.package_lock(name), timeout_seconds=1800):
            pkg = package(name, version, str(s.state_path / "packages"), s.build_images)
        rec.context, rec.image = pkg.context_dir, pkg.image_id or f"not built: {pkg.engine}"
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


def watch(rec: ledger.DeploymentRecord, target: serving.LocalTarget, seconds: float) -> ledger.DeploymentRecord:
    """The live error rate after the switch: `serving` when it holds, else switch back (`rolled-back-live`)."""
    limit = get_settings().deploy_max_live_error_rate
    healthy, note = serving.watch_live(target, seconds=seconds, max_error_rate=limit)
    smoke = rec.reason + "; " if rec.reason else ""  # which rows the smoke test passed on
    if healthy:
        rec.outcome, rec.reason = "serving", smoke + note
    else:
        target.rollback()
        back = move_alias_back(rec.model_name, rec.alias, rec.previous_version, rec.version)
        rec.outcome, rec.reason = "rolled-back-live", smoke + note + "; " + back
    return rec


def last_good_version(mlflow_client, name: str, before) -> str:
    """The newest version that served (`deploy_outcome=serving`) older than `before` (the alias' version now, or
    None); ValueError when there is none."""
    good = [
        v for v in mlflow_client.search_model_versions(f"name = '{name}'")
        if v.tags.get("deploy_outcome") == "serving" and (before is None or int(v.version) < int(before.version))
    ]  # fmt: skip
    if not good:
        raise ValueError(f"no earlier version of {name} has served: nothing to roll back to")
    return max(good, key=lambda v: int(v.version)).version
