"""Prometheus metrics of one ingress replica, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Time to first token spans 5 ms (a warm fake engine) to 30 s (a cold GPU).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The serving metrics. Labels are bounded: route templates, models, codes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chatfleet_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "chatfleet_http_request_duration_seconds",
            "Time to the end of the response (streams included).",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "chatfleet_errors_total",
            "Errors returned to clients, by machine-readable code.",
            ["code"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "chatfleet_time_to_first_token_seconds",
            "From request accepted to the first generated token, per model.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "chatfleet_inter_token_latency_seconds",
            "Mean gap between tokens within each delivered batch, per model.",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "chatfleet_tokens_total",
            "Tokens processed per model; type is input (prompt) or output (completion).",
            ["model", "type"],
            registry=r,
        )
        self.active_streams = Gauge(
            "chatfleet_active_streams",
            "Generations currently streaming, per model.",
            ["model"],
            registry=r,
        )
        self.generations = Counter(
            "chatfleet_generations_total",
            "Finished generations per model and finish reason (stop, length, cancelled, error).",
            ["model", "finish_reason"],
            registry=r,
        )
        self.websocket_connections = Gauge(
            "chatfleet_websocket_connections",
            "Open WebSocket connections, per endpoint (chat, events).",
            ["endpoint"],
            registry=r,
        )

        self.routing_duration = Histogram(
            "chatfleet_routing_duration_seconds",
            "Time to a routing decision (classification and compression included).",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.routing_decisions = Counter(
            "chatfleet_routing_decisions_total",
            "Routed requests by category, chosen model and reason.",
            ["category", "model", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "chatfleet_routing_fallbacks_total",
            "Models skipped because they failed before their first token.",
            ["from_model", "to_model"],
            registry=r,
        )
        self.classifier_duration = Histogram(
            "chatfleet_classifier_duration_seconds",
            "Latency of /api/classify calls to the classifier.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.compressor_duration = Histogram(
            "chatfleet_compressor_duration_seconds",
            "Latency of /api/compress calls to the compressor.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.compression_ratio = Histogram(
            "chatfleet_compression_ratio",
            "Compressed tokens / original tokens of compressed prompts.",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
