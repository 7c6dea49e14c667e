"""The operator's Prometheus metrics, on a registry of their own (no global state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram


@dataclass(frozen=True)
class OperatorMetrics:
    """Reconcile counts, durations and errors."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    reconciles: Counter = field(init=False)
    duration: Histogram = field(init=False)
    errors: Counter = field(init=False)
    status_updates: Counter = field(init=False)

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
