"""The user's own code: importing the module of an estimator class or factory named in a params file, and what of it
goes with the model.

A module is looked for first in the params file's directory (a `features.py` next to `params.yaml`), then on
`sys.path`. Code found in that directory, or on `sys.path` outside any installed distribution, is the user's: its
top-level module file or package directory (and those of its sibling modules it imports) is logged with the model
as MLflow `code_paths` and hashed into the lineage `code_version`. Code from an installed distribution is a pinned
pip requirement instead. A module imported from a directory is imported again when its files change, so an edited
`features.py` trains (and versions) as the new code.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import importlib.util
import sys
import sysconfig
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from flywheel.core.errors import UserError


class UserCodeError(UserError, ValueError):
    """A module named in a params file cannot be found or imported."""


@dataclass(frozen=True)
class UserCode:
    """Where an estimator class or factory comes from: the user's own files (top-level module files or package
    directories: MLflow `code_paths`) and pinned requirements of the installed distributions it belongs to."""

    paths: tuple[Path, ...] = ()
    requirements: tuple[str, ...] = ()

    def digest(self) -> str:
        """A hash of the user's files (their names below the code path's parent, and their bytes); '' for none."""
        if not self.paths:
            return ""
        h = hashlib.sha256()
        for root in self.paths:
            for path in code_files(root):
                h.update(path.relative_to(root.parent).as_posix().encode())
                h.update(path.read_bytes())
        return h.hexdigest()[:16]


def code_files(root: Path) -> list[Path]:
    """The files MLflow copies for a code path: the file itself, or the directory's files but `__pycache__`."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.relative_to(root).parts)


_LOCK = threading.RLock()
_LOADED_FROM: dict[str, tuple[Path, str]] = {}  # top-level module we imported from a directory → (directory, digest)


def import_user_module(module: str, search_dir: str | Path | None = None) -> tuple[ModuleType, UserCode]:
    """Import `module` (dotted) from `search_dir` if its top-level module is there, else from `sys.path`; and say
    where its code comes from. Raises UserCodeError with the reason when it cannot be found or imported."""
    top = module.partition(".")[0]
    with _LOCK:
        root = Path(search_dir).resolve() if search_dir is not None else None
        origin = _top_level_origin(top, root) if root is not None else None
        if origin is not None:
            return _import_from_dir(module, top, root, origin)
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            where = f"in {root} or " if root is not None else ""
            raise UserCodeError(f"module '{module}' not found {where}on sys.path ({exc})") from exc
        except Exception as exc:  # the module's own code failed
            raise UserCodeError(f"module '{module}' failed to import: {type(exc).__name__}: {exc}") from exc
        return imported, _code_of_importable(top)


def _top_level_origin(top: str, root: Path) -> Path | None:
    """The file or package directory of a regular top-level module `top` in `root`, if there is one."""
    spec = importlib.machinery.PathFinder.find_spec(top, [str(root)])
    if spec is None or spec.origin is None:  # absent, or only a namespace directory (a data folder, say)
        return None
    origin = Path(spec.origin)
    return origin.parent if spec.submodule_search_locations else origin


def sibling_closure(root: Path, top: str) -> tuple[Path, ...]:
    """The code paths of top-level module `top` in `root` and of every module of `root` it imports, directly or
    through another one, anywhere in its source (read, not run: the same answer in every process)."""
    found: dict[str, Path] = {}
    pending = [top]
    while pending:
        name = pending.pop()
        origin = _top_level_origin(name, root)
        if name in found or origin is None:
            continue
        found[name] = origin
        for path in code_files(origin):
            if path.suffix == ".py":
                pending.extend(_imported_tops(path))
    return tuple(sorted(found.values()))


def _imported_tops(path: Path) -> set[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return set()  # importing it will say what is wrong
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.partition(".")[0])
    return tops


def _import_from_dir(module: str, top: str, root: Path, origin: Path) -> tuple[ModuleType, UserCode]:
    code = UserCode(paths=sibling_closure(root, top))
    digest = code.digest()
    loaded = sys.modules.get(top)
    if loaded is not None:
        if top not in _LOADED_FROM:
            where = getattr(loaded, "__file__", None) or "built in"
            raise UserCodeError(
                f"module '{top}' in {root} has the name of a module already imported from {where}: rename it"
            )
        if _LOADED_FROM[top] != (root, digest):
            _forget_dir(_LOADED_FROM[top][0])  # another directory's, or its files changed: import this code afresh
        elif module in sys.modules:
            return sys.modules[module], code
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        importlib.invalidate_caches()
        imported = importlib.import_module(module)
    except Exception as exc:
        _forget_dir(root, among=set(sys.modules) - before)
        failure = f"{type(exc).__name__}: {exc}"
        raise UserCodeError(f"module '{module}' ({origin}) failed to import: {failure}") from exc
    finally:
        sys.path.remove(str(root))
    for name in {n.partition(".")[0] for n, mod in list(sys.modules.items()) if _is_under(mod, root)} | {top}:
        _LOADED_FROM[name] = (root, UserCode(paths=sibling_closure(root, name)).digest())
    return imported, code


def _forget_dir(root: Path, among: set[str] | None = None) -> None:
    """Drop the modules imported from `root` (or those of them in `among`) so they are imported again, and their
    cached bytecode (an edit within the same second that keeps a file's size leaves a .pyc that looks current)."""
    for name in list(sys.modules) if among is None else among:
        mod = sys.modules.get(name)
        if not _is_under(mod, root):
            continue
        sys.modules.pop(name, None)
        file = getattr(mod, "__file__", None)
        if file and file.endswith(".py"):
            Path(importlib.util.cache_from_source(file)).unlink(missing_ok=True)
    for name in [n for n, (r, _) in _LOADED_FROM.items() if r == root]:
        del _LOADED_FROM[name]


def _is_under(mod: ModuleType | None, root: Path) -> bool:
    file = getattr(mod, "__file__", None)
    return bool(file) and Path(file).resolve().is_relative_to(root)


def _module_path(mod: ModuleType) -> Path:
    """A top-level module's code path: its package directory, or its file."""
    file = Path(mod.__file__).resolve()
    return file.parent if file.name == "__init__.py" else file


def _code_of_importable(top: str) -> UserCode:
    """Where a module importable from sys.path comes from: the standard library (nothing), an installed
    distribution (pinned requirements), or the user's files on sys.path (code paths)."""
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return UserCode()
    dists = _distributions().get(top)
    if dists:
        return UserCode(requirements=tuple(pinned(d) for d in dists))
    mod = sys.modules.get(top)
    if mod is None or not getattr(mod, "__file__", None):
        return UserCode()
    path = _module_path(mod)
    if any(path.is_relative_to(p) for p in _site_dirs()):
        return UserCode()  # installed without distribution metadata: nothing we can pin or should copy
    return UserCode(paths=(path,))


def requirements_of_modules(tops: set[str]) -> list[str]:
    """Pinned requirements of the installed distributions the top-level modules come from."""
    found = {pinned(d) for t in tops if t not in sys.stdlib_module_names for d in _distributions().get(t, ())}
    return sorted(found)


def pinned(dist: str) -> str:
    from importlib.metadata import version

    return f"{dist}=={version(dist)}"


@cache
def _distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()  # ~0.3 s: once a process


@cache
def _site_dirs() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    return tuple(Path(paths[k]).resolve() for k in ("purelib", "platlib") if k in paths)
