"""Kubernetes manifests against the real Kubernetes OpenAPI schemas (kubernetes-validate ships them; offline).

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
