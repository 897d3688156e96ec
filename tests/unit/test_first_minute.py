"""The first minute with a new table (issue 14): `flywheel train` checks the spec, the params file and the data
before any server starts, and a user's mistake prints its message with no traceback; a crash keeps its traceback.

The checks run on small CSVs made from scikit-learn's breast-cancer table; the command runs in-process with Typer's
CliRunner, its tracking server and flow replaced, so no server is ever started here.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import contextmanager

import pandas as pd
import pytest
import yaml
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from flywheel.cli import precheck
from flywheel.cli.main import app
from flywheel.cli.precheck import check_train_input
from flywheel.cli.tracebacks import PREFECT_RUN_LOGGERS, UserErrorTracebackFilter, hide_user_error_tracebacks
from flywheel.core.spec import SpecError
from flywheel.tasks.data import DataSourceError, window
from flywheel.tasks.model_specs import ModelSpecError
from flywheel.tasks.validation import DataValidationError

FEATURES = ["mean_radius", "mean_texture", "mean_area"]


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    """569 rows, two classes; column names without spaces, and an event time for windows."""
    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame["seen_at"] = pd.date_range("2024-01-01", periods=len(frame), freq="h").strftime("%Y-%m-%dT%H:%M:%S")
    return frame[[*FEATURES, "seen_at", "target"]]


@pytest.fixture
def env(fresh_settings, tmp_path):
    """Fresh settings, a private state dir, no configured spec, data or servers."""
    for var in ("FLYWHEEL_SPEC", "FLYWHEEL_DATA", "FLYWHEEL_CANDIDATE_METRIC", "MLFLOW_TRACKING_URI"):
        fresh_settings.delenv(var, raising=False)
    fresh_settings.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
    return fresh_settings


def write_spec(tmp_path, source, **fields) -> str:
    spec = {"name": "cancer", "source": str(source), "target": "target", "task": "binary", "positive_class": 1,
            "numeric": FEATURES, "event_time": "seen_at", **fields}  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture
def good_csv(tmp_path, cancer):
    path = tmp_path / "good.csv"
    cancer.to_csv(path, index=False)
    return path


@pytest.fixture
def bad_csv(tmp_path, cancer):
    """Four problems at once: a missing column, text in a numeric column, one class only, too few rows."""
    bad = cancer.head(150).drop(columns=["mean_area"]).astype({"mean_texture": object})
    bad.loc[3, "mean_texture"] = "twelve"
    bad["target"] = 1
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    return path


BAD_DATA_PROBLEMS = ("missing columns: ['mean_area']", "numeric column 'mean_texture'", "single class",
                     "too few rows: 150")  # fmt: skip


# ------------------------------------------------------------------------------------------- the checks
def test_a_valid_local_file_is_read_and_validated(env, tmp_path, good_csv):
    checked = check_train_input(write_spec(tmp_path, good_csv))
    assert checked.report.rows == 569 and checked.plan.spec.source == str(good_csv)
    assert checked.summary().startswith("data checked: 569 rows")


def test_the_data_uri_overrides_the_spec_source_and_the_window_applies(env, tmp_path, good_csv):
    checked = check_train_input(write_spec(tmp_path, "elsewhere.csv"), str(good_csv), start="2024-01-02")
    assert checked.plan.spec.source == str(good_csv)
    assert checked.report.rows == 569 - 24
    assert "[2024-01-02, …)" in checked.summary()


def test_a_local_folder_and_glob_are_read(env, tmp_path, cancer):
    folder = tmp_path / "parts"
    folder.mkdir()
    cancer.iloc[:300].to_csv(folder / "a.csv", index=False)
    cancer.iloc[300:].to_parquet(folder / "b.parquet", index=False)
    spec = write_spec(tmp_path, folder)
    assert check_train_input(spec).report.rows == 569
    assert check_train_input(spec, str(folder / "*.csv")).report.rows == 300


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "dataset spec not found"),
        ("name: [unclosed\n", "not valid YAML"),
        ("source: x.csv\ntarget: y\npositive_class: 1\n", "no feature columns"),
    ],
)
def test_a_bad_spec(env, tmp_path, content, message):
    path = tmp_path / "my-spec.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError, match=message):
        check_train_input(path)


def test_a_missing_data_file(env, tmp_path):
    with pytest.raises(DataSourceError, match="data file not found"):
        check_train_input(write_spec(tmp_path, tmp_path / "nope.csv"))


def test_invalid_data_lists_every_problem(env, tmp_path, bad_csv):
    with pytest.raises(DataValidationError) as err:
        check_train_input(write_spec(tmp_path, bad_csv))
    assert len(err.value.problems) == 4
    for problem in BAD_DATA_PROBLEMS:
        assert problem in str(err.value)


def test_a_window_bound_that_is_not_a_date(env, tmp_path, good_csv):
    with pytest.raises(DataSourceError, match="not a date"):
        check_train_input(write_spec(tmp_path, good_csv), end="next tuesday")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "params file not found"),
        ("estimator: [unclosed\n", "not valid YAML"),
        ("estimator: xgboost_deluxe\n", "xgboost_deluxe"),  # an unknown estimator
        ("estimator: random_forest\nparams: {n_trees: 5}\n", "n_trees"),  # a parameter it does not take
        ("estimator: ridge\n", "(?i)ridge"),  # a regressor for a binary task
    ],
)
def test_a_bad_params_file(env, tmp_path, good_csv, content, message):
    params = tmp_path / "params.yaml"
    if content is not None:
        params.write_text(content)
    with pytest.raises(ModelSpecError, match=message):
        check_train_input(write_spec(tmp_path, good_csv), params_path=params)


def test_a_selection_metric_of_the_wrong_task(env, tmp_path, good_csv):
    env.setenv("FLYWHEEL_CANDIDATE_METRIC", "rmse")
    with pytest.raises(ModelSpecError, match="not a binary metric"):
        check_train_input(write_spec(tmp_path, good_csv))


def test_the_demo_data_is_read_on_its_default_window(env, monkeypatch, tmp_path, flights):
    from flywheel.core.spec import load_spec

    monkeypatch.setattr("flywheel.tasks.data.load_flights", lambda: flights)
    checked = check_train_input()
    assert (checked.plan.start, checked.plan.end) == ("2013-01-01", "2013-03-01")
    assert checked.report.rows == len(window(flights, "time_hour", "2013-01-01", "2013-03-01"))

    # The demo table with a spec of one's own: a column it lacks is found before any server starts.
    spec = tmp_path / "my-flights.yaml"
    spec.write_text(yaml.safe_dump({**load_spec().model_dump(), "numeric": ["distance", "seats"]}))
    with pytest.raises(DataValidationError, match=r"missing columns: \['seats'\]"):
        check_train_input(spec)


@pytest.fixture
def aws(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return monkeypatch


def test_an_s3_object_is_read_and_validated(env, aws, tmp_path, good_csv, bad_csv):
    import boto3
    from moto import mock_aws

    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="tables")
        s3.put_object(Bucket="tables", Key="good.csv", Body=good_csv.read_bytes())
        s3.put_object(Bucket="tables", Key="bad.csv", Body=bad_csv.read_bytes())
        spec = write_spec(tmp_path, "s3://tables/good.csv")
        assert check_train_input(spec).report.rows == 569
        with pytest.raises(DataValidationError, match="single class"):
            check_train_input(spec, "s3://tables/bad.csv")
        with pytest.raises(DataSourceError, match="does not exist"):
            check_train_input(spec, "s3://no-such-bucket/good.csv")


def test_an_unreachable_s3_endpoint_is_left_to_the_flow_and_its_retries(env, aws, tmp_path):
    from flywheel.stack.processes import free_port

    aws.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    checked = check_train_input(write_spec(tmp_path, "s3://tables/good.csv"))
    assert checked.report is None and "S3 endpoint unreachable" in checked.unreachable
    assert checked.summary().startswith("data not checked yet")


# ------------------------------------------------------------------------------------- the traceback filter
def emit(exc: Exception) -> str:
    """What a handler prints for an ERROR record carrying `exc`, through a logger with the filter."""
    logger = logging.getLogger(f"test.first_minute.{id(exc)}")
    logger.propagate = False
    logger.addFilter(UserErrorTracebackFilter())
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(logging.Formatter().format(record))
    logger.addHandler(handler)
    try:
        raise exc
    except Exception:
        logger.error("Task run failed with exception: %r", exc, exc_info=True)
    return "\n".join(lines)


def test_a_user_error_is_logged_without_its_traceback():
    text = emit(DataValidationError(["target 'y' has a single class ['1']: cannot train"]))
    assert "Task run failed with exception: DataValidationError" in text and "Traceback" not in text


def test_a_crash_keeps_its_traceback():
    text = emit(RuntimeError("a bug"))
    assert "Traceback (most recent call last)" in text and "RuntimeError: a bug" in text


@pytest.fixture
def prefect_run_loggers():
    """Restore the filters of Prefect's run loggers after a test that installs ours."""
    saved = {name: list(logging.getLogger(name).filters) for name in PREFECT_RUN_LOGGERS}
    yield
    for name, filters in saved.items():
        logging.getLogger(name).filters[:] = filters


def test_the_filter_is_installed_once_on_both_run_loggers(prefect_run_loggers):
    hide_user_error_tracebacks()
    hide_user_error_tracebacks()
    for name in PREFECT_RUN_LOGGERS:
        assert sum(isinstance(f, UserErrorTracebackFilter) for f in logging.getLogger(name).filters) == 1


def test_the_filter_survives_prefects_logging_setup():
    """The CLI installs it before Prefect is imported; Prefect's dictConfig at import keeps a logger's filters."""
    code = (
        "import logging\n"
        "from flywheel.cli.tracebacks import hide_user_error_tracebacks, UserErrorTracebackFilter\n"
        "hide_user_error_tracebacks()\n"
        "import prefect, prefect.logging.configuration as c\n"
        "c.setup_logging(incremental=False)\n"
        "names = ('prefect.task_runs', 'prefect.flow_runs')\n"
        "print(all(any(isinstance(f, UserErrorTracebackFilter) for f in logging.getLogger(n).filters) for n in names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


# ------------------------------------------------------------------------------------------ the command
class NoServers:
    """Stands in for the tracking server and the train flow; records whether the command got that far."""

    def __init__(self, monkeypatch, result: dict | None = None, raises: Exception | None = None):
        self.started = False
        self.result, self.raises = result, raises
        self.flow_kwargs: dict | None = None
        monkeypatch.setattr("flywheel.stack.local.tracking_server", self.tracking_server)
        monkeypatch.setattr("flywheel.flows.train.train", self.train)

    @contextmanager
    def tracking_server(self, settings):
        self.started = True
        yield "http://127.0.0.1:1"

    def train(self, **kwargs):
        self.flow_kwargs = kwargs
        if self.raises:
            raise self.raises
        return self.result


def invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


REGISTERED = {"status": "registered", "model_name": "cancer-model", "version": "1", "promoted": True,
              "metrics": {"f1": 0.9}, "gate": {"reasons": ["first model"]}}  # fmt: skip


def test_bad_data_prints_the_problem_list_and_starts_no_server(env, monkeypatch, tmp_path, bad_csv,
                                                               prefect_run_loggers):  # fmt: skip
    fake = NoServers(monkeypatch, REGISTERED)
    result = invoke("--spec", write_spec(tmp_path, "elsewhere.csv"), "--data", str(bad_csv))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: data failed validation:\n")
    for problem in BAD_DATA_PROBLEMS:
        assert problem in result.stderr
    assert "Traceback" not in result.output
    assert not fake.started and fake.flow_kwargs is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spec", "missing.yaml"], "error: dataset spec not found: missing.yaml"),
        (["--numeric", "target"], "error: dataset spec with the command-line options is invalid: target 'target' is"),
        (["--params", "missing-params.yaml"], "error: params file not found: missing-params.yaml"),
    ],
)
def test_a_bad_spec_option_or_params_file_prints_one_clear_line(env, monkeypatch, tmp_path, good_csv, args, message,
                                                                prefect_run_loggers):  # fmt: skip
    fake = NoServers(monkeypatch, REGISTERED)
    monkeypatch.chdir(tmp_path)
    if args[0] != "--spec":
        args = ["--spec", write_spec(tmp_path, good_csv), *args]
    result = invoke(*args)
    assert result.exit_code == 1 and result.stderr.startswith(message)
    assert "Traceback" not in result.output and "pydantic" not in result.output
    assert not fake.started


def test_good_data_is_checked_then_the_flow_runs(env, monkeypatch, tmp_path, good_csv, prefect_run_loggers):
    fake = NoServers(monkeypatch, {**REGISTERED, "rows_unlabeled": 3})
    result = invoke("--spec", write_spec(tmp_path, good_csv), "--model-name", "cancer-model")
    assert result.exit_code == 0, result.output
    assert result.stdout.index("data checked: 569 rows") < result.stdout.index("MLflow tracking server")
    assert "registered cancer-model v1: promoted to champion" in result.stdout
    assert "rows without a label (not trained on): 3" in result.stdout
    assert fake.flow_kwargs["spec_path"] == write_spec(tmp_path, good_csv) and fake.flow_kwargs["data_uri"] is None


def test_a_result_without_an_unlabeled_count_prints_none(env, monkeypatch, tmp_path, good_csv, prefect_run_loggers):
    NoServers(monkeypatch, REGISTERED)
    result = invoke("--spec", write_spec(tmp_path, good_csv))
    assert result.exit_code == 0 and "without a label" not in result.stdout


def test_a_user_error_from_the_flow_prints_only_its_message(env, monkeypatch, tmp_path, good_csv,
                                                            prefect_run_loggers):  # fmt: skip
    NoServers(monkeypatch, raises=DataValidationError(["target 'target' has a single class ['1']: cannot train"]))
    result = invoke("--spec", write_spec(tmp_path, good_csv))
    assert result.exit_code == 1
    assert (
        result.stderr == "error: data failed validation:\n  - target 'target' has a single class ['1']: cannot train\n"
    )
    assert "Traceback" not in result.output


def test_a_crash_while_checking_is_not_dressed_up_as_a_user_error(env, monkeypatch, tmp_path, good_csv,
                                                                  prefect_run_loggers):  # fmt: skip
    fake = NoServers(monkeypatch, REGISTERED)

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in validation")

    monkeypatch.setattr(precheck, "validate_dataset", bug)
    result = invoke("--spec", write_spec(tmp_path, good_csv))
    assert isinstance(result.exception, RuntimeError) and "error:" not in result.output  # Python prints its traceback
    assert not fake.started
