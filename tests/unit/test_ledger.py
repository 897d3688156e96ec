"""The deployment ledger's registry tags, on a real MLflow registry (SQLite in tmp)."""

from __future__ import annotations

from flywheel.tasks import ledger


def test_champion_and_challenger_deployments_of_one_version_keep_separate_tags(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("ledger", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.create_registered_model("ledger-model")
    source = f"runs:/{run.info.run_id}/model"
    version = client.create_model_version("ledger-model", source, run_id=run.info.run_id).version

    def record(alias: str, outcome: str, url: str) -> None:
        ledger.record_in_registry(client, ledger.DeploymentRecord(
            model_name="ledger-model", version=version, alias=alias, target="local", url=url, trigger="event",
            outcome=outcome, reason="" if outcome == "serving" else "smoke test failed",
        ))  # fmt: skip

    record("champion", "failed-smoke", "http://127.0.0.1:5080")
    record("challenger", "serving", "http://127.0.0.1:5081")  # later, and must not hide the production failure
    tags = client.get_model_version("ledger-model", version).tags
    assert tags["deploy_outcome"] == "failed-smoke" and tags["deploy_target"] == "local"
    assert tags["deploy_reason"] == "smoke test failed"
    assert tags["deploy_challenger_outcome"] == "serving" and "deploy_challenger_url" not in tags  # no ports
    assert ledger.tag_prefix("champion") == "deploy_" and ledger.tag_prefix("challenger") == "deploy_challenger_"


def test_concurrent_writers_of_one_models_ledger_both_land(monkeypatch):
    """The champion and the challenger deployment of a model append to the same table artifact at the same time.
    Appending is read-modify-write, so each write is held under the model's ledger lock (a Prefect global
    concurrency limit of 1; here a thread lock of the same name, and a Prefect artifact store in memory whose read
    takes long enough for the two writers to overlap without the lock)."""
    import asyncio
    import threading
    from contextlib import contextmanager

    import prefect.artifacts

    from flywheel.tasks import locks

    store: dict[str, list[dict]] = {}
    taken: list[str] = []
    thread_locks: dict[str, threading.Lock] = {}

    async def previous_rows(key: str) -> list[dict]:
        rows = list(store.get(key, []))
        await asyncio.sleep(0.3)  # both writers read before either writes, unless they take turns
        return rows

    def create_table_artifact(key: str, table: list[dict], description: str) -> None:
        store[key] = table

    @contextmanager
    def held(lock: str, timeout_seconds: float):
        taken.append(lock)
        with thread_locks.setdefault(lock, threading.Lock()):
            yield

    monkeypatch.setattr(ledger, "_previous_rows", previous_rows)
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", create_table_artifact)
    monkeypatch.setattr(locks, "held", held)

    def write(alias: str) -> None:
        rec = ledger.DeploymentRecord(
            model_name="m", version="1", alias=alias, target="local", url="u", trigger="event"
        )
        ledger.record_in_prefect(rec)

    writers = [threading.Thread(target=write, args=(alias,)) for alias in ("champion", "challenger")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=30)
    assert sorted(r["alias"] for r in store[ledger.artifact_key("m")]) == ["challenger", "champion"]
    assert taken == [locks.ledger_lock("m")] * 2
