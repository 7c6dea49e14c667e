"""The ingress's own pure ASGI middlewares: request metrics and the body size limit.

Pure ASGI rather than Starlette's ``@app.middleware("http")``, which would hand every
streamed event through an extra memory stream and task.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.api._schemas import error_body
from chatfleet.serving.errors import PayloadTooLarge


class RequestMetrics:
    """Counts requests by route template and status, and times them to their last byte.

    A pure ASGI middleware: Starlette's ``@app.middleware("http")`` would hand every
    streamed event through an extra memory stream and task, and only see the headers.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app starts a response

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            # The router stores the matched route in the (shared) scope.
            template = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.request_duration.labels(template).observe(time.perf_counter() - started)


class BodyLimit:
    """Reject bodies over the limit with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._reject(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # A chunked body: read it here, up to the limit, then replay it.
        body: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            error_body(
                f"request body exceeds {self.limit} bytes",
                type_="invalid_request_error",
                code=PayloadTooLarge.code,
            ),
            status_code=413,
        )
        await response(scope, receive, send)
