"""The operator's Prometheus metrics, on a registry of their own (no global state)."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

READY_STATES = ("True", "False", "Unknown")
"""The values of the ``ready`` label: a ChatDeployment's ``Ready`` condition status."""


@dataclass(frozen=True)
class OperatorMetrics:
    """Reconcile counts, durations and errors; ChatDeployments by Ready condition."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    reconciles: Counter = field(init=False)
    duration: Histogram = field(init=False)
    errors: Counter = field(init=False)
    status_updates: Counter = field(init=False)
    chatdeployments: Gauge = field(init=False)
    # The Ready status of every ChatDeployment this process knows ("namespace/name"):
    # Kopf runs handlers in threads, so the map and the gauge change under one lock.
    _ready: dict[str, str] = field(init=False, default_factory=dict, repr=False, compare=False)
    _ready_lock: threading.Lock = field(
        init=False, default_factory=threading.Lock, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(
            self,
            "reconciles",
            Counter(
                "chatfleet_operator_reconciles_total",
                "ChatDeployment reconciles, by trigger and result.",
                ["trigger", "result"],
                registry=self.registry,
            ),
        )
        set_(
            self,
            "duration",
            Histogram(
                "chatfleet_operator_reconcile_duration_seconds",
                "Time to render and apply a ChatDeployment's objects.",
                ["trigger"],
                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=self.registry,
            ),
        )
        set_(
            self,
            "errors",
            Counter(
                "chatfleet_operator_errors_total",
                "Reconcile errors, by kind (invalid_spec, missing_secret, api).",
                ["kind"],
                registry=self.registry,
            ),
        )
        set_(
            self,
            "status_updates",
            Counter(
                "chatfleet_operator_status_updates_total",
                "ChatDeployment status updates mirrored from RayServices.",
                registry=self.registry,
            ),
        )
        set_(
            self,
            "chatdeployments",
            Gauge(
                "chatfleet_operator_chatdeployments",
                "ChatDeployments this operator knows, by the status of their Ready condition.",
                ["ready"],
                registry=self.registry,
            ),
        )
        for state in READY_STATES:
            self.chatdeployments.labels(state).set(0)  # zeros are series too

    def track_ready(self, namespace: str, name: str, ready: str) -> None:
        """Record a ChatDeployment's Ready status ("True", "False", anything else: Unknown)."""
        with self._ready_lock:
            self._ready[f"{namespace}/{name}"] = ready if ready in READY_STATES else "Unknown"
            self._refresh_ready()

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted ChatDeployment from the gauge."""
        with self._ready_lock:
            self._ready.pop(f"{namespace}/{name}", None)
            self._refresh_ready()

    def _refresh_ready(self) -> None:
        counts = collections.Counter(self._ready.values())
        for state in READY_STATES:
            self.chatdeployments.labels(state).set(counts[state])
