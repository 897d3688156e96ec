"""`flywheel ci`: the Markdown report, the verdict JSON and the exit-code mapping (the train flow replaced by a
stub here; the real flow is integration-tested elsewhere)."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from flywheel.cli import ci

BINARY = {"accuracy": 0.80, "f1": 0.41, "precision": 0.35, "recall": 0.50, "roc_auc": 0.72}


def registered(passed: bool, champion: dict | None = None, champion_version: str | None = None, **extra) -> dict:
    """A train-flow result for a newly registered version, as `flows.train.train` returns it."""
    reasons = ["f1 0.4100 >= 0.3 ok", "roc_auc 0.7200 >= 0.6 ok"]
    if champion is None:
        reasons.append("no champion yet: floors only")
    else:
        verdict = "ok" if passed else "FAILED (uplift)"
        reasons.append(f"f1 uplift over champion v{champion_version}: +0.0100 (needs ≥ 0.005) {verdict}")
    result = {
        "status": "registered",
        "model_name": "flights-delay",
        "version": "7",
        "promoted": passed,
        "data_hash": "d375bdcee98c5902",
        "rows": 49855,
        "metrics": dict(BINARY),
        "gate": {
            "passed": passed,
            "metric": "f1",
            "candidate": dict(BINARY),
            "champion": champion,
            "champion_version": champion_version,
            "reasons": reasons,
        },
        "window": ("2013-01-01", "2013-03-01"),
    }
    return {**result, **extra}


def unchanged(passed: bool | None, champion_version: str | None, champion_metrics: dict | None = None) -> dict:
    """An "unchanged" run as `run_ci` enriches it with the version's recorded gate verdict."""
    return {
        "status": "unchanged",
        "model_name": "flights-delay",
        "version": "7",
        "promoted": False,
        "data_hash": "d375bdcee98c5902",
        "rows": 49855,
        "metrics": dict(BINARY),
        "gate": None,
        "window": ("2013-01-01", "2013-03-01"),
        "recorded_gate": {
            "passed": passed,
            "reasons": ["f1 0.4100 >= 0.3 ok"] if passed is not None else [],
            "champion_version": champion_version,
            "champion_metrics": champion_metrics,
        },
    }


# ------------------------------------------------------------------------------------------ render_report
def test_report_of_a_passed_gate_compares_candidate_and_champion():
    champ = {**BINARY, "f1": 0.40, "roc_auc": 0.73}
    result = registered(True, champ, "6")
    md = ci.render_report(result)

    assert md.startswith("## Flywheel model CI: `flights-delay` v7: ✅ gate passed — promoted to `champion`")
    assert "| metric | candidate | champion (v6) | Δ (candidate − champion) |" in md
    assert "| **f1** (primary) | 0.4100 | 0.4000 | +0.0100 ▲ |" in md
    assert "| roc_auc | 0.7200 | 0.7300 | -0.0100 ▼ |" in md
    assert "| accuracy | 0.8000 | 0.8000 | ±0.0000 |" in md
    assert "**PASSED**. Primary metric: `f1`. Champion: v6." in md
    assert "| data hash | `d375bdcee98c5902` |" in md
    assert "| rows | 49855 |" in md
    assert "| event-time window | 2013-01-01 → 2013-03-01 |" in md
    assert "| deploy | yes: this version is `champion` |" in md
    assert "- f1 uplift over champion v6: +0.0100 (needs ≥ 0.005) ok" in md
    assert ci.exit_code(result) == 0 and ci.should_deploy(result)


def test_report_of_a_failed_gate():
    result = registered(False, {**BINARY, "f1": 0.45}, "6")
    md = ci.render_report(result)

    assert "v7: ❌ gate failed — stays `challenger`" in md
    assert "**FAILED**. Primary metric: `f1`. Champion: v6." in md
    assert "| **f1** (primary) | 0.4100 | 0.4500 | -0.0400 ▼ |" in md
    assert "FAILED (uplift)" in md
    assert "| deploy | no |" in md and "| exit code | 1 |" in md
    assert ci.exit_code(result) == 1 and not ci.should_deploy(result)


def test_report_of_the_first_model_has_no_champion_column():
    result = registered(True)
    md = ci.render_report(result)

    assert "Champion: none (first model: held to the absolute floors only)." in md
    assert "| metric | candidate |\n|---|---:|\n" in md
    assert "| **f1** (primary) | 0.4100 |" in md
    assert "Δ" not in md
    assert "- no champion yet: floors only" in md
    assert ci.exit_code(result) == 0


def test_report_of_an_unchanged_run_whose_version_is_the_champion():
    result = unchanged(True, champion_version="7")
    md = ci.render_report(result)

    assert "v7: ✅ unchanged — this version passed its gate" in md
    assert "nothing new registered: same data, params and code" in md
    assert "**PASSED**." in md and "`champion` is v7 (this version)." in md
    assert "| metric | candidate |" in md  # nothing to compare a champion with: it is this version
    assert ci.exit_code(result) == 0 and ci.should_deploy(result)


def test_unchanged_run_whose_version_passed_but_champion_moved_on_passes_without_deploying():
    result = unchanged(True, champion_version="9", champion_metrics={**BINARY, "f1": 0.43})
    md = ci.render_report(result)

    assert "`champion` is v9." in md
    assert "| **f1** (primary) | 0.4100 | 0.4300 | -0.0200 ▼ |" in md
    assert "| deploy | no |" in md
    # deploy-model run by hand would move `champion` back to v7: the pipelines must not deploy it.
    assert ci.exit_code(result) == 0 and not ci.should_deploy(result)


@pytest.mark.parametrize(("passed", "champion"), [(False, "6"), (None, "6"), (False, None), (None, None)])
def test_unchanged_run_without_a_passing_verdict_fails(passed, champion):
    result = unchanged(passed, champion_version=champion)
    md = ci.render_report(result)

    assert "❌ unchanged — this version did not pass its gate" in md
    assert ("No gate verdict is recorded on this version." in md) == (passed is None)
    assert ("The model has no `champion`." in md) == (champion is None)
    assert ci.exit_code(result) == 1 and not ci.should_deploy(result)


def test_regression_deltas_favour_a_lower_rmse():
    cand, champ = {"rmse": 10.0, "mae": 8.0, "r2": 0.50}, {"rmse": 12.0, "mae": 7.0, "r2": 0.40}
    result = registered(True, champ, "2")
    result["gate"].update(metric="rmse", candidate=cand)
    md = ci.render_report(result)

    assert "| **rmse** (primary) | 10.0000 | 12.0000 | -2.0000 ▲ |" in md
    assert "| mae | 8.0000 | 7.0000 | +1.0000 ▼ |" in md
    assert "| r2 | 0.5000 | 0.4000 | +0.1000 ▲ |" in md


def test_report_escapes_table_pipes_in_reasons_and_renders_errors():
    result = registered(False)
    result["gate"]["reasons"] = ["odd | reason\nover two lines"]
    assert "- odd \\| reason over two lines" in ci.render_report(result)

    err = {"status": "error", "model_name": "churn", "error": "SpecError: dataset spec not found: x.yaml"}
    md = ci.render_report(err)
    assert md.startswith("## Flywheel model CI: `churn` — ⛔ error (exit 2)")
    assert "```\nSpecError: dataset spec not found: x.yaml\n```" in md
    assert ci.exit_code(err) == 2 and not ci.should_deploy(err)


def test_ci_summary_is_what_the_pipelines_read():
    summary = ci.ci_summary(registered(True, {**BINARY, "f1": 0.40}, "6"))
    assert summary["exit_code"] == 0 and summary["verdict"] == "passed" and summary["deploy"] is True
    assert (summary["model_name"], summary["version"], summary["champion_version"]) == ("flights-delay", "7", "6")
    assert summary["window"] == ["2013-01-01", "2013-03-01"]
    json.dumps(summary)  # plain JSON

    failed = ci.ci_summary(registered(False, {**BINARY, "f1": 0.45}, "6"))
    assert (failed["exit_code"], failed["verdict"], failed["deploy"]) == (1, "failed", False)
    crashed = ci.ci_summary({"status": "crashed", "model_name": "m", "error": "boom"})
    assert (crashed["exit_code"], crashed["verdict"], crashed["deploy"]) == (1, "error", False)


# ------------------------------------------------------------------------------------------------- run_ci
class FakeRun:
    """Stands in for the train flow, the tracking server and the registry look-up."""

    def __init__(self, monkeypatch, result=None, raises: Exception | None = None, recorded: dict | None = None):
        self.result, self.raises, self.recorded = result, raises, recorded
        self.train_kwargs: dict | None = None
        self.server_started = False
        self.recorded_for: tuple | None = None
        monkeypatch.setattr("flywheel.stack.local.prepare_env", lambda settings: None)
        monkeypatch.setattr("flywheel.stack.local.tracking_server", self.tracking_server)
        monkeypatch.setattr(ci, "_train", self.train)
        monkeypatch.setattr(ci, "recorded_gate", self.recorded_gate)

    @contextmanager
    def tracking_server(self, settings):
        self.server_started = True
        yield "http://127.0.0.1:1"

    def train(self, **kwargs):
        self.train_kwargs = kwargs
        if self.raises:
            raise self.raises
        return self.result

    def recorded_gate(self, model_name, version):
        self.recorded_for = (model_name, version)
        return self.recorded


@pytest.fixture
def state(tmp_path, fresh_settings):
    fresh_settings.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
    fresh_settings.delenv("GITHUB_STEP_SUMMARY", raising=False)  # never the real job summary of a CI run
    fresh_settings.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "state"


def quiet(_: str) -> None:
    pass


def test_run_ci_passes_and_writes_report_result_and_job_summary(state, tmp_path, monkeypatch):
    fake = FakeRun(monkeypatch, registered(True, {**BINARY, "f1": 0.40}, "6"))
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    params = tmp_path / "params.yaml"
    params.write_text("estimator: logistic_regression\nparams: {C: 0.5}\n")

    code = ci.run_ci(params=params, start="2013-01-01", end="2013-03-01", model_name="flights-delay", echo=quiet)

    assert code == 0
    assert fake.server_started
    assert fake.train_kwargs == {
        "spec_path": None, "data_uri": None, "params_path": str(params),
        "start": "2013-01-01", "end": "2013-03-01", "model_name": "flights-delay",
    }  # fmt: skip
    report = (state / "ci-report.md").read_text()
    assert "✅ gate passed" in report
    assert summary.read_text() == "earlier step\n" + report
    result = json.loads((state / "ci-result.json").read_text())
    assert result["exit_code"] == 0 and result["deploy"] is True and result["version"] == "7"
    assert result["report"] == str(state / "ci-report.md")


def test_run_ci_fails_on_a_failed_gate(state, tmp_path, monkeypatch):
    FakeRun(monkeypatch, registered(False, {**BINARY, "f1": 0.45}, "6"))
    report = tmp_path / "out" / "report.md"

    assert ci.run_ci(report_path=report, echo=quiet) == 1
    assert "❌ gate failed" in report.read_text()
    assert json.loads((report.parent / "ci-result.json").read_text())["exit_code"] == 1
    assert not (state / "ci-report.md").exists()


@pytest.mark.parametrize(
    ("recorded", "expected_code", "expected_deploy"),
    [
        ({"passed": True, "reasons": [], "champion_version": "7", "champion_metrics": None}, 0, True),
        ({"passed": True, "reasons": [], "champion_version": "9", "champion_metrics": BINARY}, 0, False),
        ({"passed": False, "reasons": [], "champion_version": "6", "champion_metrics": BINARY}, 1, False),
    ],
)
def test_run_ci_looks_up_the_recorded_verdict_of_an_unchanged_version(
    state, monkeypatch, recorded, expected_code, expected_deploy
):
    result = unchanged(None, None)
    del result["recorded_gate"]  # what the flow returns; run_ci adds the look-up
    fake = FakeRun(monkeypatch, result, recorded=recorded)

    assert ci.run_ci(echo=quiet) == expected_code
    assert fake.recorded_for == ("flights-delay", "7")
    assert json.loads((state / "ci-result.json").read_text())["deploy"] is expected_deploy


def test_run_ci_reports_a_data_error_from_the_flow_as_a_user_error(state, tmp_path, monkeypatch):
    from flywheel.tasks.data import DataSourceError

    FakeRun(monkeypatch, raises=DataSourceError("data file not found: /nope.csv"))
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("MY_SUMMARY", str(summary))

    assert ci.run_ci(data="/nope.csv", summary_env="MY_SUMMARY", echo=quiet) == 2
    report = (state / "ci-report.md").read_text()
    assert "⛔ error (exit 2)" in report and "DataSourceError: data file not found: /nope.csv" in report
    assert summary.read_text() == report
    assert json.loads((state / "ci-result.json").read_text())["verdict"] == "error"


def test_run_ci_rejects_a_bad_spec_or_params_file_before_starting_a_server(state, tmp_path, monkeypatch):
    fake = FakeRun(monkeypatch, registered(True))
    assert ci.run_ci(spec=tmp_path / "missing.yaml", echo=quiet) == 2
    assert "SpecError" in (state / "ci-report.md").read_text()

    bad_params = tmp_path / "params.yaml"
    bad_params.write_text("estimator: [unclosed\n")
    assert ci.run_ci(params=bad_params, echo=quiet) == 2
    assert "ModelSpecError" in (state / "ci-report.md").read_text()
    assert not fake.server_started and fake.train_kwargs is None


def test_run_ci_reports_then_reraises_anything_else(state, monkeypatch):
    FakeRun(monkeypatch, raises=RuntimeError("the disk is full"))

    with pytest.raises(RuntimeError, match="the disk is full"):
        ci.run_ci(echo=quiet)
    assert "⛔ crashed (exit 1)" in (state / "ci-report.md").read_text()
    assert json.loads((state / "ci-result.json").read_text())["exit_code"] == 1
