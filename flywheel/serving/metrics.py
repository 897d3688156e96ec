"""The model server's Prometheus metrics, in a registry of its own (served at `/metrics`).

Names and labels are read by infra/prometheus (alerts), infra/grafana (the dashboard) and tests/unit/test_infra.py.
Predicted classes are counted for label-like predictions only, and at most MAX_CLASS_LABELS distinct labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from flywheel.serving.slots import Slot

MAX_CLASS_LABELS = 100


class _Metrics:
    def __init__(self, model_name: str, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flywheel_http_requests", "HTTP requests by endpoint and status code", ["endpoint", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "flywheel_http_request_duration_seconds", "HTTP request latency", ["endpoint"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )  # fmt: skip
        self.predictions = Counter(
            "flywheel_predictions", "Predicted rows by predicted class (classifiers)", ["version", "class"], registry=r
        )
        self.rows = Counter("flywheel_scored_rows", "Rows scored", ["version"], registry=r)
        self.batch_rows = Histogram(
            "flywheel_predict_batch_rows", "Rows per predict call", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384),
        )  # fmt: skip
        self.served = Gauge(
            "flywheel_model_slot", "1 for each loaded (slot, version)", ["model", "slot", "version"], registry=r
        )
        self.active_version = Gauge(
            "flywheel_active_model_version", "Version number serving now (0: none)", ["model"], registry=r
        )
        self.swaps = Counter("flywheel_swaps", "Standby→active swaps (rollbacks included)", registry=r)
        self.rollbacks = Counter("flywheel_rollbacks", "Rollbacks to the previous version", registry=r)
        self.loads = Counter("flywheel_model_loads", "Model loads by outcome", ["outcome"], registry=r)
        self.log_rows = Gauge("flywheel_request_log_rows", "Request log rows by state", ["state"], registry=r)
        self.info = Gauge("flywheel_model_server_info", "Static server info", ["model", "role"], registry=r)
        self.info.labels(model=model_name, role=role).set(1)
        self.model_name = model_name
        self._classes: set[str] = set()
        self._children: dict[tuple, Any] = {}  # labelled counters, looked up once (labels() costs ~10 µs)
        self.active_version.labels(model=model_name).set(0)

    def observe_predictions(self, version: str, preds: Any, n: int) -> None:
        self._child(self.rows, version=version).inc(n)
        labels = _class_labels(preds)
        if labels is None:
            return
        for label, count in labels:
            if label not in self._classes:
                if len(self._classes) >= MAX_CLASS_LABELS:
                    label = "__other__"
                else:
                    self._classes.add(label)
            self._child(self.predictions, version=version, **{"class": label}).inc(count)

    def _child(self, metric: Any, **labels: str) -> Any:
        key = (id(metric), *labels.values())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**labels)
        return child

    def set_slots(self, active: Slot | None, standby: Slot | None) -> None:
        self.served.clear()
        for name, slot in (("active", active), ("standby", standby)):
            if slot is not None:
                self.served.labels(model=self.model_name, slot=name, version=slot.version).set(1)
        self.active_version.labels(model=self.model_name).set(float(active.version) if active else 0)


def _class_labels(preds: Any) -> list[tuple[str, int]] | None:
    """[(class label, count)] for label-like predictions (ints, bools, strings); None for anything else."""
    if isinstance(preds, pd.Series):
        preds = preds.to_numpy()
    elif isinstance(preds, list):
        if not preds or not all(isinstance(p, (int, str, bool, np.integer, np.bool_)) for p in preds[:1]):
            return None
        preds = np.asarray(preds)
    if not isinstance(preds, np.ndarray) or preds.ndim != 1 or preds.dtype.kind not in "biuUSO":
        return None
    if len(preds) == 1:
        v = preds[0]
        return (
            [(str(v.item() if hasattr(v, "item") else v), 1)] if isinstance(v, (int, str, bool, np.generic)) else None
        )
    try:
        values, counts = np.unique(preds, return_counts=True)
    except TypeError:
        return None
    return [(str(v.item() if hasattr(v, "item") else v), int(c)) for v, c in zip(values, counts, strict=True)]
