"""The registry module's pure parts: code version, the tracking-server check, pip pins and skops trust."""

from __future__ import annotations

import re
import socket

import numpy as np
import pandas as pd
import pytest
import skops.io

from flywheel.core.spec import DatasetSpec
from flywheel.tasks import registry
from flywheel.tasks.model_specs import ModelSpec
from flywheel.tasks.registry import RegistryUnavailableError, check_tracking_server
from flywheel.tasks.training import build_pipeline


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_code_version_is_a_stable_short_hash():
    version = registry.code_version()
    assert re.fullmatch(r"[0-9a-f]{12}", version)
    assert registry.code_version() == version


def test_code_version_changes_when_the_pipeline_code_is_edited(tmp_path, monkeypatch):
    """On a temp copy of tasks/ and flows/: the copy hashes like the original; editing a task, adding a flow module
    or renaming one changes the version; files outside those folders do not count."""
    import shutil
    from pathlib import Path

    src = Path(registry.__file__).resolve().parent.parent
    for sub in ("tasks", "flows"):
        shutil.copytree(src / sub, tmp_path / sub, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(registry, "__file__", str(tmp_path / "tasks" / "registry.py"))
    original = registry.code_version()
    assert original == registry.code_version() and re.fullmatch(r"[0-9a-f]{12}", original)

    (tmp_path / "README.txt").write_text("not code")
    assert registry.code_version() == original
    gate = tmp_path / "tasks" / "gate.py"
    text = gate.read_text()
    gate.write_text(text + "\nTHRESHOLD_NUDGE = 1\n")
    edited = registry.code_version()
    assert edited != original
    gate.write_text(text)
    assert registry.code_version() == original  # same code, same version
    (tmp_path / "flows" / "extra.py").write_text("X = 1\n")
    added = registry.code_version()
    assert added not in (original, edited)
    (tmp_path / "flows" / "extra.py").rename(tmp_path / "flows" / "other.py")
    assert registry.code_version() not in (original, edited, added)


def test_unreachable_tracking_server():
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(RegistryUnavailableError, match="unreachable"):
        check_tracking_server(uri, timeout=2)


@pytest.mark.parametrize("uri", ["", "file:///tmp/mlruns", "sqlite:///mlflow.db", "databricks"])
def test_non_http_tracking_uris_are_not_checked(uri):
    assert check_tracking_server(uri) is None


def test_pip_requirements_are_pinned():
    reqs = registry.pip_requirements()
    assert [r.split("==")[0] for r in reqs] == ["mlflow", "scikit-learn", "pandas", "numpy", "skops", "scipy"]
    assert all(re.fullmatch(r"[a-z-]+==\d+\.\d+[\w.]*", r) for r in reqs)


def test_trusted_types_let_skops_load_the_pipeline():
    spec = DatasetSpec(source="x", target="y", positive_class=1, numeric=["a"], categorical=["c"])
    X = pd.DataFrame({"a": np.arange(40.0), "c": ["p", "q"] * 20})
    y = pd.Series([0, 1] * 20)
    model = build_pipeline(spec, ModelSpec(estimator="logistic_regression"), seed=0).fit(X, y)
    blob = skops.io.dumps(model)
    trusted = registry.trusted_types(model)
    assert trusted and all(isinstance(t, str) for t in trusted)
    with pytest.raises(skops.io.exceptions.UntrustedTypesFoundException):
        skops.io.loads(blob)
    loaded = skops.io.loads(blob, trusted=trusted)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_reasons_tag_is_json_and_bounded():
    assert registry.reasons_tag(["a", "b"]) == '["a", "b"]'
    assert len(registry.reasons_tag(["x" * 10_000])) == 5000
