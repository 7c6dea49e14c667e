"""The ingress request span, and the trace id in every response's headers.

A pure ASGI middleware (not ``BaseHTTPMiddleware``): the span stays current for the
whole response, streamed bodies included, so every span a request causes, in this
process or behind a Ray handle, is a child of it. A ``traceparent`` header from
the client continues the client's trace.
"""

from __future__ import annotations

import asyncio

from opentelemetry.trace import SpanKind, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatfleet.serving import telemetry

_TRACE_HEADER = telemetry.TRACE_HEADER.encode()


class TracingMiddleware:
    """One SERVER span per HTTP request, named ``{method} {route template}``."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope.get("headers") or []
            if key in (b"traceparent", b"tracestate")
        }
        if not carrier and not telemetry.records(self.tracer):
            # Nothing would record the span, and no client trace to carry on: the span
            # would be the invalid one that is current anyway, and no header is added.
            # Spared, this is a tenth of the app's CPU per request (bench/ingress_cpu.py).
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        with self.tracer.start_as_current_span(
            f"{method} {path}",
            context=telemetry.extract(carrier) if carrier else None,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            trace_id = telemetry.trace_id(span)
            status = 500

            async def send_with_trace_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    if trace_id is not None:
                        headers = list(message.get("headers") or [])
                        headers.append((_TRACE_HEADER, trace_id.encode()))
                        message = {**message, "headers": headers}
                await send(message)

            try:
                await self.app(scope, receive, send_with_trace_id)
            except asyncio.CancelledError:
                span.set_attribute("chatfleet.cancelled", True)
                raise
            except Exception as exc:
                telemetry.record_error(span, exc)
                raise
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
