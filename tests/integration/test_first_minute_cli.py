"""The first minute with a new table (issue 14), through the real `flywheel train` command in a subprocess.

1. Bad data, no server anywhere: the command ends with the list of problems, no traceback, and no server was
   started (the state dir holds no database, log or stack file of one).
2. Against the session's MLflow and Prefect servers, with the command's Python patched before it runs: a table
   that changes between the check and the flow fails the flow's own validation and still prints only the clear
   message (Prefect logs the task's failure without its traceback); a bug inside a task keeps its traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
FEATURES = ["mean_radius", "mean_texture", "mean_area"]

# `flywheel train ...` with a patch applied first: `python -c PATCH + RUN_CLI train ...`.
RUN_CLI = "\nfrom flywheel.cli.main import app\napp()\n"
TABLE_CHANGES_AFTER_THE_CHECK = """
import flywheel.tasks.data as data
read, calls = data.read_source, []
def read_source(uri):
    calls.append(uri)
    df = read(uri)
    if len(calls) > 1:  # the flow's pull, after the check: one class left
        df["target"] = 1
    return df
data.read_source = read_source
"""
BUG_IN_A_TASK = """
import flywheel.tasks.training as training
def split_dataset(*args, **kwargs):
    raise RuntimeError("a bug in the split")
training.split_dataset = split_dataset
"""


@pytest.fixture
def table(tmp_path) -> tuple[Path, Path]:
    """A spec over scikit-learn's breast-cancer table (569 rows, two classes), and a bad copy of the table: a
    missing column, text in a numeric column, a single class and too few rows."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame = frame[[*FEATURES, "target"]]
    good = tmp_path / "cancer.csv"
    frame.to_csv(good, index=False)
    bad = frame.head(150).drop(columns=["mean_area"]).astype({"mean_texture": object})
    bad.loc[3, "mean_texture"] = "twelve"
    bad["target"] = 1
    bad.to_csv(tmp_path / "bad.csv", index=False)
    spec = tmp_path / "cancer.yaml"
    spec.write_text(yaml.safe_dump({"name": "cancer", "source": str(good), "target": "target", "task": "binary",
                                    "positive_class": 1, "numeric": FEATURES}))  # fmt: skip
    return spec, tmp_path / "bad.csv"


def cli_env(state: Path, **extra: str) -> dict[str, str]:
    """The environment of a `flywheel` subprocess: its own state dir, and no server unless given one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "AWS_ENDPOINT_URL_S3"):
        env.pop(key, None)
    return {**env, "FLYWHEEL_STATE_DIR": str(state), **extra}


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_data_ends_with_the_problem_list_and_starts_no_server(table, tmp_path):
    spec, bad = table
    state = tmp_path / "state"
    proc = run([str(BIN / "flywheel"), "train", "--spec", str(spec), "--data", "bad.csv"], tmp_path,
               cli_env(state), timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr

    assert proc.returncode == 1, out
    assert proc.stderr.startswith("error: data failed validation:\n"), out
    problems = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 4, out
    for problem in ("missing columns: ['mean_area']", "numeric column 'mean_texture'", "single class",
                    "too few rows: 150"):  # fmt: skip
        assert problem in proc.stderr
    assert "Traceback" not in out

    # No server was started: none of what the MLflow server or Prefect's ephemeral server leave behind.
    assert not (state / "stack.json").exists()
    assert not (state / "logs").exists() and not (state / "mlartifacts").exists()
    assert not list(state.rglob("*.db")), sorted(map(str, state.rglob("*")))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_bad_params_file_is_one_line_and_starts_no_server(table, tmp_path):
    spec, _ = table
    state = tmp_path / "state"
    params = tmp_path / "params.yaml"
    params.write_text("estimator: [unclosed\n")
    proc = run([str(BIN / "flywheel"), "train", "--spec", str(spec), "--params", str(params)], tmp_path,
               cli_env(state), timeout=300)  # fmt: skip

    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: params file {params} is not valid YAML"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(state.rglob("*.db")) and not (state / "logs").exists()


@pytest.fixture
def servers(tracking, prefect_server) -> dict[str, str]:
    """The session's MLflow and Prefect servers, for a subprocess."""
    return {"MLFLOW_TRACKING_URI": tracking, "PREFECT_API_URL": prefect_server.url + "/api",
            "PREFECT_HOME": os.environ["PREFECT_HOME"]}  # fmt: skip


def test_a_table_that_changes_after_the_check_fails_the_flow_with_only_the_clear_message(
    table, tmp_path, servers, model_name
):
    spec, _ = table
    proc = run([sys.executable, "-c", TABLE_CHANGES_AFTER_THE_CHECK + RUN_CLI, "train", "--spec", str(spec),
                "--model-name", model_name], tmp_path, cli_env(tmp_path / "state", **servers), timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr

    assert proc.returncode == 1, out
    assert "data checked: 569 rows" in proc.stdout  # the check passed; the flow's validation failed
    assert "Task run failed with exception: DataValidationError" in proc.stderr, out  # Prefect logged it...
    assert "Traceback" not in out  # ...without its traceback
    assert proc.stderr.rstrip().endswith(
        "error: data failed validation:\n  - target 'target' has a single class ['1']: cannot train"
    ), out
    from mlflow import MlflowClient

    assert MlflowClient(servers["MLFLOW_TRACKING_URI"]).search_model_versions(f"name = '{model_name}'") == []


def test_a_bug_in_a_task_keeps_its_traceback(table, tmp_path, servers, model_name):
    spec, _ = table
    proc = run([sys.executable, "-c", BUG_IN_A_TASK + RUN_CLI, "train", "--spec", str(spec), "--model-name",
                model_name], tmp_path, cli_env(tmp_path / "state", **servers), timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr

    assert proc.returncode == 1, out
    assert "Task run failed with exception: RuntimeError('a bug in the split')" in proc.stderr, out
    assert "Traceback (most recent call last)" in proc.stderr, out
    assert "split_dataset" in proc.stderr  # the frame of the bug itself
    assert "error: a bug" not in proc.stderr  # not dressed up as a user's mistake
