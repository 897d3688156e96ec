"""The README's benchmark tables are generated from bench/results/*.json (bench/readme.py), never typed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import common, readme  # noqa: E402


def test_the_readme_holds_exactly_what_the_results_render_to():
    text = readme.README.read_text()
    assert text.count(readme.START) == 1 and text.count(readme.END) == 1
    block = text[text.index(readme.START) : text.index(readme.END) + len(readme.END)]
    assert block == readme.render(common.read_results()), "run `python -m bench.readme` (or `make bench`)"


def test_render_lists_every_goal_and_the_serving_figures(tmp_path):
    res = common.BenchResult("serving", "t", quick=False, machine={"cpu_count": 2, "cpu_model": "CPU",
                                                                   "python": "3.11", "libraries": {}})  # fmt: skip
    for label in ("flywheel", "mlflow serve"):
        res.add(f"{label}: sequential single-row req/s", 1000.0, "req/s")
        res.add(f"{label}: sequential single-row p50", 0.5, "ms")
        res.add(f"{label}: sequential single-row p99", 1.5, "ms")
    res.add("v1 (a model): labels that differ from pyfunc", 0.0, "", "info", "compiled: yes (onnxruntime; …)")
    res.goal("single rows, sequential: flywheel ≥ 10× mlflow serve req/s", 12.0, ">=", 10.0)
    common.write_result(res, tmp_path)
    block = readme.render(common.read_results(tmp_path))
    assert block.startswith(readme.START) and block.endswith(readme.END)
    assert "| serving | single rows, sequential: flywheel ≥ 10× mlflow serve req/s | 12.0× | met |" in block
    assert "| single rows, one client | 1,000 req/s, p50 0.5 ms, p99 1.50 ms |" in block
    assert "| v1 (a model) | onnxruntime |" in block
    spliced = readme.splice(f"intro\n{readme.START}\nold\n{readme.END}\noutro\n", block)
    assert spliced == f"intro\n{block}\noutro\n"
    with pytest.raises(ValueError):
        readme.splice("no markers here", block)
