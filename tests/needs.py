"""What a test needs from the machine (not a test module): under CI=true a missing part fails, naming what to
install; elsewhere the test skips and says why. `make test` / `.ci/run` install the parts (`make parts`)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str, install: str) -> NoReturn:
    """Fail (CI=true) or skip (elsewhere): `what` is missing, `install` says how to get it."""
    message = f"{what}; install {install}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)
