"""Automations a person can tell apart in the Prefect UI, which calls every event trigger "A custom trigger": each
alert and each deployment trigger is named after the event it watches, and an alert's description names the events
themselves. No server: the specs and the automations Prefect would create are read as built."""

from __future__ import annotations

import uuid

from flywheel.deployments import alerts
from flywheel.deployments.definitions import DEPLOYMENTS


def test_each_alert_is_named_and_described_by_the_events_it_watches():
    specs = alerts.automation_specs()
    names = [s["name"] for s in specs]
    assert len(set(names)) == len(names)
    for spec in specs:
        assert spec["name"].startswith("flywheel: ") and "custom" not in spec["name"].lower()
        for event in spec["trigger"].expect:
            assert event in spec["description"], (spec["name"], event)


def test_each_deployment_trigger_makes_an_automation_named_after_its_event():
    triggered = [d for d in DEPLOYMENTS if d.trigger is not None]
    assert triggered
    for d in triggered:
        prefect_trigger = d.trigger.to_prefect()
        prefect_trigger.set_deployment_id(uuid.uuid4())
        automation = prefect_trigger.as_automation()
        assert automation.name == d.trigger.name and not automation.name.startswith("Automation for deployment")
        assert set(automation.trigger.expect) == {d.trigger.event}
        words = set(d.trigger.name.split("-"))
        assert words & set(d.trigger.event.replace("_", ".").split(".")), (d.trigger.name, d.trigger.event)
