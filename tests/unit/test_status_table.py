"""`flywheel status` formatting on plain data: readable tables, never raw JSON, whichever form the tags take."""

from __future__ import annotations

import json

from flywheel.cli.status import describe_deployment, describe_drift, format_status, table

DEPLOYMENT = {
    "model_name": "flights-delay", "version": "3", "alias": "champion", "target": "local", "url": "http://x",
    "trigger": "event", "previous_version": "2", "started_at": "2026-12-01T10:00:00+00:00",
    "finished_at": "2026-12-01T10:00:09+00:00", "outcome": "serving", "reason": "",
}  # fmt: skip
DRIFT = {
    "model_name": "flights-delay", "champion": "3", "window": ["2013-03-01", "2013-04-01"], "dataset_drift": True,
    "drift_share": 0.6153, "rows": 20000, "retrain": True, "reasons": ["drift"], "report": "r.html",
}  # fmt: skip


def running_data(**model) -> dict:
    return {
        "state_dir": "/s",
        "supervisor": {"pid": 10, "alive": True},
        "processes": [
            {"name": "mlflow", "pid": 11, "state": "running"},
            {"name": "prefect", "pid": 12, "state": "GAVE UP (restarted 5 times within 600s)"},
        ],  # fmt: skip
        "urls": {"mlflow_url": "http://127.0.0.1:5050", "model_url": "http://127.0.0.1:5080"},
        "models": [{"name": "flights-delay", "champion": "3", "challenger": "4", "serving": "v3", **model}],
    }


def test_json_tags_become_readable_lines():
    dep = describe_deployment(json.dumps(DEPLOYMENT))
    assert dep == "v3 serving (champion) at 2026-12-01T10:00:09+00:00 by event after v2"
    drift = describe_drift(json.dumps(DRIFT))
    assert drift == (
        "dataset drift over [2013-03-01, 2013-04-01) on 20,000 rows against champion v3 (drift share 62%); "
        "retraining scheduled — drift"
    )


def test_readable_text_tags_are_shown_as_they_are():
    text = "v5 rolled back at 2026-12-01T11:00:00Z by the post-switch watch: error rate 9% > 5%"
    assert describe_deployment(text) == text
    assert describe_drift("no drift in 2013-05 (share 0.10)") == "no drift in 2013-05 (share 0.10)"


def test_broken_or_missing_tags_do_not_break_the_table():
    assert describe_deployment(None) == "none yet"
    assert describe_drift("") == "no check yet"
    assert describe_deployment("{not json") == "{not json"
    assert describe_drift(json.dumps({"dataset_drift": None})) == "no verdict; no retraining"
    assert len(describe_deployment("x" * 500)) == 400


def test_status_table_has_urls_models_and_no_json():
    out = format_status(running_data(last_deployment=json.dumps(DEPLOYMENT), last_drift=json.dumps(DRIFT)))
    assert "supervisor (flywheel up) pid 10: running" in out
    assert "MLflow UI + registry" in out and "http://127.0.0.1:5050" in out
    assert "model server (champion)" in out and "http://127.0.0.1:5080" in out
    lines = out.splitlines()
    assert any(line.split() == ["model", "champion", "challenger", "serving"] for line in lines), out
    assert any(line.split() == ["flights-delay", "v3", "v4", "v3"] for line in lines), out
    dep = next(line for line in lines if "last deployment" in line)
    assert dep.startswith("flights-delay") and "v3 serving (champion)" in dep
    at = next(i for i, line in enumerate(lines) if "last drift check" in line)
    assert "retraining scheduled" in lines[at] + lines[at + 1]  # a long cell wraps within its column
    assert lines[at + 1].startswith(" " * 30)
    assert max(len(line) for line in lines) <= 120, out  # fits a terminal
    assert "GAVE UP" in out
    assert "{" not in out and '"' not in out  # no raw JSON anywhere


def test_dead_supervisor_is_reported_not_running():
    data = running_data()
    data["supervisor"]["alive"] = False
    data["processes"] = [{"name": "mlflow", "pid": 11, "state": "DEAD"}]
    out = format_status(data)
    assert "pid 10: DEAD" in out and "running" not in out.splitlines()[0]


def test_no_stack_and_no_registry():
    assert format_status({"state_dir": "/s", "supervisor": None}) == "no Flywheel stack is running from /s"
    data = running_data()
    data["models"] = None
    assert "models: the MLflow server is not answering" in format_status(data)
    data["models"] = []
    assert "models: none registered yet" in format_status(data)


def test_table_wraps_long_cells_in_their_column():
    out = table(["k", "v"], [["a", "word " * 30]]).splitlines()
    assert len(out) == 4 and all(len(line) <= 83 for line in out)
    assert out[3].startswith("   word")


def test_table_aligns_columns():
    out = table(["a", "bbb"], [["xx", "y"], ["z", "wwww"]]).splitlines()
    assert out == ["a   bbb", "--  ----", "xx  y", "z   wwww"]
