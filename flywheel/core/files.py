"""Owner-only files (secrets, tokens, keys): written atomically, mode 0600 from the first byte."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_temp(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (readers see the old or the new content, never a part), owner-only."""
    tmp = _write_temp(Path(path), text)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_private(path: Path) -> str | None:
    """The stripped content of an owner-only file (its mode tightened to 0600 if it was looser); None if absent
    or empty."""
    path = Path(path)
    try:
        value = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not value:
        return None
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return value


def load_or_create_private(path: Path, make: Callable[[], str]) -> str:
    """The value in `path`, created once with `make()` if absent.

    Safe when several processes call it at once: the new file is linked into place only if none exists, so all of
    them end up with the same value.
    """
    path = Path(path)
    existing = read_private(path)
    if existing:
        return existing
    tmp = _write_temp(path, make())
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race (or an empty file is there): theirs stands
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    value = read_private(path)
    if value is None:  # an empty file was there: replace it
        write_private(path, make())
        value = read_private(path)
    return value
