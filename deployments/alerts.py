"""Alerts as Prefect automations: a failed or crashed Flywheel run, a deployment rolled back, dataset drift.

Each is an automation on the Prefect server (visible and editable under Automations in the UI) whose action sends
a notification through one `CustomWebhookNotificationBlock` posting Slack-compatible JSON (`{"text": ...}`) to
`FLYWHEEL_ALERT_WEBHOOK_URL` (a Slack/Mattermost/Teams incoming webhook, or anything that takes that JSON).
Prefect evaluates the triggers and sends the notifications itself; this module only declares them.
"""

from __future__ import annotations

from flywheel.core.events import DRIFT_CHECKED_EVENT, ROLLED_BACK_EVENT

BLOCK_NAME = "flywheel-alerts"
FLOWS = ("train", "deploy-model", "rollback", "reconcile", "check-drift")


def automation_specs() -> list[dict]:
    """Name (after the event it watches: the UI calls any event trigger "A custom trigger"), description naming
    that event, trigger and message of each alert (Jinja over the triggering event, as Prefect renders it)."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    return [
        {
            "name": "flywheel: run failed",
            "description": f"On a Flywheel flow run ({', '.join(FLOWS)}) that ends Failed or Crashed (events "
            "prefect.flow-run.Failed, prefect.flow-run.Crashed): a message to the alert webhook.",
            "trigger": EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)},
                posture=Posture.Reactive,
                threshold=1,
            ),
            "subject": "Flywheel: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}",
            "body": "{{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
            "{{ flow_run.state.message }}",
        },
        {
            "name": "flywheel: deployment rolled back",
            "description": f"On a deployment that was rolled back or not switched to (event {ROLLED_BACK_EVENT}): "
            "a message to the alert webhook.",
            "trigger": EventTrigger(
                expect={ROLLED_BACK_EVENT},
                match={"prefect.resource.id": "flywheel.model.*"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            "subject": "Flywheel: {{ event.payload.name }} v{{ event.payload.version }} not deployed",
            "body": "{{ event.payload.name }} v{{ event.payload.version }} ({{ event.payload.alias }}): "
            "{{ event.payload.outcome }}; {{ event.payload.reason }}",
        },
        {
            "name": "flywheel: data drift",
            "description": f"On a drift check that found dataset drift (event {DRIFT_CHECKED_EVENT} with "
            "flywheel.dataset_drift=true): a message to the alert webhook.",
            "trigger": EventTrigger(
                expect={DRIFT_CHECKED_EVENT},
                match={"prefect.resource.id": "flywheel.model.*", "flywheel.dataset_drift": "true"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            "subject": "Flywheel: drift in {{ event.payload.model_name }}",
            "body": "{{ event.payload.model_name }}: drift share {{ event.payload.drift_share }} over "
            "{{ event.payload.start }} .. {{ event.payload.end }}; retraining: {{ event.payload.retrain }}",
        },
    ]


def ensure_alerts(webhook_url: str) -> list[str]:
    """Create (or re-create, so a changed URL or message takes effect) the notification block and automations."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification

    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url=webhook_url, method="POST", json_data={"text": "*{{subject}}*\n{{body}}"}
    )
    block_id = block.save(BLOCK_NAME, overwrite=True)
    names = []
    for spec in automation_specs():
        _recreate(
            Automation(
                name=spec["name"],
                description=spec["description"],
                trigger=spec["trigger"],
                actions=[SendNotification(block_document_id=block_id, subject=spec["subject"], body=spec["body"])],
            )
        )
        names.append(spec["name"])
    return names


ZOMBIE_AUTOMATION = "flywheel: crash zombie flow runs"
HEARTBEAT_SECONDS = 30


def ensure_zombie_detection(within_seconds: float = 90) -> str:
    """Prefect's documented zombie-run automation: a flow run (started by a deployment, which emits a heartbeat
    every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds) that goes silent for `within_seconds` is marked Crashed — so a
    deployment whose process was killed does not block the reconciler (or its lock) forever."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    _recreate(
        Automation(
            name=ZOMBIE_AUTOMATION,
            description=f"On a flow run whose heartbeats (event prefect.flow-run.heartbeat) stop for "
            f"{within_seconds:.0f}s before it ends: marks it Crashed.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={
                    "prefect.flow-run.heartbeat",
                    "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed",
                },  # fmt: skip
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=within_seconds),
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED, message="Flow run marked as crashed: its heartbeats stopped."
                )
            ],
        )
    )
    return ZOMBIE_AUTOMATION


def _recreate(automation) -> None:
    """Replace an automation of the same name, so a changed definition takes effect and none is duplicated."""
    from prefect.automations import Automation

    try:
        Automation.read(name=automation.name).delete()
    except ValueError:  # not there yet
        pass
    automation.create()
