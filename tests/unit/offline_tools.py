"""The validators of the `test` extra (actionlint, check-jsonschema, shellcheck), found and run offline; shared by
test_ci_pipelines.py and test_infra.py (not a test module)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def tool(name: str) -> str:
    """A validator from the test extra: next to this interpreter (the venv) or on PATH; missing is a failure."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed: install the project's `test` extra (pyproject.toml)")
    return found


def offline_env() -> dict[str, str]:
    """The environment for a validator: the venv's tools first on PATH (actionlint finds shellcheck there) and
    every proxy pointed at a closed port, so any attempt to download a schema or an action fails loudly."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[var] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return env
