"""The demo's pure parts: month windows, the summary table and chart (the drift gauges: test_metrics_scrape.py)."""

from __future__ import annotations

from flywheel.cli.demo import MonthRow, challenger_gain, chart, month_bounds, summary_table


def _row(month: str, **kw) -> MonthRow:
    base = dict(
        month=month,
        rows_sent=100,
        serving_errors=0,
        live_f1=0.45,
        drift_share=0.4,
        dataset_drift=False,
        retrained=False,
        new_version=None,
        promoted=False,
        champion_version="1",
        champion_holdout_f1=0.5,
    )
    return MonthRow(**{**base, **kw})


def test_month_bounds_cover_march_to_december_without_gaps():
    bounds = month_bounds()
    assert bounds[0] == ("2013-03-01", "2013-04-01") and bounds[-1] == ("2013-12-01", "2014-01-01")
    assert len(bounds) == 10
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


def test_summary_table_has_a_row_per_month_and_marks_promotions():
    rows = [_row("2013-03"), _row("2013-06", drift_share=0.67, retrained=True, promoted=True, champion_version="2",
                                   new_version="2")]  # fmt: skip
    table = summary_table(rows).splitlines()
    assert table[0].startswith(
        "| month | served by | live F1 | drift share | decided by | challenger gain | retrained? | promoted?"
    )
    assert table[2] == "| 2013-03 | v1 | 0.450 | 0.40 | - | - | no | no | v1 | 0.500 | 0 |"
    assert table[3] == "| 2013-06 | v2 | 0.450 | 0.67 | - | - | yes | yes | v2 | 0.500 | 0 |"
    row = _row("2013-04", drift_share=None, live_f1=None, live_champion="1", signal="labels", challenger_gain=0.021,
               gain_lower=0.008)  # fmt: skip
    assert summary_table([row]).endswith("| v1 | - | - | labels | +0.021 (>= +0.008) | no | no | v1 | 0.500 | 0 |")


def test_challenger_gain_reads_the_verdicts_label_evidence():
    ev = {"metric": "f1", "live": 0.40, "challenger_live": 0.45, "champion_same_rows": 0.41, "gain_lower": 0.01}
    assert challenger_gain(ev) == (0.04, 0.01)
    assert challenger_gain({"metric": "rmse", "live": 2.0, "challenger_live": 1.5, "gain_lower": 0.2}) == (0.5, 0.2)
    assert challenger_gain({"metric": "f1", "live": 0.4, "challenger_live": None}) == (None, None)
    assert challenger_gain(None) == (None, None)


def test_chart_is_a_png(tmp_path):
    rows = [_row("2013-03"), _row("2013-04", retrained=True), _row("2013-05", promoted=True, champion_version="2")]
    path = chart(rows, tmp_path / "c.png", 0.55)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
