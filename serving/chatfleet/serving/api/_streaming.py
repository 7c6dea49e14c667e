"""Server-sent events that stop the generation when the client goes away."""

from __future__ import annotations

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
        try:
            async with anyio.create_task_group() as group:

                async def send_all() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(send_all)
                group.start_soon(watch_disconnect)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
