"""Rollout: the steps that take one registered version to the target serving an alias, blue/green — which target,
which version, package → load beside the serving version → health + smoke test (the standby), the post-switch
watch, and moving the alias back when the version does not stay."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flywheel.core.settings import Settings, get_settings
from flywheel.tasks import events, ledger, locks, registry, serving
from flywheel.tasks.packaging import package

WATCHED_ALIASES = (registry.CHAMPION, registry.CHALLENGER)


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


@task(name="smoke-test", cache_policy=NO_CACHE)
def smoke_test(target: serving.LocalTarget, name: str, version: str) -> serving.SmokeResult:
    """Predictions on the version's own held-out sample, on the standby slot, before any traffic moves."""
    from mlflow.models import get_model_info

    s = get_settings()
    client = registry.client()
    sample = registry.load_reference_sample(client, client.get_model_version(name, version), registry.HOLDOUT_ARTIFACT)
    signature = get_model_info(f"models:/{name}/{version}").signature
    features = signature.inputs.input_names() if signature else list(sample.columns)
    records = serving.records_for_smoke(sample, features)
    return target.smoke(records, max_error_rate=s.smoke_max_error_rate, max_p50_ms=s.smoke_max_p50_ms)


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
        rec.container = target.load(version).get("container")
        smoke = smoke_test(target, name, version)
    except Exception as exc:  # anything before the switch: the version never serves
        rec.outcome, rec.reason = "failed", f"{type(exc).__name__}: {exc}"
        return rec
    if not smoke.ok:
        rec.outcome = "failed-smoke"
        rec.reason = f"smoke test failed: {smoke.reason} (error rate {smoke.error_rate:.1%}, p50 {smoke.p50_ms:.0f} ms)"
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
    if healthy:
        rec.outcome, rec.reason = "serving", note
    else:
        target.rollback()
        back = move_alias_back(rec.model_name, rec.alias, rec.previous_version, rec.version)
        rec.outcome, rec.reason = "rolled-back-live", note + "; " + back
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
