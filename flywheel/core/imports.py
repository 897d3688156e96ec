"""Importing ahead: a long-lived process (the model server, the deployments process) imports what its first piece
of work will need while it is idle, so that work does not pay for cold imports on its own clock."""

from __future__ import annotations

import importlib


def warm_imports(modules: tuple[str, ...]) -> list[str]:
    """Import `modules`; the ones that could not be imported (never an error here: the step that needs one says
    so when it runs)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - an optional library missing or broken
            missing.append(module)
    return missing
