"""The benchmark harness's pure parts: statistics, the result schema and its files, tables, argument parsing and the
bare drift statistics. No servers, no timings asserted."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# `bench/` sits at the repo root and is not installed: make it importable when pytest's path lacks the root
# (with `pythonpath = ["."]` in pyproject's pytest options this line is a no-op).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import common  # noqa: E402
from bench.__main__ import BENCHMARKS, parse_only  # noqa: E402
from bench.common import BenchResult, Goal, Metric  # noqa: E402


def _result(**kw) -> BenchResult:
    res = BenchResult("serving", "a title", quick=True, **kw)
    res.add("flywheel req/s", 1234.5, "req/s", note="500 requests")
    res.fixed("server start", 3.2)
    res.add("answers agree", 1.0, "", "info")
    res.goal("flywheel ≥ 10× mlflow", 12.0, ">=", 10.0)
    res.goal("batch ≤ 1.5× in-process", 2.0, "<=", 1.5)
    return res


# --------------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [5.0, 1.0, 9.0, 3.0, 7.5, 2.25, 8.0]
    assert common.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_rejects_nothing_and_bad_q():
    with pytest.raises(ValueError):
        common.percentile([], 50)
    with pytest.raises(ValueError):
        common.percentile([1.0], 101)


def test_summarize_reports_milliseconds():
    s = common.summarize([0.001, 0.002, 0.003])
    assert s["n"] == 3
    assert s["p50_ms"] == pytest.approx(2.0)
    assert s["mean_ms"] == pytest.approx(2.0)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        common.summarize([])


def test_ratio_is_none_when_it_cannot_be_computed():
    assert common.ratio(3.0, 2.0) == pytest.approx(1.5)
    assert common.ratio(None, 2.0) is None
    assert common.ratio(1.0, 0.0) is None
    assert common.ratio(1.0, float("nan")) is None


# --------------------------------------------------------------------------------------------------- schema
def test_goal_verdicts():
    assert Goal("a", 1.05, "<=", 1.10).met is True
    assert Goal("b", 9.0, ">=", 10.0).met is False
    unmeasured = Goal("c", None, "<=", 1.0)
    assert unmeasured.met is None and unmeasured.verdict == "not measured"
    with pytest.raises(ValueError):
        Goal("d", 1.0, "<", 1.0)


def test_metric_group_and_benchmark_name_are_checked():
    with pytest.raises(ValueError):
        Metric("x", 1.0, group="other")
    with pytest.raises(ValueError):
        BenchResult("../escape", "t", quick=False)


def test_result_round_trips_through_json(tmp_path):
    res = _result()
    res.add("not measured", float("nan"), "s")
    path = common.write_result(res, tmp_path)
    assert path == tmp_path / "serving.json"
    data = json.loads(path.read_text())
    assert common.validate_result(data) == []
    assert data["metrics"][-1]["value"] is None  # NaN is not JSON: written as null
    back = BenchResult.from_dict(data)
    assert back.metric("flywheel req/s").value == pytest.approx(1234.5)
    assert [g.met for g in back.goals] == [True, False]
    assert [r.name for r in common.read_results(tmp_path)] == ["serving"]


def test_validate_result_names_the_problems():
    data = _result().as_dict()
    del data["goals"]
    data["quick"] = "yes"
    problems = common.validate_result(data)
    assert "missing 'goals'" in problems and any("'quick'" in p for p in problems)
    bad_metric = _result().as_dict()
    bad_metric["metrics"][0]["group"] = "bogus"
    assert any("group" in p for p in common.validate_result(bad_metric))
    assert common.validate_result([]) == ["expected an object, got list"]


def test_read_results_skips_files_that_are_not_results(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"name": "other"}))
    common.write_result(_result(), tmp_path)
    assert [r.name for r in common.read_results(tmp_path)] == ["serving"]


def test_results_path_defaults_to_bench_results():
    assert common.result_path("drift") == common.RESULTS_DIR / "drift.json"
    assert common.RESULTS_DIR.name == "results" and common.RESULTS_DIR.parent.name == "bench"
    with pytest.raises(ValueError):
        common.result_path("Drift/../../x")


def test_written_text_carries_no_paths_of_this_machine(tmp_path):
    res = _result()
    res.errors.append(f"server exited (log {common.RESULTS_DIR / 'x.log'}, tmp {tmp_path / 'state'})")
    data = json.loads(common.write_result(res, tmp_path).read_text())
    assert str(common.RESULTS_DIR.parent.parent) not in data["errors"][0]
    assert "<repo>" in data["errors"][0]


# --------------------------------------------------------------------------------------------------- rendering
def test_fmt_value():
    assert common.fmt_value(1.234, "×") == "1.23×"
    assert common.fmt_value(12345.6, "req/s") == "12,346 req/s"
    assert common.fmt_value(0.01234, "s") == "0.0123 s"
    assert common.fmt_value(None, "s") == "—"
    assert common.fmt_value(math.nan, "") == "—"


def test_render_table_lists_fixed_costs_apart_and_goals():
    text = common.render_table(_result())
    measured, fixed = text.index("measured"), text.index("fixed costs")
    assert measured < text.index("flywheel req/s") < fixed < text.index("server start")
    assert "NOT met" in text and "met" in text
    assert ">= 10.0×" in text


def test_render_markdown_has_goals_and_machine_but_no_host():
    machine = {"cpu_count": 2, "cpu_model": "Some CPU", "system": "Linux x86_64", "python": "3.11.9",
               "libraries": {"mlflow": "3.17.2"}, "load_average_at_start": [1.0, 0.5, 0.2]}  # fmt: skip
    md = common.render_markdown([_result()], machine)
    assert md.startswith("# Flywheel benchmarks")
    assert "| serving | flywheel ≥ 10× mlflow | 12.0× | >= 10.0× | met |" in md
    assert "| 2 | Some CPU | Linux x86_64 | 3.11.9 | mlflow 3.17.2 |" in md
    assert "fixed cost" in md


def test_cpu_model_from_cpuinfo():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    assert common.cpu_model(text) == "Intel(R) Xeon(R) Processor"
    assert common.cpu_model("processor : 0\n") == "unknown"


def test_machine_info_has_no_hostname():
    import socket

    info = common.machine_info()
    assert {"cpu_count", "cpu_model", "python", "libraries"} <= set(info)
    assert socket.gethostname() not in json.dumps(info) or len(socket.gethostname()) <= 2


# --------------------------------------------------------------------------------------------------- cli
def test_parse_only():
    assert parse_only(None) == list(BENCHMARKS)
    assert parse_only("drift, serving") == ["serving", "drift"]  # run order, not argument order
    assert parse_only("train,orchestration") == ["orchestration"]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_only("servng")


# --------------------------------------------------------------------------------------------------- pure helpers
def test_pick_method_mirrors_evidentlys_defaults():
    from bench.drift import pick_method

    assert pick_method(100_000, 500, "numerical") == "wasserstein"
    assert pick_method(100_000, 4, "numerical") == "jensenshannon"
    assert pick_method(100_000, 16, "categorical") == "jensenshannon"
    assert pick_method(1000, 500, "numerical") == "ks"
    assert pick_method(1000, 3, "categorical") == "chisquare"
    assert pick_method(1000, 2, "categorical") == "z"
    with pytest.raises(ValueError):
        pick_method(10, 10, "text")


def test_bare_statistics_match_scipy():
    from scipy import stats
    from scipy.spatial import distance

    from bench.drift import bare_drift, column_statistic

    rng = np.random.default_rng(0)
    ref = pd.Series(rng.normal(0, 1, 5000))
    cur = pd.Series(rng.normal(0.5, 1, 5000))
    method, score, drifted = column_statistic(ref, cur, "numerical")
    assert method == "wasserstein" and drifted
    assert score == pytest.approx(stats.wasserstein_distance(ref, cur) / np.std(ref))

    a = pd.Series(["x"] * 3000 + ["y"] * 2000 + [None] * 10)
    b = pd.Series(["x"] * 2500 + ["y"] * 2400 + ["z"] * 100)
    method, score, _ = column_statistic(a, b, "categorical")
    assert method == "jensenshannon"
    assert score == pytest.approx(distance.jensenshannon([3000 / 5000, 2000 / 5000, 0], [0.5, 0.48, 0.02]))

    frame_ref = pd.DataFrame({"n": ref, "c": a.iloc[:5000].fillna("x")})
    shuffled = frame_ref.sample(frac=1, random_state=1).reset_index(drop=True)  # same rows, other order: no drift
    verdict = bare_drift(frame_ref, shuffled, {"n": "numerical", "c": "categorical"}, 0.5)
    assert verdict.columns == {"n": False, "c": False} and verdict.dataset is False


def test_memory_parsers():
    from bench.memory import parse_kb, parse_ppid

    assert parse_ppid("1234 (python -m (x)) S 42 1234 1234 0 -1") == 42
    text = "Rss:              204800 kB\nPss:              102400 kB\nShared_Clean: 1 kB\n"
    assert parse_kb(text) == {"Rss": 204800, "Pss": 102400}


def test_row_feed_never_repeats_a_row():
    from bench.serving_load import RowFeed

    feed = RowFeed(pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0, 5.0], "b": list("vwxyz")}))
    first = json.loads(feed.next_body())
    assert first == {"dataframe_split": {"columns": ["a", "b"], "data": [[1.0, "v"]]}}
    assert list(feed.take(3)) == [1, 2, 3]
    assert json.loads(feed.next_body())["dataframe_split"]["data"] == [[5.0, "z"]]
    with pytest.raises(RuntimeError):
        feed.next_body()


def test_server_env_gives_servers_the_callers_openmp_setting(monkeypatch):
    monkeypatch.setattr(common, "_OUTSIDE_OMP", {})
    assert common.server_env() == {"OMP_NUM_THREADS": None}
    monkeypatch.setattr(common, "_OUTSIDE_OMP", {"OMP_NUM_THREADS": "4"})
    assert common.server_env() == {"OMP_NUM_THREADS": "4"}
