"""The deployment ledger: every deployment, where a person sees it — MLflow version tags and a Prefect table.

What it writes names things by id and relative path (target name, version, the package's path in the state dir),
never this machine's ports or absolute paths, so the links stay true when the stack moves. The registered model's
`last_deployment` is a sentence; `last_deployment_json` is the same record for code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.core.names import slug
from flywheel.tasks import locks

LEDGER_ROWS = 200
LEDGER_LOCK_TIMEOUT = 300  # seconds; a write holds the lock for one read and one write


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class DeploymentRecord:
    model_name: str
    version: str
    alias: str
    target: str
    url: str
    trigger: str
    previous_version: str | None = None
    event_id: str | None = None
    flow_run_id: str | None = None
    started_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    context: str | None = None
    image: str | None = None
    container: str | None = None  # docker target: the container that predicts for this version
    engine: str | None = None  # what predicts: onnxruntime (the compiled model) or pyfunc
    engine_reason: str | None = None  # why, e.g. "compiled: no (2 of 5000 labels differ)"
    outcome: str = "pending"  # serving | failed-smoke | rolled-back-live | failed | superseded | rolled-back
    reason: str = ""
    watch: str = ""  # the post-switch watch: what it saw, for how long, and its rule

    def as_dict(self) -> dict:
        return asdict(self)

    def public(self) -> dict:
        """The record as the ledger shows it, the columns a person reads first leading: version, outcome, reason,
        when, trigger; no URL (ports are this machine's: `target` names the server)."""
        d = self.as_dict()
        first = {"version": d.pop("version"), "outcome": d.pop("outcome"), "reason": d.pop("reason"),
                 "when": self.finished_at or self.started_at, "trigger": d.pop("trigger")}  # fmt: skip
        d.pop("url", None)
        return {**first, **d}

    def sentence(self) -> str:
        """One line a person reads in the registry UI."""
        when = self.finished_at or self.started_at
        text = f"v{self.version} → {self.alias} ({self.target}): {self.outcome} at {when}"
        text += f", {self.trigger}" + (f", after v{self.previous_version}" if self.previous_version else "")
        return text + (f" — {self.reason}" if self.reason else "")


def artifact_key(model_name: str) -> str:
    return "deployments-" + slug(model_name)


def tag_prefix(alias: str) -> str:
    """Version tags of `champion` deployments are `deploy_*`; of other aliases `deploy_<alias>_*`, so a version's
    staging (challenger) and production deployments do not overwrite each other's record."""
    return "deploy_" if alias == "champion" else f"deploy_{alias}_"


def record_in_registry(mlflow_client, rec: DeploymentRecord) -> None:
    """Version tags for this deployment, and `last_deployment` (text) + `last_deployment_json` on the registered
    model."""
    fields = {
        "outcome": rec.outcome,
        "at": rec.finished_at or rec.started_at,
        "alias": rec.alias,
        "target": rec.target,
        "trigger": rec.trigger,
        "previous_version": rec.previous_version or "",
        "image": rec.image or "none",
        "context": rec.context or "",
    }
    if rec.container:
        fields["container"] = rec.container
    if rec.engine:
        fields["engine"] = rec.engine
        fields["engine_reason"] = (rec.engine_reason or "")[:4000]
    if rec.reason:
        fields["reason"] = rec.reason[:4000]
    if rec.watch:
        fields["watch"] = rec.watch[:4000]
    fields["outcome"] = fields.pop("outcome")  # written last: a reader that sees it sees the rest
    tags = {tag_prefix(rec.alias) + key: value for key, value in fields.items()}
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(rec.model_name, rec.version, key, value)
    mlflow_client.set_registered_model_tag(rec.model_name, "last_deployment", rec.sentence()[:4900])
    mlflow_client.set_registered_model_tag(
        rec.model_name, "last_deployment_json", json.dumps(rec.public(), ensure_ascii=False)[:4900]
    )


def record_rolled_back(
    mlflow_client, name: str, version: str, alias: str, *, by: str, reason: str, to: str, outcome: str = "rolled-back"
) -> str:
    """A version that was rolled back stops saying `serving`: its outcome becomes `outcome` (`rolled-back` by a
    `rollback` run, `rolled-back-live` by the watch), with when, by whom or what, why, and to which version. The
    time it was recorded."""
    at = now_iso()
    prefix = tag_prefix(alias)
    for key, value in {"rolled_back_at": at, "rolled_back_by": by, "rolled_back_reason": reason[:4000],
                       "rolled_back_to": str(to), "outcome": outcome}.items():  # fmt: skip
        mlflow_client.set_model_version_tag(name, str(version), prefix + key, value)
    return at


async def _previous_rows(key: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        latest = await client.read_latest_artifacts(limit=1, artifact_filter=_key_filter(key))
    if not latest or not latest[0].data:
        return []
    data = latest[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    return rows if isinstance(rows, list) else []


def _key_filter(key: str):
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    return ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key]))


def record_in_prefect(rec: DeploymentRecord) -> None:
    """Append the record to the model's deployment table artifact (newest first, capped).

    A Prefect artifact is written whole, so appending is read-modify-write; the champion and the challenger
    deployments of a model run at the same time under different deployment locks, and without a lock of their
    own the later writer would drop the other's row. One writer at a time, through the model's ledger lock.
    """
    from prefect.artifacts import create_table_artifact
    from prefect.utilities.asyncutils import run_coro_as_sync

    key = artifact_key(rec.model_name)
    row = {k: v for k, v in rec.public().items() if k not in ("model_name",)}
    with locks.held(locks.ledger_lock(rec.model_name), timeout_seconds=LEDGER_LOCK_TIMEOUT):
        rows = [row, *run_coro_as_sync(_previous_rows(key))][:LEDGER_ROWS]
        create_table_artifact(key=key, table=rows, description=f"Deployments of {rec.model_name}, newest first")


def publish(rec: DeploymentRecord) -> None:
    """The deployment's own markdown artifact (`deploy-<model>`): its record, as the flow run's result."""
    import yaml
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=f"deploy-{slug(rec.model_name)}",
        markdown=f"# {rec.model_name} v{rec.version} → {rec.alias}: {rec.outcome}\n\n```yaml\n"
        f"{yaml.safe_dump(rec.public(), sort_keys=False, allow_unicode=True)}```",
        description=f"Deployment of {rec.model_name} v{rec.version}",
    )


@task(name="record-deployment", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 5])
def record(rec: DeploymentRecord) -> DeploymentRecord:
    from flywheel.tasks import registry

    rec.finished_at = rec.finished_at or now_iso()
    record_in_registry(registry.client(), rec)
    record_in_prefect(rec)
    return rec
