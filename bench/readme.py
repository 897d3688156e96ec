"""The README's benchmark tables, generated from `bench/results/*.json` — never typed.

`python -m bench.readme` rewrites the block between the two markers in README.md ("Benchmarks"); `python -m bench`
does it after every run. tests/unit/test_bench_readme.py checks that the README holds exactly what the results
render to, so a figure in the README is always one a run measured.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bench import common

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- benchmark tables: generated from bench/results/*.json by `python -m bench.readme`; do not edit -->"
END = "<!-- end of the generated benchmark tables -->"
ORDER = ("orchestration", "serving", "drift", "latency", "memory")
# serving phases: (label in the table, metric name prefix)
SERVING_PHASES = (
    ("single rows, one client", "sequential single-row"),
    ("single rows, 8 clients", "8 clients"),
    ("single rows, 32 clients", "32 clients"),
    ("10,000-row batch", "10,000-row batch"),
)


def _ordered(results: Sequence[common.BenchResult]) -> list[common.BenchResult]:
    return sorted(results, key=lambda r: (ORDER.index(r.name) if r.name in ORDER else len(ORDER), r.name))


def _value(result: common.BenchResult, name: str) -> float | None:
    try:
        return result.metric(name).value
    except KeyError:
        return None


def _machine_line(results: Sequence[common.BenchResult]) -> str:
    latest = max((r for r in results if r.machine), key=lambda r: r.started_at, default=None)
    machine = latest.machine if latest is not None else {}
    libs = machine.get("libraries") or {}
    parts = [f"{machine.get('cpu_count', '?')} × {machine.get('cpu_model', 'unknown CPU')}",
             str(machine.get("system", "")), f"Python {machine.get('python', '?')}"]  # fmt: skip
    parts += [f"{k} {libs[k]}" for k in ("prefect", "mlflow", "scikit-learn", "evidently") if k in libs]
    load = machine.get("load_average_at_start")
    if load:
        parts.append(f"load average {load[0]} when the latest run ({latest.name}) started (other jobs share it)")
    return ", ".join(p for p in parts if p)


def _serving_table(serving: common.BenchResult) -> list[str]:
    def cell(label: str, phase: str) -> str:
        rate = _value(serving, f"{label}: {phase} req/s")
        p50, p99 = _value(serving, f"{label}: {phase} p50"), _value(serving, f"{label}: {phase} p99")
        if p50 is None:
            return "—"
        shown = f"{common.fmt_value(rate, 'req/s')}, " if rate is not None and "batch" not in phase else ""
        return f"{shown}p50 {common.fmt_value(p50, 'ms')}, p99 {common.fmt_value(p99, 'ms')}"

    rows = [[label, cell("flywheel", phase), cell("mlflow serve", phase)] for label, phase in SERVING_PHASES]
    inproc = _value(serving, "in-process pyfunc.predict, 10,000 rows p50")
    if inproc is not None:
        rows.append(["in-process `pyfunc.predict`, 10,000 rows", "", f"p50 {common.fmt_value(inproc, 'ms')}"])
    flywheel_pss = _value(serving, "flywheel: PSS after the load")
    mlflow_pss = _value(serving, "mlflow serve: PSS after the load")
    if flywheel_pss is not None and mlflow_pss is not None:
        rows.append(["memory (PSS) after the load", common.fmt_value(flywheel_pss, "MB"),
                     common.fmt_value(mlflow_pss, "MB")])  # fmt: skip
    lines = common._md_table(["serving", "Flywheel", "`mlflow models serve`"], rows)
    compiled = [m for m in serving.metrics if m.name.endswith("labels that differ from pyfunc")]
    if compiled:
        lines += ["", "Compiled versions (packaging compiles each; parity on its own holdout sample):", ""]
        lines += common._md_table(
            ["version", "engine", "parity"],
            [[m.name.split(":")[0], "onnxruntime" if m.note.startswith("compiled: yes") else "pyfunc", m.note]
             for m in compiled],
        )  # fmt: skip
    return lines


def render(results: Sequence[common.BenchResult]) -> str:
    """The generated block (markers included) for these results."""
    results = _ordered(results)
    lines = [START, "", f"Latest results — {_machine_line(results)}; read the ratios, not the absolute times:", ""]
    rows = [[r.name, g.name, common.fmt_value(g.value, g.unit), g.verdict, r.started_at[:10]]
            for r in results for g in r.goals]  # fmt: skip
    lines += common._md_table(["benchmark", "goal", "measured", "verdict", "run"], rows)
    serving = next((r for r in results if r.name == "serving"), None)
    if serving is not None and serving.metrics:
        lines += ["", *_serving_table(serving)]
    lines += ["", END]
    return "\n".join(lines)


def splice(text: str, block: str) -> str:
    """`text` with the generated block replaced by `block` (ValueError without the markers)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError("README.md has no generated benchmark block (its start and end markers)")
    return text[:start] + block + text[end + len(END) :]


def update(readme: Path = README, results_dir: Path | None = None) -> bool:
    """Rewrite the README's block from the results; True when it changed."""
    text = readme.read_text()
    new = splice(text, render(common.read_results(results_dir)))
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    changed = update()
    print(f"README.md benchmark tables {'regenerated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
