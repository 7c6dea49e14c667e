"""Tracing: a tracer provider per process, and the W3C trace context between deployments.

Every entry point (the ingress, each Ray Serve replica) calls `configure_tracing`
once with the app's `TelemetryConfig` and hands the provider it returns to the
objects that make spans (`create_app`, `Router`, the engine wrappers). With no
``otlp_endpoint`` it returns None and those objects fall back to OpenTelemetry's
global provider, a no-op unless something else in the process installs one: then
a span costs a function call. Nothing here sets a process-wide provider.

A request's trace crosses Ray handles as a plain ``dict[str, str]`` carrier (W3C
``traceparent``/``tracestate``): `inject` in the caller, `extract` in the replica.

The span tree of one routed, streamed chat request::

    POST /v1/chat/completions              ingress (SERVER)
    ├── router.decide                      router replica
    │   ├── classifier.classify            (CLIENT; SERVER child in the classifier replica)
    │   └── compressor.compress            (CLIENT; SERVER child in the compressor replica)
    └── chat {model}                       engine replica (CLIENT, GenAI conventions)
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context, attach, detach, get_current
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chatfleet.serving.config import TelemetryConfig

__all__ = [
    "TRACE_HEADER",
    "TracerProvider",
    "configure_tracing",
    "continued",
    "extract",
    "get_tracer",
    "inject",
    "record_error",
    "records",
    "trace_id",
]

#: Response header carrying the request's trace id (32 hex digits).
TRACE_HEADER = "x-chatfleet-trace-id"

_INSTRUMENTATION = "chatfleet.serving"
_PROPAGATOR = TraceContextTextMapPropagator()
_EXTRA_HINT = "pip install 'chatfleet[serving]' (or opentelemetry-exporter-otlp-proto-{})"


def configure_tracing(
    config: TelemetryConfig,
    *,
    component: str = "ingress",
    processor: SpanProcessor | None = None,
) -> TracerProvider | None:
    """The tracer provider of this process, or None when nothing would export spans.

    ``component`` names the process in the resource (``chatfleet.component``).
    ``processor`` replaces the OTLP exporter, e.g. ``SimpleSpanProcessor(
    InMemorySpanExporter())`` in tests; with it a provider is built even without
    an endpoint.
    """
    if processor is None:
        if not config.otlp_endpoint:
            return None
        processor = BatchSpanProcessor(
            _otlp_exporter(config), schedule_delay_millis=config.export_delay_ms
        )
    resource = Resource.create(
        {"service.name": config.service_name, "chatfleet.component": component}
    )
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio))
    )
    provider.add_span_processor(processor)
    return provider


def _otlp_exporter(config: TelemetryConfig) -> SpanExporter:
    headers = _parse_headers(os.environ.get(config.headers_env, ""))
    endpoint = config.otlp_endpoint.rstrip("/")
    if config.otlp_protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise RuntimeError(
                "telemetry.otlp_protocol grpc needs the OTLP gRPC exporter: "
                + _EXTRA_HINT.format("grpc")
            ) from exc
        return GrpcExporter(endpoint=endpoint, headers=headers or None)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )
    except ImportError as exc:
        raise RuntimeError(
            "telemetry.otlp_endpoint needs the OTLP HTTP exporter: " + _EXTRA_HINT.format("http")
        ) from exc
    # The collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: traces go to /v1/traces.
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    return HttpExporter(endpoint=endpoint, headers=headers or None)


def _parse_headers(raw: str) -> dict[str, str]:
    """``k=v,k2=v2`` (the OTEL_EXPORTER_OTLP_HEADERS format) as a dict."""
    headers: dict[str, str] = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[key.strip().lower()] = value.strip()
    return headers


def get_tracer(provider: TracerProvider | None) -> Tracer:
    """A tracer from ``provider``, else from OpenTelemetry's global provider."""
    return trace.get_tracer(_INSTRUMENTATION, tracer_provider=provider)


_RECORDS: weakref.WeakKeyDictionary[Tracer, bool] = weakref.WeakKeyDictionary()


def records(tracer: Tracer) -> bool:
    """Whether ``tracer``'s spans can be recorded: False for a no-op tracer (no provider
    of ours, as `configure_tracing` returns without an endpoint, and no global one).

    Decided once per tracer, at its first request (start-up has set any global provider
    by then): asking OpenTelemetry per request costs more than a span-free request's
    own tracing work. Hot paths skip building spans that would all be the invalid one.
    """
    known = _RECORDS.get(tracer)
    if known is None:
        known = _RECORDS[tracer] = not _no_op(tracer)
    return known


def _no_op(tracer: Tracer) -> bool:
    if isinstance(tracer, trace.NoOpTracer):
        return True
    # A tracer from the global provider stays a proxy, and records once a real
    # provider is set globally; until then the global provider is a proxy too.
    return isinstance(tracer, trace.ProxyTracer) and isinstance(
        trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )


def inject(context: Context | None = None) -> dict[str, str]:
    """The W3C trace context of ``context`` (default: the current one) as a carrier.

    Empty when there is no valid span: a no-op tracer costs one lookup here.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The context to parent spans on: the carrier's trace, else the current context."""
    if not carrier:
        return get_current()
    return _PROPAGATOR.extract(carrier)


@contextlib.contextmanager
def continued(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Make the carrier's trace current for the block (in the replica that received it)."""
    if not carrier:
        yield
        return
    token = attach(_PROPAGATOR.extract(carrier))
    try:
        yield
    finally:
        detach(token)


def trace_id(span: Span | None = None) -> str | None:
    """The trace id of ``span`` (default: the current span) as 32 hex digits, or None."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id)


def record_error(span: Span, exc: BaseException, **attributes: Any) -> None:
    """Mark ``span`` failed by ``exc``: an exception event and status ERROR."""
    span.record_exception(exc, attributes=attributes or None)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(trace.StatusCode.ERROR, str(exc)[:200] or type(exc).__name__)
