"""Prometheus metrics of one ingress replica: each defined once, recorded once.

Every instrument is declared in `Metrics` and records into one registry, served at
``/metrics``. Exporters read what was recorded (`Metrics.instruments`); nothing is
written to a second backend by hand. Inside Ray Serve, ``chatfleet.serving.app``'s
`RayMetricsMirror` copies the registry into Ray's metrics system: each node's metrics
agent exports every replica's series on the node's metrics port with a ``replica``
label, which is what a cluster scrapes. ``/metrics`` answers for whichever replica the
proxy picked, so it is right for one process (``chatfleet serve``) and wrong behind a
load balancer.

The metrics path never raises into a request and never stops: what an instrument or an
exporter cannot take is dropped, counted in ``chatfleet_metrics_errors_total{reason}``
and logged once (the reasons are listed in ``_instruments``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

from chatfleet.serving.api._instruments import (
    Counter,
    Gauge,
    Histogram,
    Instrument,
    MetricErrors,
    Reason,
)

# Time to first token spans 5 ms (a warm fake engine) to 30 s (a cold GPU).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    """The serving metrics. Labels are bounded: route templates, models, codes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._errors = MetricErrors(self.registry)
        self.instruments: list[Instrument] = []

        self.metrics_errors = self._counter(
            "chatfleet_metrics_errors_total",
            "Values, label sets and exports the metrics path dropped or escaped, by reason.",
            ["reason"],
            prom=self._errors.prom,
        )
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
        self.queued_requests = self._gauge(
            "chatfleet_queued_requests",
            "Requests waiting for a replica of the model (every replica full), per model.",
            ["model"],
        )
        self.queue_wait = self._histogram(
            "chatfleet_queue_wait_seconds",
            "From the call to the model to a replica taking it, per model.",
            ["model"],
            _DURATION_BUCKETS,
        )
        self.rejected_requests = self._counter(
            "chatfleet_rejected_requests_total",
            "Requests refused with 429 because the model's replicas were full, by reason"
            " (queue_full: too many waiting; wait_timeout: waited admission.max_queue_wait_s).",
            ["model", "reason"],
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
        self.client_tokens = self._counter(
            "chatfleet_client_tokens_total",
            "Tokens used per client (a token's sub), model and kind (prompt or completion).",
            ["client", "model", "kind"],
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

    def _counter(self, name: str, doc: str, labels: list[str], prom: Any = None) -> Counter:
        if prom is None:
            prom = prometheus_client.Counter(name, doc, labels, registry=self.registry)
        counter = Counter(prom, name, doc, labels, self._errors)
        self.instruments.append(counter)
        return counter

    def _histogram(
        self, name: str, doc: str, labels: list[str], buckets: Sequence[float]
    ) -> Histogram:
        prom = prometheus_client.Histogram(
            name, doc, labels, buckets=buckets, registry=self.registry
        )
        histogram = Histogram(prom, name, doc, labels, self._errors, buckets)
        self.instruments.append(histogram)
        return histogram

    def _gauge(self, name: str, doc: str, labels: list[str]) -> Gauge:
        prom = prometheus_client.Gauge(name, doc, labels, registry=self.registry)
        gauge = Gauge(prom, name, doc, labels, self._errors)
        self.instruments.append(gauge)
        return gauge

    def report_error(self, reason: Reason, metric: str, detail: object) -> None:
        """Count (and log once) something an exporter dropped or escaped."""
        self._errors.report(reason, metric, detail)

    def render(self) -> bytes:
        return generate_latest(self.registry)
