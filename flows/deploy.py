"""The `deploy-model` and `rollback` flows.

deploy-model: (lock per model) resolve what the alias points at → package → load beside the serving version →
health + smoke test → switch → watch the live error rate → ledger. A failure before the switch means the
version never serves and the alias goes back; a breach after it switches back.
"""

from __future__ import annotations

import yaml
from flywheel.tasks import ledger, registry, serving
from flywheel.tasks.packaging import package
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from flywheel.core.events import ROLLED_BACK_EVENT, model_resource
from flywheel.core.settings import get_settings

WATCHED_ALIASES = (registry.CHAMPION, registry.CHALLENGER)


def deploy_lock(name: str, alias: str) -> str:
    """The Prefect global concurrency limit (limit 1) that keeps deployments of one model and alias in series."""
    return ensure_lock(f"deploy-{name}-{alias}")


def ensure_lock(lock: str) -> str:
    """A Prefect global concurrency limit of 1 named `lock`, created if missing.

    `concurrency()` is a silent no-op for a limit that does not exist, so the limit is created first (by any
    deployment that gets here first; a concurrent creator's conflict is harmless) and then taken strictly.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(lock, 1)
        except ObjectAlreadyExists:
            pass
    return lock


def announce_not_deployed(rec: ledger.DeploymentRecord) -> None:
    """An event for alerts (deployments/alerts.py): this version did not stay deployed, and why."""
    from prefect.events import emit_event

    emit_event(
        event=ROLLED_BACK_EVENT,
        resource=model_resource(rec.model_name),
        payload={
            "name": rec.model_name, "version": rec.version, "alias": rec.alias, "outcome": rec.outcome,
            "reason": rec.reason[:1000], "previous_version": rec.previous_version,
        },
    )  # fmt: skip


def kubernetes_step(name: str, version: str, pkg, s) -> None:
    """Blue/green manifests for the version, always rendered into its package; applied (new color, rollout, then
    the Service switch) only with `FLYWHEEL_DEPLOY_TARGET=kubernetes`, a kubectl context and a built image."""
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


def move_alias_back(name: str, alias: str, previous: str | None, version: str) -> str:
    client = registry.client()
    if previous == version:  # it kept serving throughout: the alias is right as it is
        return f"v{version} keeps serving as before"
    if previous:
        registry.set_alias(client, name, alias, previous)
        return f"'{alias}' moved back to v{previous}"
    client.delete_registered_model_alias(name, alias)
    return f"'{alias}' removed (no earlier version had served)"


@flow(name="deploy-model", log_prints=True)
def deploy_model(
    name: str,
    version: str,
    alias: str = registry.CHAMPION,
    trigger: str = "manual",
    event_id: str | None = None,
    watch_seconds: float | None = None,
) -> dict:
    """Deploy `name` v`version` to the target that serves `alias`, blue/green, and roll back on failure."""
    logger = get_run_logger()
    s = get_settings()
    if name != s.model_name:  # an event about another registered model: nothing of it is ever loaded here
        logger.info("'%s' is not the model served here ('%s'): ignored", name, s.model_name)
        return {"outcome": "ignored", "reason": f"{name} is not served here ({s.model_name})"}
    if alias not in WATCHED_ALIASES:
        logger.info("alias '%s' is not deployed anywhere (watched: %s)", alias, ", ".join(WATCHED_ALIASES))
        return {"outcome": "ignored", "alias": alias}
    target = target_for(alias)
    # A short lease (renewed while this run lives) frees the lock soon after a killed process stops renewing it.
    with concurrency(deploy_lock(name, alias), occupy=1, timeout_seconds=900, lease_duration=60, strict=True):
        version, why = resolve_version(name, str(version), alias, trigger)
        logger.info("%s", why)
        if not version:
            return {"outcome": "ignored", "reason": why}
        if target.serves(version):
            logger.info("v%s already serves '%s' at %s: nothing to do", version, alias, target.url)
            return {"outcome": "already-serving", "version": version, "url": target.url}
        previous = target.active_version()  # may be this very version, served another way (docker target)

        rec = ledger.DeploymentRecord(
            model_name=name, version=version, alias=alias, target=target.name, url=target.url,
            trigger=trigger, previous_version=previous, event_id=event_id, flow_run_id=str(flow_run.id or ""),
        )  # fmt: skip
        try:
            # One packaging of a model at a time: the staging and the production deployment of a version share
            # its build context directory and image tag (the second reuses the first's image).
            with concurrency(ensure_lock(f"package-{name}"), occupy=1, timeout_seconds=1800, lease_duration=60,
                             strict=True):  # fmt: skip
                pkg = package(name, version, str(s.state_path / "packages"), s.build_images)
            rec.context, rec.image = pkg.context_dir, pkg.image_id or f"not built: {pkg.engine}"
            kubernetes_step(name, version, pkg, s)
            if isinstance(target, serving.DockerTarget) and not pkg.image_id:
                raise serving.TargetError(
                    f"the docker target runs image {pkg.image_tag} and there is none: {pkg.engine}"
                )
            rec.container = target.load(version).get("container")
            smoke = smoke_test(target, name, version)
        except Exception as exc:  # anything before the switch: the version never serves
            rec.outcome, rec.reason = "failed", f"{type(exc).__name__}: {exc}"
            smoke = None
        if smoke is not None and not smoke.ok:
            rec.outcome = "failed-smoke"
            rec.reason = (
                f"smoke test failed: {smoke.reason} (error rate {smoke.error_rate:.1%}, p50 {smoke.p50_ms:.0f} ms)"
            )
        if rec.outcome != "pending":
            rec.reason += "; " + move_alias_back(name, alias, previous, version)
            failed = {ledger.tag_prefix(alias) + "failed_reason": rec.reason[:4000]}
            registry.set_version_tags(registry.client(), name, version, failed)
            ledger.record(rec)
            announce_not_deployed(rec)
            logger.error("v%s not deployed: %s", version, rec.reason)
            return rec.as_dict()

        target.swap()
        logger.info("switched %s to v%s (previous: %s)", target.url, version, previous or "none")
        healthy, note = serving.watch_live(
            target,
            seconds=s.deploy_watch_seconds if watch_seconds is None else watch_seconds,
            max_error_rate=s.deploy_max_live_error_rate,
        )
        if healthy:
            rec.outcome, rec.reason = "serving", note
        else:
            target.rollback()
            rec.outcome, rec.reason = "rolled-back-live", note + "; " + move_alias_back(name, alias, previous, version)
        ledger.record(rec)
        if rec.outcome != "serving":
            announce_not_deployed(rec)
        create_markdown_artifact(
            key=f"deploy-{ledger.artifact_key(name)[len('deployments-') :]}",
            markdown=f"# {name} v{version} → {alias}: {rec.outcome}\n\n```yaml\n{yaml.safe_dump(rec.as_dict())}```",
            description=f"Deployment of {name} v{version}",
        )
        return rec.as_dict()


@flow(name="rollback", log_prints=True)
def rollback(name: str | None = None, alias: str = registry.CHAMPION, to_version: str | None = None) -> dict:
    """Move `alias` back to the previous good version (or `to_version`); the alias event then deploys it."""
    logger = get_run_logger()
    name = name or get_settings().model_name
    client = registry.client()
    current = registry.get_alias_version(client, name, alias)
    if to_version is None:
        good = [
            v for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get("deploy_outcome") == "serving" and (current is None or int(v.version) < int(current.version))
        ]  # fmt: skip
        if not good:
            raise ValueError(f"no earlier version of {name} has served: nothing to roll back to")
        to_version = max(good, key=lambda v: int(v.version)).version
    registry.set_alias(client, name, alias, str(to_version))
    registry.set_version_tags(
        client,
        name,
        str(to_version),
        {"rollback_from": current.version if current else "", "rollback_at": ledger.now_iso()},
    )
    logger.info("'%s' of %s moved from v%s back to v%s", alias, name, current.version if current else "-", to_version)
    return {"name": name, "alias": alias, "from": current.version if current else None, "to": str(to_version)}
