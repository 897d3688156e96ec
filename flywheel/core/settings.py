"""One settings object for Flywheel, read from `FLYWHEEL_*` variables and `.env`, built on first use.

The ecosystem's own variables win where they are set: `MLFLOW_TRACKING_URI` (Flywheel then starts no MLflow
server), `PREFECT_API_URL` (no local Prefect server), `AWS_ENDPOINT_URL_S3` and the AWS credential chain (boto3
reads them itself).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_file=".env", extra="ignore")

    state_dir: Path = Field(Path(".flywheel"), description="Where the embedded default keeps its state.")
    model_name: str = Field("flights-delay", description="Registered model name in MLflow.")
    experiment_name: str = Field("flywheel", description="MLflow experiment for training runs.")
    spec: Path | None = Field(None, description="Dataset spec YAML; the flights demo when unset.")
    data: str | None = Field(None, description="Override of the spec's source URI.")

    # Quality gate. Every model must beat a trivial baseline (the majority class, or the mean for regression) on the
    # same holdout by `gate_baseline_margin`, and a challenger the champion by `gate_min_uplift`. Absolute floors
    # are off unless set (here or in the dataset spec's `gate:` section, which wins for its model).
    gate_baseline_margin: float = Field(
        0.02, description="Margin over the trivial baseline: absolute for scores (F1, ROC-AUC), relative for RMSE."
    )
    gate_min_uplift: float = 0.005
    gate_min_f1: float | None = None
    gate_min_roc_auc: float | None = None
    gate_min_f1_macro: float | None = None
    gate_min_accuracy: float | None = None
    gate_max_rmse: float | None = None
    gate_max_mae: float | None = None
    gate_min_r2: float | None = None

    # Validation.
    min_rows: int = Field(200, description="Fewest labelled rows a training table may have.")
    max_null_share: float = Field(0.30, description="Largest share of missing values a feature column may have.")
    reference_sample_rows: int = Field(20_000, description="Rows of the training data kept as the drift reference.")
    seed: int = 42

    # Competing candidates (a params file with `candidates:`): how the winner is picked and where they train.
    candidate_metric: str | None = Field(
        None, description="Holdout metric that picks the best candidate; default f1 (binary) / rmse (regression)."
    )
    dask_address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786): candidates train on that cluster, else threads."
    )

    # Embedded-default servers (all bind 127.0.0.1).
    host: str = "127.0.0.1"
    mlflow_port: int = 5050
    prefect_port: int = 4200
    bridge_port: int = 5055
    serving_port: int = 5080
    staging_port: int = 5081

    # The supervisor of `flywheel up`: health checks of the model servers and the bridge, restarts of any child.
    health_check_seconds: float = Field(2.0, gt=0, description="Interval of the supervisor's checks.")
    health_timeout_seconds: float = Field(2.0, gt=0, description="How long a `/health` answer may take.")
    health_failures: int = Field(3, ge=1, description="Failed health checks in a row before a restart (SIGKILL).")
    restart_limit: int = Field(5, ge=0, description="Restarts of one child within `restart_window_seconds`.")
    restart_window_seconds: float = Field(600.0, gt=0, description="Window of the restart limit; then it gives up.")
    restart_backoff_max_seconds: float = Field(30.0, ge=0, description="Longest wait before a restart (1, 2, 4 s…).")

    # Backends of `flywheel up` (default: SQLite + local artifacts + Prefect's SQLite in the state dir). The scale-out
    # configuration: MLflow on PostgreSQL with S3 artifacts, Prefect on PostgreSQL (URIs may hold passwords).
    mlflow_backend_store_uri: SecretStr | None = Field(None, description="e.g. postgresql+psycopg2://…/mlflow")
    mlflow_artifacts_destination: str | None = Field(None, description="e.g. s3://bucket/mlflow")
    prefect_database_url: SecretStr | None = Field(None, description="e.g. postgresql+asyncpg://…/prefect")

    # Deployments.
    deploy_target: Literal["local", "docker", "kubernetes"] = Field(
        "local",
        description="local (model server process), docker (a container per version behind the model server; needs "
        "a Docker-compatible engine at DOCKER_HOST) or kubernetes (manifests, applied with a kubectl context).",
    )
    deploy_watch_seconds: float = Field(60.0, description="How long the live error rate is watched after a switch.")
    deploy_max_live_error_rate: float = 0.05
    smoke_max_error_rate: float = 0.0
    smoke_max_p50_ms: float = 500.0
    build_images: bool = Field(True, description="Build a Docker image when an engine is reachable.")
    compile_models: bool = Field(
        True, description="Compile a version to ONNX when it is packaged and serve it compiled after a parity check."
    )
    kubernetes_namespace: str = "flywheel"

    # Schedules of the Prefect deployments (deployments/definitions.py) and how many runs `serve` executes at once.
    train_cron: str = Field("0 3 * * *", description="Cron of train/cron.")
    drift_cron: str = Field("0 * * * *", description="Cron of check-drift/cron.")
    reconcile_seconds: float = Field(60.0, description="Interval of reconcile/every-minute, in seconds.")
    serve_limit: int = Field(4, description="Flow runs `python -m flywheel.deployments.serve` executes at once.")

    # Drift checks and the retraining they schedule (windows and cooldown in the data's own event time).
    drift_share: float = Field(0.55, description="Share of drifted columns that counts as dataset drift.")
    drift_sample_cap: int = Field(50_000, ge=5_000, description="Rows per side the drift check samples down to.")
    drift_min_rows: int = Field(500, description="Fewest served rows a drift check judges; fewer: no verdict.")
    drift_window_days: float = Field(30.0, description="Days of served data (event time) one drift check reads.")
    retrain_cooldown_days: float = Field(30.0, description="Days after a scheduled retraining before the next one.")
    retrain_window_days: float = Field(90.0, description="Days of data (event time) a drift-triggered retraining uses.")

    request_log_uri: str | None = Field(
        None, description="Where the model server records scored rows: s3://bucket/prefix (default: the state dir)."
    )
    labels_uri: str | None = Field(None, description="Late ground truth (request_id + target) for the drift check.")
    pushgateway_url: str | None = Field(None, description="Prometheus Pushgateway for the drift check's gauges.")
    alert_webhook_url: str | None = Field(
        None, description="Slack-compatible incoming webhook: failed runs, rollbacks and drift (Prefect automations)."
    )

    webhook_secret: SecretStr | None = None
    serving_token: SecretStr | None = None
    admin_token: SecretStr | None = None

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser().resolve()

    @property
    def serving_url(self) -> str:
        return f"http://{self.host}:{self.serving_port}"

    @property
    def staging_url(self) -> str:
        return f"http://{self.host}:{self.staging_port}"

    def request_log_dir(self, role: str) -> Path | str:
        """Where the `role` model server (production, staging) records what it scores: below `request_log_uri`,
        else in the state dir."""
        uri = self.request_log_uri
        return f"{uri.rstrip('/')}/{role}" if uri else self.state_path / "serving" / role

    def secret(self, name: str) -> str | None:
        """A secret from its FLYWHEEL_* variable, else from the owner-only file `flywheel up` keeps in the state dir."""
        value = getattr(self, name, None)
        if value is not None:
            return value.get_secret_value()
        path = self.state_path / name
        return path.read_text().strip() if path.is_file() else None

    @property
    def external_tracking_uri(self) -> str | None:
        """The user's MLflow server, when `MLFLOW_TRACKING_URI` is set: Flywheel then starts none."""
        return os.environ.get("MLFLOW_TRACKING_URI") or None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
