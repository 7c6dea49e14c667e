"""Prometheus metrics of one ingress replica.

Every instrument records into a registry of its own (served at ``/metrics``) and, when a
:class:`Mirror` is given, into a second backend too. Inside Ray Serve that mirror is Ray's
metrics system (see ``chatfleet.serving.app``): each node's metrics agent exports every
replica's series on the node's metrics port with a ``replica`` label, which is what a
cluster should scrape. ``/metrics`` itself answers for whichever replica the proxy picked,
so it is right for one process (``chatfleet serve``) and wrong behind a load balancer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Time to first token spans 5 ms (a warm fake engine) to 30 s (a cold GPU).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

Record = Callable[[float, dict[str, str]], None]
"""Records one value with its labels: a counter's increment, a histogram's observation,
a gauge's new value."""


class Mirror(Protocol):
    """A second metrics backend: builds one recorder per instrument."""

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> Record: ...

    def histogram(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Record: ...

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> Record: ...


class _Child:
    """One labelled series: the Prometheus child plus its mirror recorder."""

    __slots__ = ("_gauge_value", "_prom", "_record", "_tags")

    def __init__(self, prom: Any, record: Record | None, tags: dict[str, str]) -> None:
        self._prom = prom  # a prometheus_client child: Counter, Gauge or Histogram
        self._record = record
        self._tags = tags
        self._gauge_value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._prom.inc(amount)
        if self._record is not None:
            if isinstance(self._prom, Gauge):
                self._gauge_value += amount
                self._record(self._gauge_value, self._tags)
            else:
                self._record(amount, self._tags)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        if self._record is not None:
            self._record(value, self._tags)


class _Family:
    """A metric and its label sets; ``labels()`` children are cached (hot paths)."""

    __slots__ = ("_children", "_labelnames", "_prom", "_record")

    def __init__(
        self, prom: Counter | Gauge | Histogram, labelnames: Sequence[str], record: Record | None
    ) -> None:
        self._prom = prom
        self._labelnames = tuple(labelnames)
        self._record = record
        self._children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            prom = self._prom.labels(*values) if self._labelnames else self._prom
            tags = dict(zip(self._labelnames, values, strict=True))
            child = self._children[values] = _Child(prom, self._record, tags)
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class Metrics:
    """The serving metrics. Labels are bounded: route templates, models, codes."""

    def __init__(self, registry: CollectorRegistry | None = None, mirror: Mirror | None = None):
        self.registry = registry or CollectorRegistry()
        self._mirror = mirror

        self.requests = self._counter(
            "chatfleet_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
        )
        self.request_duration = self._histogram(
            "chatfleet_http_request_duration_seconds",
            "Time to the end of the response (streams included).",
            ["route"],
            _DURATION_BUCKETS,
        )
        self.errors = self._counter(
            "chatfleet_errors_total",
            "Errors returned to clients, by machine-readable code.",
            ["code"],
        )
        self.time_to_first_token = self._histogram(
            "chatfleet_time_to_first_token_seconds",
            "From request accepted to the first generated token, per model.",
            ["model"],
            _TTFT_BUCKETS,
        )
        self.inter_token_latency = self._histogram(
            "chatfleet_inter_token_latency_seconds",
            "Mean gap between tokens within each delivered batch, per model.",
            ["model"],
            _ITL_BUCKETS,
        )
        self.tokens = self._counter(
            "chatfleet_tokens_total",
            "Tokens processed per model; type is input (prompt) or output (completion).",
            ["model", "type"],
        )
        self.active_streams = self._gauge(
            "chatfleet_active_streams",
            "Generations currently streaming, per model.",
            ["model"],
        )
        self.generations = self._counter(
            "chatfleet_generations_total",
            "Finished generations per model and finish reason (stop, length, cancelled, error).",
            ["model", "finish_reason"],
        )
        self.websocket_connections = self._gauge(
            "chatfleet_websocket_connections",
            "Open WebSocket connections, per endpoint (chat, events).",
            ["endpoint"],
        )
        self.routing_duration = self._histogram(
            "chatfleet_routing_duration_seconds",
            "Time to a routing decision (classification and compression included).",
            [],
            _TTFT_BUCKETS,
        )
        self.routing_decisions = self._counter(
            "chatfleet_routing_decisions_total",
            "Routed requests by category, chosen model and reason.",
            ["category", "model", "reason"],
        )
        self.unclassified = self._counter(
            "chatfleet_routing_unclassified_total",
            "Prompts of model auto whose best category scored below"
            " routing.confidence_threshold, so the default model answered them.",
            [],
        )
        self.fallbacks = self._counter(
            "chatfleet_routing_fallbacks_total",
            "Models skipped because they failed before their first token.",
            ["from_model", "to_model"],
        )
        self.classifier_duration = self._histogram(
            "chatfleet_classifier_duration_seconds",
            "Latency of /api/classify calls to the classifier.",
            [],
            _TTFT_BUCKETS,
        )
        self.compressor_duration = self._histogram(
            "chatfleet_compressor_duration_seconds",
            "Latency of /api/compress calls to the compressor.",
            [],
            _DURATION_BUCKETS,
        )
        self.compression_ratio = self._histogram(
            "chatfleet_compression_ratio",
            "Compressed tokens / original tokens of compressed prompts.",
            [],
            _RATIO_BUCKETS,
        )

    def _counter(self, name: str, doc: str, labels: list[str]) -> _Family:
        prom = Counter(name, doc, labels, registry=self.registry)
        record = self._mirror.counter(name, doc, labels) if self._mirror else None
        return _Family(prom, labels, record)

    def _histogram(
        self, name: str, doc: str, labels: list[str], buckets: Sequence[float]
    ) -> _Family:
        prom = Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        record = self._mirror.histogram(name, doc, labels, buckets) if self._mirror else None
        return _Family(prom, labels, record)

    def _gauge(self, name: str, doc: str, labels: list[str]) -> _Family:
        prom = Gauge(name, doc, labels, registry=self.registry)
        record = self._mirror.gauge(name, doc, labels) if self._mirror else None
        return _Family(prom, labels, record)

    def render(self) -> bytes:
        return generate_latest(self.registry)
