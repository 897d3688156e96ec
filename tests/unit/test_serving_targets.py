"""Serving targets' plain parts: the docker target's names and labels, and its error when no engine answers."""

from __future__ import annotations

import pytest

from flywheel.tasks import serving


def docker_target(**kw) -> serving.DockerTarget:
    return serving.DockerTarget(url="http://127.0.0.1:5080", admin_token="t", model_name="Flights Delay", **kw)


def test_container_names_and_labels_tie_a_container_to_model_role_version_and_front():
    prod, staging = docker_target(), docker_target(role="staging")
    assert prod.container_name("7") == "flywheel-flights-delay-production-v7"
    assert staging.container_name("7") == "flywheel-flights-delay-staging-v7"
    assert prod.labels("7") == {
        "flywheel.model": "Flights Delay",
        "flywheel.role": "production",
        "flywheel.version": "7",
        "flywheel.front": "http://127.0.0.1:5080",
    }


def test_no_engine_is_a_clear_target_error_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(serving.TargetError, match="Docker-compatible engine and none is reachable.*DOCKER_HOST"):
        docker_target().load("3")
    with pytest.raises(serving.TargetError, match="none is reachable"):
        docker_target().remove_all()


def test_deploy_target_setting_is_checked(monkeypatch):
    from flywheel.core.settings import Settings

    monkeypatch.setenv("FLYWHEEL_DEPLOY_TARGET", "dokcer")
    with pytest.raises(ValueError, match="'local', 'docker' or 'kubernetes'"):
        Settings()
    monkeypatch.setenv("FLYWHEEL_DEPLOY_TARGET", "docker")
    assert Settings().deploy_target == "docker"


@pytest.mark.parametrize("target", ["local", "docker"])
def test_deploy_target_setting_picks_the_target_each_alias_deploys_to(monkeypatch, tmp_path, target):
    """What the setting changes: champion → the production server's URL, challenger → the staging server's, each
    through the target kind chosen (docker: a container per version, named and labelled by role)."""
    from flywheel.core.settings import get_settings
    from flywheel.tasks.rollout import target_for

    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_DEPLOY_TARGET", target)
    monkeypatch.setenv("FLYWHEEL_MODEL_NAME", "flights")
    monkeypatch.setenv("FLYWHEEL_SERVING_PORT", "5181")
    monkeypatch.setenv("FLYWHEEL_STAGING_PORT", "5182")
    get_settings.cache_clear()
    try:
        s = get_settings()
        prod, staging = target_for("champion"), target_for("challenger")
    finally:
        get_settings.cache_clear()
    kind = serving.DockerTarget if target == "docker" else serving.LocalTarget
    assert type(prod) is kind and type(staging) is kind
    assert (prod.url, staging.url) == (s.serving_url, s.staging_url) and prod.url != staging.url
    assert prod.url.endswith(":5181") and staging.url.endswith(":5182")
    if target == "docker":
        assert prod.container_name("2") == "flywheel-flights-production-v2"
        assert staging.labels("2")["flywheel.role"] == "staging"
        assert staging.labels("2")["flywheel.front"] == s.staging_url
    else:
        assert (prod.name, staging.name) == ("local", "staging")
