"""What every benchmark shares: the environment, statistics, the result schema, the table and the JSON files (the
servers and data they share: bench/fixtures.py).

Nothing here imports Prefect, MLflow or Evidently at module level: `setup_env` must run before they are imported.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LIBRARIES = (
    "prefect", "mlflow", "evidently", "scikit-learn", "pandas", "numpy", "scipy", "pyarrow", "httpx", "uvicorn",
    "starlette", "fastapi",
)  # fmt: skip
GROUPS = ("result", "fixed", "info")  # measured figures, fixed costs reported apart, context
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_OUTSIDE_OMP: dict[str, str | None] = {}


# --------------------------------------------------------------------------------------------------- environment
def setup_env(root: Path | None = None) -> Path:
    """A private Prefect home and Flywheel state dir, no telemetry, no stray ./mlflow.db: call before importing
    Prefect or MLflow. Returns the temporary root every benchmark keeps its servers' state under."""
    root = Path(root) if root else Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    # In this process OpenMP runs one thread, on both sides of every comparison: on a busy 2-CPU machine its
    # spinning threads make a histogram-boosting fit or predict 5–10× slower and erratic. The servers under test
    # get the caller's setting back (`server_env`), as a user's would.
    _OUTSIDE_OMP.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))
    os.environ["OMP_NUM_THREADS"] = "1"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")
    os.environ["FLYWHEEL_STATE_DIR"] = str(root / "state")
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    }.items():
        os.environ.setdefault(key, value)
    # Benchmarks start their own servers: never talk to the user's.
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        os.environ.pop(var, None)
    return root


def server_env() -> dict[str, str | None]:
    """Variables for a server under test: the OpenMP setting as it was before `setup_env` (None = unset)."""
    return dict(_OUTSIDE_OMP) or {"OMP_NUM_THREADS": None}


@contextmanager
def env_vars(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} must be in [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Latency samples (seconds) → count, mean, p50, p90, p99, min, max in milliseconds."""
    if not seconds:
        raise ValueError("no samples")
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0 or not math.isfinite(denominator):
        return None
    return numerator / denominator


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then `t["seconds"]`."""
    out = {"seconds": math.nan}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Metric:
    name: str
    value: float | None
    unit: str = ""
    group: str = "result"  # result | fixed | info
    note: str = ""

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"metric group {self.group!r} is not one of {GROUPS}")


@dataclass
class Goal:
    """A target from the issue: `value op limit`, e.g. flow/bare ≤ 1.10. `met` is None when not measured."""

    name: str
    value: float | None
    op: str  # "<=" | ">="
    limit: float
    unit: str = "×"
    met: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"goal op {self.op!r} must be '<=' or '>='")
        if self.met is None and self.value is not None and math.isfinite(self.value):
            self.met = self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "NOT met")


@dataclass
class BenchResult:
    name: str
    title: str
    quick: bool
    metrics: list[Metric] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_name(self.name)

    def add(self, name: str, value: float | None, unit: str = "", group: str = "result", note: str = "") -> Metric:
        metric = Metric(name, None if value is None else float(value), unit, group, note)
        self.metrics.append(metric)
        return metric

    def fixed(self, name: str, seconds: float | None, note: str = "") -> Metric:
        return self.add(name, seconds, "s", "fixed", note)

    def goal(self, name: str, value: float | None, op: str, limit: float, note: str = "", unit: str = "×") -> Goal:
        g = Goal(name, value, op, limit, unit, note=note)
        self.goals.append(g)
        return g

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        problems = validate_result(data)
        if problems:
            raise ValueError("not a benchmark result: " + "; ".join(problems))
        data = dict(data)
        data["metrics"] = [Metric(**m) for m in data["metrics"]]
        data["goals"] = [Goal(**g) for g in data["goals"]]
        return cls(**data)


def validate_result(data: Any) -> list[str]:
    """Problems with a result dict read back from JSON (empty list when it matches the schema)."""
    if not isinstance(data, dict):
        return [f"expected an object, got {type(data).__name__}"]
    problems = []
    required = {
        "name": str, "title": str, "quick": bool, "metrics": list, "goals": list, "notes": list, "errors": list,
        "started_at": str, "seconds": (int, float), "machine": dict, "schema_version": int,
    }  # fmt: skip
    for key, kind in required.items():
        if key not in data:
            problems.append(f"missing '{key}'")
        elif not isinstance(data[key], kind):
            problems.append(f"'{key}' has type {type(data[key]).__name__}")
    if problems:
        return problems
    if data["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {data['schema_version']} != {SCHEMA_VERSION}")
    if not _NAME_RE.match(data["name"]):
        problems.append(f"bad name {data['name']!r}")
    for i, m in enumerate(data["metrics"]):
        if not isinstance(m, dict) or not {"name", "value", "unit", "group"} <= set(m):
            problems.append(f"metric {i} lacks name/value/unit/group")
        elif m["group"] not in GROUPS:
            problems.append(f"metric {m['name']!r} has group {m['group']!r}")
        elif m["value"] is not None and not isinstance(m["value"], (int, float)):
            problems.append(f"metric {m['name']!r} value is not a number")
    for i, g in enumerate(data["goals"]):
        if not isinstance(g, dict) or not {"name", "value", "op", "limit", "met"} <= set(g):
            problems.append(f"goal {i} lacks name/value/op/limit/met")
        elif g["op"] not in ("<=", ">="):
            problems.append(f"goal {g['name']!r} has op {g['op']!r}")
    return problems


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"benchmark name {name!r} must match {_NAME_RE.pattern}")
    return name


def result_path(name: str, directory: Path | None = None) -> Path:
    return (directory or RESULTS_DIR) / f"{check_name(name)}.json"


def _json_safe(obj: Any) -> Any:
    """NaN and infinities become null (JSON has no spelling for them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def scrub(text: str) -> str:
    """Text fit for a results file: this machine's paths and host name replaced by placeholders."""
    import socket
    import sys

    replacements = [
        (str(RESULTS_DIR.parent.parent), "<repo>"),
        (sys.prefix, "<venv>"),
        (tempfile.gettempdir(), "<tmp>"),
        (str(Path.home()), "~"),
    ]
    host = socket.gethostname()
    for old, new in sorted(replacements, key=lambda p: -len(p[0])):
        if len(old) > 1:
            text = text.replace(old, new)
    if host:
        text = re.sub(rf"\b{re.escape(host)}\b", "<host>", text)
    return text


def write_result(result: BenchResult, directory: Path | None = None) -> Path:
    """`<directory>/<name>.json` (default bench/results/), free text scrubbed of paths and the host name."""
    path = result_path(result.name, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.as_dict()
    data["notes"] = [scrub(n) for n in data["notes"]]
    data["errors"] = [scrub(e) for e in data["errors"]]
    for item in [*data["metrics"], *data["goals"]]:
        item["note"] = scrub(item["note"])
    path.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    return path


def read_results(directory: Path | None = None) -> list[BenchResult]:
    """Every valid result in the results directory, in name order (files that do not parse are skipped)."""
    out = []
    for path in sorted((directory or RESULTS_DIR).glob("*.json")):
        try:
            out.append(BenchResult.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out


# --------------------------------------------------------------------------------------------------- machine
def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    """What the numbers depend on, without hostnames or paths."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "libraries": library_versions(),
        "load_average_at_start": load,
    }


# --------------------------------------------------------------------------------------------------- rendering
def fmt_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    v = abs(value)
    if v >= 1000:
        return f"{value:,.0f}"
    if v >= 100:
        return f"{value:.0f}"
    if v >= 10:
        return f"{value:.1f}"
    if v >= 1:
        return f"{value:.2f}"
    if v == 0:
        return "0"
    return f"{value:.3g}"


def fmt_value(value: float | None, unit: str) -> str:
    text = fmt_number(value)
    if text == "—" or not unit:
        return text
    return f"{text}{unit}" if unit in ("×", "%") else f"{text} {unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out


def _goal_row(g: Goal) -> list[str]:
    return [g.name, fmt_value(g.value, g.unit), f"{g.op} {fmt_number(g.limit)}{g.unit}", g.verdict, g.note]


def render_table(result: BenchResult) -> str:
    """The plain-text table a benchmark prints: measured figures, fixed costs apart, then its goals."""
    mode = "quick" if result.quick else "full"
    lines = [f"== {result.name}: {result.title} ({mode}, {result.seconds:.0f} s) =="]
    for group, head in (("result", "measured"), ("fixed", "fixed costs (not in the ratios)"), ("info", "context")):
        rows = [[m.name, fmt_value(m.value, m.unit), m.note] for m in result.metrics if m.group == group]
        if rows:
            lines += ["", head, *_table(["metric", "value", "note"], rows)]
    if result.goals:
        lines += [
            "",
            "goals",
            *_table(["goal", "measured", "target", "verdict", "note"], [_goal_row(g) for g in result.goals]),
        ]
    for note in result.notes:
        lines.append(f"note: {note}")
    for err in result.errors:
        lines.append(f"ERROR: {err}")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return out


def render_markdown(results: Sequence[BenchResult], machine: dict[str, Any] | None = None) -> str:
    """`bench/results/latest.md`: the goals of every benchmark first, then each one's figures, and the machine."""
    machine = machine or (results[0].machine if results else machine_info())
    lines = ["# Flywheel benchmarks", ""]
    lines.append(
        "Every figure is a ratio of things measured in the same run on the same machine; fixed costs (server "
        "start, imports, flow start) are listed apart and are not in the ratios. Regenerate with `make bench`."
    )
    lines.append("")
    goal_rows = [[r.name, *_goal_row(g)[:4]] for r in results for g in r.goals]
    if goal_rows:
        lines += ["## Goals", "", *_md_table(["benchmark", "goal", "measured", "target", "verdict"], goal_rows), ""]
    for r in results:
        mode = "quick sizes" if r.quick else "full sizes"
        lines += [f"## {r.name} — {r.title}", "", f"{r.started_at}, {mode}, {r.seconds:.0f} s.", ""]
        rows = [
            [m.name, fmt_value(m.value, m.unit), {"result": "", "fixed": "fixed cost", "info": "context"}[m.group],
             m.note]
            for m in r.metrics
        ]  # fmt: skip
        if rows:
            lines += _md_table(["metric", "value", "kind", "note"], rows)
            lines.append("")
        for note in r.notes:
            lines.append(f"- {_md_escape(note)}")
        for err in r.errors:
            lines.append(f"- **error:** {_md_escape(err)}")
        if r.notes or r.errors:
            lines.append("")
    lines += ["## Machine", ""]
    libs = ", ".join(f"{k} {v}" for k, v in (machine.get("libraries") or {}).items())
    lines += _md_table(
        ["CPUs", "CPU model", "system", "Python", "libraries"],
        [[str(machine.get("cpu_count")), str(machine.get("cpu_model")), str(machine.get("system", "")),
          str(machine.get("python")), libs]],
    )  # fmt: skip
    load = machine.get("load_average_at_start")
    if load:
        lines += [
            "",
            f"Load average when the run started: {', '.join(map(str, load))} (other work shares the machine).",
        ]
    return "\n".join(lines) + "\n"
