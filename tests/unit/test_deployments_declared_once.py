"""Deployments are declared once (deployments/definitions.py): prefect.yaml is generated from the declaration, and
`serve` and the work pools get the same deployments with the schedules of Settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from flywheel.core.settings import Settings, get_settings
from flywheel.deployments import definitions, render

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_is_what_definitions_render():
    assert (ROOT / "prefect.yaml").read_text() == render.prefect_yaml(), (
        "prefect.yaml is stale: run `python -m flywheel.deployments.render > prefect.yaml`"
    )


def test_rendered_prefect_yaml_is_valid_for_prefect_deploy():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load(render.prefect_yaml()))
    assert [d.name for d in model.deployments] == [d.name for d in definitions.DEPLOYMENTS]
    assert {d.work_pool.name for d in model.deployments} == {definitions.WORK_POOL}


def test_declared_flow_names_and_settings_exist():
    for d in definitions.DEPLOYMENTS:
        assert definitions.load_flow(d.entrypoint).name == d.flow, d.full_name
        for setting in (d.cron_setting, d.interval_setting):
            assert setting is None or setting in Settings.model_fields, d.full_name
    assert len(set(definitions.DEPLOYMENT_NAMES)) == len(definitions.DEPLOYMENTS)


def test_schedules_follow_the_environment_for_serve_and_for_work_pools(fresh_settings):
    fresh_settings.setenv("FLYWHEEL_TRAIN_CRON", "15 4 * * *")
    fresh_settings.setenv("FLYWHEEL_DRIFT_CRON", "30 */2 * * *")
    fresh_settings.setenv("FLYWHEEL_RECONCILE_SECONDS", "90")
    fresh_settings.setenv("FLYWHEEL_SERVE_LIMIT", "7")
    settings = get_settings()
    assert settings.serve_limit == 7
    served = {f"{d.flow_name}/{d.name}": d for d in definitions.build_deployments()}
    assert list(served) == list(definitions.DEPLOYMENT_NAMES)
    assert served["train/cron"].schedules[0].schedule.cron == "15 4 * * *"
    assert served["check-drift/cron"].schedules[0].schedule.cron == "30 */2 * * *"
    assert served["reconcile/every-minute"].schedules[0].schedule.interval.total_seconds() == 90
    assert [t.name for t in served["deploy-model/on-alias"].triggers] == ["registry-alias-moved"]

    pools = yaml.safe_load(render.prefect_yaml(settings))["deployments"]
    for declared, pool in zip(definitions.DEPLOYMENTS, pools, strict=True):
        runner = served[declared.full_name]
        assert pool["name"] == runner.name and pool["description"] == runner.description
        assert [t["name"] for t in pool.get("triggers", [])] == [t.name for t in runner.triggers]
    assert [p["schedules"] for p in pools if "schedules" in p] == [
        [{"cron": "15 4 * * *"}], [{"interval": 90}], [{"cron": "30 */2 * * *"}]
    ]  # fmt: skip
    # The committed file does not depend on the environment it is rendered in.
    assert render.prefect_yaml() == (ROOT / "prefect.yaml").read_text()
