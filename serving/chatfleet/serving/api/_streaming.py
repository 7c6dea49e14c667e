"""Server-sent events that stop the generation when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse(data: Any, event: str | None = None) -> str:
    """One SSE message; ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n" if event else f"data: {payload}\n\n"


class Closing(str):
    """The last part of an `EventStream`'s body: it goes out with the response's end.

    A body generator yields its final events as one ``Closing`` and nothing after
    it; the stream then sends them in the body message that ends the response,
    instead of that message and an empty one after it. One message fewer per
    stream: each crosses every ASGI layer, Serve's send path, a socket write and
    HAProxy, in the burst where streams end and new ones start.
    """

    __slots__ = ()


class EventStream(StreamingResponse):
    """An SSE response whose body generator is always closed, promptly.

    Starlette leaves a half-sent body iterator to the garbage collector when the
    client disconnects; here the iterator is closed as soon as the disconnect
    is seen (or the task is cancelled, as Ray Serve does), so the ``finally``
    blocks down the chain stop the engine.
    """

    def __init__(
        self, body: AsyncGenerator[str, None], headers: dict[str, str] | None = None
    ) -> None:
        self._events = body
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Plain asyncio tasks, not an anyio task group: the group's cancel scopes and
        # task handles were a fifth of the app's CPU per streamed request
        # (bench/ingress_cpu.py). The body goes out in one task while another watches
        # for the client going away and then stops it; when the request's own task is
        # cancelled (Ray Serve does so when its client goes), so is the body's.
        loop = asyncio.get_running_loop()
        sending = loop.create_task(self._send_all(send))
        watching = loop.create_task(self._stop_when_gone(receive, sending))
        try:
            await sending
        except asyncio.CancelledError:
            host = asyncio.current_task()
            if not watching.done() or (host is not None and host.cancelling()):
                raise  # cancelled from outside, not by the client going away
        finally:
            watching.cancel()
            # Not run to its end (an async generator's frame is gone once it ended):
            # close it now, so that the ``finally`` blocks down the chain run.
            if getattr(self._events, "ag_frame", True) is not None:
                with anyio.CancelScope(shield=True):
                    await self._events.aclose()

    async def _send_all(self, send: Send) -> None:
        with contextlib.suppress(OSError):
            await self.stream_response(send)

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for part in self.body_iterator:
            body = part if isinstance(part, bytes | memoryview) else part.encode(self.charset)
            last = isinstance(part, Closing)
            await send({"type": "http.response.body", "body": body, "more_body": not last})
            if last:
                return  # the generator, at its end, is closed by __call__
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stop_when_gone(self, receive: Receive, sending: asyncio.Task[None]) -> None:
        # A receive that fails says as much as a disconnect: nobody is listening.
        with contextlib.suppress(Exception):
            await self.listen_for_disconnect(receive)
        sending.cancel()
