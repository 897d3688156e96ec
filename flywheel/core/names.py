"""Names made safe for places with a narrow alphabet: Prefect artifact keys, image tags, Kubernetes labels, dirs."""

from __future__ import annotations

import string

_ALNUM = frozenset(string.ascii_letters + string.digits)


def slug(name: str, *, keep: str = "", fill: str = "-", lower: bool = True, default: str = "model") -> str:
    """`name` with every character but ASCII letters, digits and `keep` replaced by `fill`, `fill` trimmed at both
    ends (a leading dot too, so the result is never a hidden file), lower-cased unless `lower=False`; `default`
    when nothing is left."""
    text = name.lower() if lower else name
    out = "".join(c if c in _ALNUM or c in keep else fill for c in text).strip(fill).lstrip(".")
    return out or default
