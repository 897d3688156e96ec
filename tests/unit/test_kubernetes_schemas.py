"""Kubernetes manifests against the real Kubernetes OpenAPI schemas (kubernetes-validate ships them; offline), and
the blue/green pods running a version's image as the docker target does.

Both the static manifests in infra/k8s/ and the blue/green pair the deploy flow renders for a version.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate  # pinned in requirements.lock: missing is an error, not a skip
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
MANIFESTS = sorted(p for p in (ROOT / "infra" / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_infra_manifests_match_the_kubernetes_schema(path):
    docs = _documents(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((ROOT / "infra" / "k8s" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (ROOT / "infra" / "k8s" / resource).is_file(), resource


@pytest.mark.parametrize("color", ["blue", "green"])
def test_rendered_blue_green_manifests_match_the_schema(color):
    from flywheel.tasks.serving import kubernetes_manifests

    deployment, service = kubernetes_manifests("flights-delay", "7", "flywheel/flights-delay:7", color=color)
    for doc in (deployment, service):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["selector"]["flywheel/color"] == color


def test_a_broken_manifest_is_rejected():
    from flywheel.tasks.serving import kubernetes_manifests

    deployment, _ = kubernetes_manifests("m", "1", "img:1", color="blue")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_render_writes_the_color_that_is_not_live(tmp_path):
    from flywheel.tasks.serving import render_kubernetes

    first, color = render_kubernetes("m", "1", "flywheel/m:1", str(tmp_path), live_color=None, namespace="ns")
    assert color == "blue" and first.endswith("kubernetes-blue.yaml")
    path, color = render_kubernetes("m", "2", "flywheel/m:2", str(tmp_path), live_color="blue", namespace="ns")
    assert color == "green"
    deployment, service = _documents(Path(path))
    assert deployment["metadata"]["name"] == "m-green" and deployment["metadata"]["namespace"] == "ns"
    assert service["spec"]["selector"]["flywheel/color"] == "green"
    for doc in (deployment, service):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("enabled", [True, False])
def test_blue_green_pods_run_the_versions_image_as_the_docker_target_does(enabled):
    """The image's own entrypoint (flywheel.serving.container: compiled with Flywheel's server, or MLflow's scoring
    server) decides, with FLYWHEEL_COMPILE_MODELS as the docker target passes it, on the port both listen on."""
    from flywheel.serving import container
    from flywheel.tasks.serving import CONTAINER_PORT, image_environment, kubernetes_manifests

    deployment, _ = kubernetes_manifests("m", "3", "flywheel/m:3", color="blue", compile_models=enabled)
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    (pod,) = deployment["spec"]["template"]["spec"]["containers"]
    assert pod["image"] == "flywheel/m:3" and "command" not in pod and "args" not in pod
    assert pod["env"] == [{"name": "FLYWHEEL_COMPILE_MODELS", "value": "true" if enabled else "false"}]
    assert image_environment(enabled) == {e["name"]: e["value"] for e in pod["env"]}
    assert pod["ports"][0]["containerPort"] == CONTAINER_PORT == container.PORT
    assert pod["readinessProbe"]["httpGet"]["path"] == "/ping"  # both servers answer it once the model is loaded


@pytest.fixture
def settings_env(monkeypatch):
    """Set FLYWHEEL_* variables the settings then read (their cache cleared before and after)."""
    from flywheel.core.settings import get_settings

    def set_env(name: str, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield set_env
    monkeypatch.undo()
    get_settings.cache_clear()


def test_rendered_manifests_follow_the_compile_setting(tmp_path, settings_env):
    from flywheel.tasks.serving import render_kubernetes

    settings_env("FLYWHEEL_COMPILE_MODELS", "false")
    path, _ = render_kubernetes("m", "1", "flywheel/m:1", str(tmp_path), live_color=None, namespace="ns")
    deployment, _ = _documents(Path(path))
    assert deployment["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "FLYWHEEL_COMPILE_MODELS", "value": "false"}
    ]
    settings_env("FLYWHEEL_COMPILE_MODELS", None)
    path, _ = render_kubernetes("m", "2", "flywheel/m:2", str(tmp_path), live_color="blue", namespace="ns")
    deployment, _ = _documents(Path(path))
    assert deployment["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "true"
