"""Draining a replica: refuse new work at once, let streams finish, end the rest cleanly.

`Drain` is the replica's shutdown state, held by the `Gateway`. `Drain.run`:

1. ``draining`` turns true: readiness answers 503 (a Service stops routing here) and
   `DrainGuard` refuses new requests (503 ``shutting_down``) and WebSocket connects
   (an ``error`` frame, close 1001);
2. streams in flight may finish for up to ``timeout_s``;
3. then ``expired`` turns true and every answer still streaming raises `ShuttingDown`
   (at its next batch, or at once while it waits on the engine), so each wire format
   ends with its terminal event (SSE ``error`` then its normal end, a WebSocket
   ``error`` frame, a stored reply finished as ``interrupted``);
4. the WebSockets still open get an ``error`` frame and close 1001.

The request path pays one flag check per request and a few attribute writes per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import TypeVar

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatfleet.serving.api._schemas import error_body
from chatfleet.serving.errors import ShuttingDown

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

__all__ = ["Drain", "DrainGuard", "StreamSlot"]

WS_GOING_AWAY = 1001
#: What stays answered while draining: probes and metrics.
_ALWAYS_ANSWERED = frozenset({"/healthz", "/health", "/ready", "/metrics", "/ws/health"})
#: How long interrupted streams get to send their terminal event before sockets close.
_TERMINAL_EVENTS_S = 5.0


def shutting_down() -> ShuttingDown:
    return ShuttingDown("the server is shutting down; retry on another replica")


class StreamSlot:
    """One answer streaming: the task waiting on its engine, if any (to interrupt it)."""

    __slots__ = ("interrupted", "waiting")

    def __init__(self) -> None:
        self.waiting: asyncio.Task[object] | None = None
        self.interrupted = False


class Drain:
    """A replica's drain: see the module docstring."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.expired = False
        self._streams: set[StreamSlot] = set()
        self._sockets: dict[int, Send] = {}
        self._idle = asyncio.Event()
        self._run: asyncio.Task[None] | None = None

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def interruptible(self, source: AsyncGenerator[_T, None]) -> AsyncGenerator[_T, None]:
        """``source``'s items until it ends, or `ShuttingDown` once the drain has expired."""
        slot = self.opened()
        try:
            while True:
                if self.expired:
                    raise shutting_down()
                slot.waiting = asyncio.current_task()
                try:
                    item = await anext(source)
                except StopAsyncIteration:
                    return
                except BaseException:
                    if slot.interrupted and slot.waiting is not None:
                        # The drain cancelled this wait: the consumer sees the
                        # shutdown, not a cancellation of its own task.
                        slot.waiting.uncancel()
                        raise shutting_down() from None
                    raise
                finally:
                    slot.waiting = None
                yield item
        finally:
            self.closed(slot)
            await source.aclose()

    def opened(self) -> StreamSlot:
        slot = StreamSlot()
        self._streams.add(slot)
        return slot

    def closed(self, slot: StreamSlot) -> None:
        self._streams.discard(slot)
        if not self._streams:
            self._idle.set()

    def begin(self) -> None:
        """Start draining now (readiness 503, new requests refused); once only."""
        if self._run is None:
            self.draining = True
            self._run = asyncio.ensure_future(self._drain())

    async def run(self) -> None:
        """Drain once; later calls wait for the first."""
        self.begin()
        assert self._run is not None
        await asyncio.shield(self._run)

    async def _drain(self) -> None:
        if self._streams:
            self._idle.clear()
        else:
            self._idle.set()
        logger.info(
            "draining: %d streams in flight, up to %.0f s", len(self._streams), self.timeout_s
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.timeout_s)
        self.expired = True
        if self._streams:
            logger.warning("drain timeout: interrupting %d streams", len(self._streams))
        for slot in list(self._streams):
            if slot.waiting is not None:
                slot.interrupted = True
                slot.waiting.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), _TERMINAL_EVENTS_S)
        for send in list(self._sockets.values()):
            await _going_away(send)
        self._sockets.clear()

    def register_socket(self, send: Send) -> int:
        key = id(send)
        self._sockets[key] = send
        return key

    def forget_socket(self, key: int) -> None:
        self._sockets.pop(key, None)


async def _going_away(send: Send) -> None:
    # Here, not at the top: _auth needs the Gateway, which holds the Drain.
    from chatfleet.serving.api._auth import ws_error_frame

    err = shutting_down()
    with contextlib.suppress(Exception):
        await send({"type": "websocket.send", "text": ws_error_frame(err.message, err.code)})
        await send({"type": "websocket.close", "code": WS_GOING_AWAY, "reason": "shutting down"})


class DrainGuard:
    """While draining, refuse new requests and WebSockets; track open WebSockets to close.

    A pure ASGI middleware: one flag check per HTTP request.
    """

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.drain.draining and scope["path"] not in _ALWAYS_ANSWERED:
                await _refused(scope, receive, send)
                return
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        drain = self.drain
        if drain.draining:
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                await _going_away(send)
            return
        key: int | None = None
        closed = False

        async def tracked(message: Message) -> None:
            nonlocal key, closed
            if closed:
                return  # the drain closed it: the app's late frames go nowhere
            if message["type"] == "websocket.accept":
                await send(message)
                key = drain.register_socket(closing)
                return
            if message["type"] == "websocket.close":
                closed = True
            await send(message)

        async def closing(message: Message) -> None:
            nonlocal closed
            if not closed:
                closed = message["type"] == "websocket.close"
                await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            if key is not None:
                drain.forget_socket(key)


async def _refused(scope: Scope, receive: Receive, send: Send) -> None:
    err = shutting_down()
    response = JSONResponse(
        error_body(err.message, type_=err.error_type, code=err.code),
        status_code=err.status_code,
        # A client on a kept-alive connection reconnects, through the Service, elsewhere.
        headers={"Retry-After": str(err.retry_after), "Connection": "close"},
    )
    await response(scope, receive, send)
