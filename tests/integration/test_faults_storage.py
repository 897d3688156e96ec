"""Storage faults under the PostgreSQL + S3 stack: the S3 endpoint down while data is pulled, and PostgreSQL
restarted (or briefly down) under running MLflow and Prefect servers."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

JAN = ("2013-01-01", "2013-02-01")
DATA_KEY = "flights/2013-jan-feb.parquet"


def _versions(client, name):
    return client.search_model_versions(f"name = '{name}'")


def _wait_for_rows(postgres, database, sql, params, predicate, timeout=20.0):
    """Prefect writes task-run states from events, a moment after the client sent them: poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        rows = postgres.query(database, sql, params)
        if predicate(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _mlflow_get_model(stack, name):
    """One raw REST call to the MLflow server: no client-side retries that could hide a failed first request."""
    return httpx.get(f"{stack.mlflow.url}/api/2.0/mlflow/registered-models/get", params={"name": name}, timeout=30)


def _prefect_filter_runs(stack):
    return httpx.post(f"{stack.prefect_api_url}/flow_runs/filter", json={"limit": 1}, timeout=30)


# ------------------------------------------------------------------------------------------ fault 4: S3 down
def test_s3_endpoint_down_during_pull_retries_then_fails_clearly(
    on_pg_stack, model_name, upload_flights, monkeypatch, record_property
):
    """The data's S3 endpoint goes down: botocore retries each call, the Prefect task retries the pull, then the
    flow fails with an error naming the endpoint and the bucket — and nothing reaches the registry."""
    from botocore.exceptions import EndpointConnectionError
    from mlflow import MlflowClient
    from moto.server import ThreadedMotoServer

    from flywheel.flows.train import train
    from flywheel.stack import processes
    from flywheel.tasks import data

    stack = on_pg_stack
    # The shipped policy: 3 task retries with growing delays, on transient errors only; 4 botocore attempts a call.
    assert data.pull.retries == 3 and data.pull.retry_delay_seconds == [2, 5, 15]
    assert data.pull.retry_condition_fn is data._retry_transient
    per_call = data.s3_client().meta.config.retries["total_max_attempts"]  # botocore's max_attempts=3 → 4 in all
    assert per_call == 4

    port = processes.free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"data-{model_name}"
    try:
        upload_flights(endpoint, bucket, DATA_KEY)
    finally:
        s3.stop()  # the endpoint the data lives on is now down
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)

    # Count every HTTP attempt botocore makes, and shorten the task's retry delays (the policy is asserted above).
    attempts: list[str] = []
    real_client = data.s3_client

    def counting_client():
        client = real_client()
        client.meta.events.register("before-send.s3", lambda request, **_: attempts.append(request.url))
        return client

    monkeypatch.setattr(data, "s3_client", counting_client)
    monkeypatch.setattr(data, "pull", data.pull.with_options(retry_delay_seconds=[0.2, 0.2, 0.2]))

    t0 = time.monotonic()
    state = train(data_uri=f"s3://{bucket}/{DATA_KEY}", start=JAN[0], end=JAN[1], model_name=model_name,
                  return_state=True)  # fmt: skip
    elapsed = time.monotonic() - t0
    record_property("s3_down_flow_s", round(elapsed, 1))

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, data.TransientSourceError)
    assert isinstance(error.__cause__, EndpointConnectionError)
    message = str(error)
    assert "S3 endpoint unreachable" in message and endpoint in message and f"s3://{bucket}/{DATA_KEY}" in message
    # 4 task attempts (1 + 3 retries) x 4 botocore attempts each, all at the dead endpoint.
    assert len(attempts) == 4 * per_call and all(url.startswith(endpoint) for url in attempts), attempts
    assert elapsed < 60, "the retries are bounded: the run fails, it does not hang"

    # Nothing was trained or registered.
    assert _versions(MlflowClient(stack.mlflow.url), model_name) == []
    flow_run_id = str(state.state_details.flow_run_id)
    assert stack.postgres.query("prefect", "SELECT state_type FROM flow_run WHERE id = %s", (flow_run_id,)) == [
        ("FAILED",)
    ]
    runs = _wait_for_rows(
        stack.postgres,
        "prefect",
        "SELECT name, run_count, state_type FROM task_run WHERE flow_run_id = %s",
        (flow_run_id,),
        lambda rows: any(n.startswith("pull-dataset") and s == "FAILED" for n, _, s in rows),
    )
    pulls = [(count, st) for name, count, st in runs if name.startswith("pull-dataset")]
    assert pulls == [(4, "FAILED")], runs
    assert not any(name.startswith(("fit", "log-and-register", "promote")) for name, _, _ in runs), runs


# ------------------------------------------------------------------------------ fault 5: PostgreSQL restart
def test_postgres_restart_under_running_stack(on_pg_stack, model_name, upload_flights, record_property):
    """PostgreSQL restarts (every connection dropped) under running MLflow and Prefect servers: the very next
    request to each succeeds (both pre-ping pooled connections), and the next train run registers normally."""
    from mlflow import MlflowClient

    from flywheel.flows.train import train

    stack = on_pg_stack
    client = MlflowClient(stack.mlflow.url)
    bucket = f"data-{model_name}"
    upload_flights(stack.s3_endpoint, bucket, DATA_KEY)
    # Both servers have served database-backed requests, so their pools hold open connections.
    client.create_registered_model(model_name)
    assert _prefect_filter_runs(stack).status_code == 200

    pg_log_before = stack.postgres.log_path.read_text(errors="replace")
    mlflow_log_offset = stack.mlflow.log_path.stat().st_size
    record_property("pg_restart_s", round(stack.postgres.restart(), 2))
    pg_log_restart = stack.postgres.log_path.read_text(errors="replace")[len(pg_log_before) :]
    assert "terminating connection due to administrator command" in pg_log_restart, "servers held live connections"

    # The first request after the restart, without any client retry, is served.
    resp = _mlflow_get_model(stack, model_name)
    assert resp.status_code == 200, resp.text
    assert resp.json()["registered_model"]["name"] == model_name
    resp = _prefect_filter_runs(stack)
    assert resp.status_code == 200, resp.text

    t0 = time.monotonic()
    result = train(data_uri=f"s3://{bucket}/{DATA_KEY}", start=JAN[0], end=JAN[1], model_name=model_name)
    record_property("train_after_restart_s", round(time.monotonic() - t0, 1))
    assert result["status"] == "registered" and result["promoted"] is True
    assert [v.version for v in _versions(client, model_name)] == [result["version"]]
    assert client.get_registered_model(model_name).aliases == {
        "champion": result["version"],
        "challenger": result["version"],
    }
    flow_run_id = client.get_model_version(model_name, result["version"]).tags["prefect_flow_run_id"]
    state = stack.postgres.query("prefect", "SELECT state_type FROM flow_run WHERE id = %s", (flow_run_id,))
    assert state == [("COMPLETED",)]

    assert stack.mlflow.alive() and stack.prefect.alive()
    with open(stack.mlflow.log_path, "rb") as fh:
        fh.seek(mlflow_log_offset)
        after = fh.read().decode(errors="replace")
    assert "OperationalError" not in after and " 503 " not in after, after[-2000:]


def test_postgres_outage_fails_requests_then_heals(on_pg_stack, model_name, record_property):
    """While PostgreSQL is down the servers answer every data request with a 5xx at once (MLflow: 503
    TEMPORARILY_UNAVAILABLE, which its client retries), and serve again as soon as it is back — no server restart."""
    from mlflow import MlflowClient

    stack = on_pg_stack
    MlflowClient(stack.mlflow.url).create_registered_model(model_name)
    stack.postgres.stop()
    try:
        t0 = time.monotonic()
        down_mlflow = _mlflow_get_model(stack, model_name)
        down_prefect = _prefect_filter_runs(stack)
        down_s = time.monotonic() - t0
        health = (
            httpx.get(f"{stack.mlflow.url}/health", timeout=10).status_code,
            httpx.get(f"{stack.prefect_api_url}/health", timeout=10).status_code,
        )
        down_ready = httpx.get(f"{stack.prefect_api_url}/ready", timeout=10)
    finally:
        stack.postgres.start()
    # Liveness endpoints do not look at the database (both 200 here); Prefect's /api/ready does.
    record_property("health_while_db_down", f"mlflow={health[0]} prefect={health[1]}")
    assert down_mlflow.status_code == 503 and down_mlflow.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert stack.postgres.password not in down_mlflow.text
    assert down_prefect.status_code == 500  # not in the Prefect client's default retry codes (429, 502, 503, 408)
    assert down_ready.status_code == 503
    assert down_s < 10, "requests fail fast while the database is down; they do not hang"

    assert _mlflow_get_model(stack, model_name).status_code == 200
    assert _prefect_filter_runs(stack).status_code == 200
    assert httpx.get(f"{stack.prefect_api_url}/ready", timeout=10).status_code == 200
    assert stack.mlflow.alive() and stack.prefect.alive()


def _outage(postgres, seconds):
    """Stop PostgreSQL now and start it again in `seconds`, in the background; returns the thread."""
    postgres.stop()
    thread = threading.Thread(target=lambda: (time.sleep(seconds), postgres.start()), daemon=True)
    thread.start()
    return thread


def _end_outage(postgres, thread):
    thread.join(60)
    if not (postgres.datadir / "postmaster.pid").exists():
        postgres.start()


def test_clients_ride_out_a_short_postgres_outage(on_pg_stack, model_name, monkeypatch, record_property):
    """A 1.5 s database outage: MLflow's client (Flywheel's retry settings) retries the 503 and succeeds; Prefect's
    client fails at once on the 500 unless 500 is added to PREFECT_CLIENT_RETRY_EXTRA_CODES, then succeeds."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_RETRY_EXTRA_CODES, temporary_settings

    from flywheel.tasks import registry

    stack = on_pg_stack
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    registry.configure_client_retries()  # what the flow's tasks use: 3 retries, backoff factor 1
    client = MlflowClient(stack.mlflow.url)
    client.create_registered_model(model_name)

    thread = _outage(stack.postgres, 1.5)
    try:
        t0 = time.monotonic()
        assert client.get_registered_model(model_name).name == model_name
        record_property("mlflow_call_over_outage_s", round(time.monotonic() - t0, 1))
    finally:
        _end_outage(stack.postgres, thread)

    async def read_runs():
        async with get_client() as pc:
            return await pc.read_flow_runs(limit=1)

    thread = _outage(stack.postgres, 1.5)
    try:
        with pytest.raises(httpx.HTTPStatusError) as err:
            asyncio.run(read_runs())
        assert err.value.response.status_code == 500
        with temporary_settings(updates={PREFECT_CLIENT_RETRY_EXTRA_CODES: {500}}):
            t0 = time.monotonic()
            asyncio.run(read_runs())
            record_property("prefect_call_over_outage_s", round(time.monotonic() - t0, 1))
    finally:
        _end_outage(stack.postgres, thread)
