"""Metrics: the drift check's verdict as Prometheus gauges, pushed to a Pushgateway (a batch job has no endpoint of
its own to scrape)."""

from __future__ import annotations

from flywheel.core.settings import get_settings


def drift_metrics(name: str, result, checked_at: float):
    """The verdict as Prometheus gauges (what infra/'s dashboard and alert rules read)."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    labels = {"model": name}
    Gauge("flywheel_drift_share", "Share of drifted columns in the last check", ["model"], registry=reg).labels(
        **labels
    ).set(result.drift_share)
    Gauge("flywheel_drift_detected", "1 when the last check found dataset drift", ["model"], registry=reg).labels(
        **labels
    ).set(1 if result.dataset_drift else 0)
    Gauge(
        "flywheel_drift_last_check_timestamp_seconds", "When the last drift check ran (Unix time)", ["model"],
        registry=reg,
    ).labels(**labels).set(checked_at)  # fmt: skip
    return reg


def push_drift_metrics(name: str, result) -> str:
    """Push the gauges to the Prometheus Pushgateway at FLYWHEEL_PUSHGATEWAY_URL; without one configured, say so
    and go on."""
    import time

    from prometheus_client import push_to_gateway

    url = get_settings().pushgateway_url
    if not url:
        return "no Pushgateway configured (FLYWHEEL_PUSHGATEWAY_URL): drift metrics not pushed"
    try:
        push_to_gateway(
            url, job="flywheel-drift", grouping_key={"model": name}, registry=drift_metrics(name, result, time.time())
        )
    except OSError as exc:  # monitoring must not fail the check
        return f"could not push drift metrics to {url}: {exc}"
    return f"drift metrics pushed to {url}"
