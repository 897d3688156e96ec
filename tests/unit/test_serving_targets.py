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
