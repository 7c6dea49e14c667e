"""HTTP admission of one ingress replica: its budget of requests, sockets apart.

Serve admits up to the ingress's ``max_ongoing_requests`` into a replica and counts an
open WebSocket as one for its whole life, so Serve's limit is sized for the HTTP budget
plus every socket (``chatfleet.serving.app``), and the two budgets are kept here: HTTP
requests against ``ingress.max_ongoing_requests`` (`HttpAdmission`), WebSockets against
``websocket.max_connections`` (their routes). Idle sockets then never hold up
``/healthz`` or a chat, and a burst of HTTP never refuses a socket.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.api._schemas import error_body
from chatfleet.serving.errors import ServerBusy

#: A streamed answer holds its slot until its last byte: a second is a fair retry.
_RETRY_AFTER_S = 1


class HttpAdmission:
    """At most ``limit`` HTTP requests at once (streams until their last byte); more get
    429 ``server_busy`` with ``Retry-After``. WebSockets pass through uncounted."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            exc = ServerBusy(
                f"this replica is serving its limit of {self.limit} HTTP requests;"
                f" retry in {_RETRY_AFTER_S} s",
                retry_after=_RETRY_AFTER_S,
            )
            self.metrics.errors.labels(exc.code).inc()
            response = JSONResponse(
                error_body(exc.message, type_=exc.error_type, code=exc.code),
                status_code=exc.status_code,
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            )
            await response(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
