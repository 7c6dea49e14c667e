"""Live session events: the `EventHub` and ``WS /ws``, each subscriber seeing its own.

Every event is ``{type, session_id, data, ts}`` (``connected``, ``ping``, ``pong``
and ``error`` have no ``session_id``); the event types and the flat fields beside
``data`` are described in `chatfleet.serving.api._sessions`. A subscriber gets the
events of its own client's sessions (an admin's: every session's). A subscriber
that falls ``queue_size`` events behind is dropped and closed (1013), so a slow
browser never slows a generation down; one whose token expires or is revoked gets
an ``error`` frame and is closed (1008, see `SocketGuard`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import WebSocket

from chatfleet.serving.api._schemas import parse_json

logger = logging.getLogger(__name__)

# WebSocket close codes (RFC 6455 §7.4.1).
GOING_AWAY = 1001
TRY_AGAIN_LATER = 1013

GREETING = "connected to chatfleet: live session events"


def event_frame(type_: str, data: dict[str, Any] | None = None, **flat: Any) -> str:
    """One ``/ws`` event; ``data`` defaults to the flat fields but ``session_id``."""
    if data is None:
        data = {k: v for k, v in flat.items() if k != "session_id"}
    return json.dumps(
        {"type": type_, **flat, "data": data, "ts": datetime.now(UTC).isoformat()},
        separators=(",", ":"),
    )


class Subscriber:
    __slots__ = ("id", "queue", "sees")

    def __init__(self, queue_size: int, sees: str | None) -> None:
        self.id = uuid.uuid4().hex
        self.sees = sees  # the owner whose events it gets; None: everyone's (an admin)
        # None is the "you are dropped" sentinel; one slot is kept free for it.
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=queue_size + 1)


class EventHub:
    """Fans events out to the ``/ws`` subscribers allowed to see them, never waiting."""

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._subscribers: dict[str, Subscriber] = {}
        self.dropped = 0

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def subscribe(self, greeting: Callable[[str], str], *, sees: str | None) -> Subscriber:
        """A new subscriber to ``sees``'s events (``None``: all) whose first frame is
        ``greeting(its id)``."""
        subscriber = Subscriber(self.queue_size, sees)
        subscriber.queue.put_nowait(greeting(subscriber.id))
        self._subscribers[subscriber.id] = subscriber
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.pop(subscriber.id, None)

    def publish(
        self, type_: str, data: dict[str, Any] | None = None, *, owner: str, **flat: Any
    ) -> None:
        """An event of ``owner``'s session, to that owner's subscribers and the admins'."""
        frame: str | None = None  # encoded once, only if someone may see it
        for subscriber in list(self._subscribers.values()):
            if subscriber.sees is not None and subscriber.sees != owner:
                continue
            if subscriber.queue.qsize() >= self.queue_size:
                self._drop(subscriber)
                continue
            if frame is None:
                frame = event_frame(type_, data, **flat)
            subscriber.queue.put_nowait(frame)

    def _drop(self, subscriber: Subscriber) -> None:
        logger.warning(
            "dropping /ws subscriber %s: %d events behind", subscriber.id, self.queue_size
        )
        self.dropped += 1
        self.unsubscribe(subscriber)
        subscriber.queue.put_nowait(None)

    def close_all(self) -> None:
        for subscriber in list(self._subscribers.values()):
            self.unsubscribe(subscriber)
            subscriber.queue.put_nowait(None)


async def send_events(ws: WebSocket, subscriber: Subscriber, ping_interval: float) -> None:
    while True:
        try:
            frame = await asyncio.wait_for(subscriber.queue.get(), ping_interval)
        except TimeoutError:
            frame = event_frame("ping")
        if frame is None:
            await ws.close(code=TRY_AGAIN_LATER, reason="too slow: events were dropped")
            return
        await ws.send_text(frame)


async def receive_frames(ws: WebSocket, subscriber: Subscriber, max_bytes: int) -> None:
    """Clients only listen; a ``ping`` gets a ``pong``, anything unreadable an ``error``."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text") or message.get("bytes") or ""
        try:
            if len(raw) > max_bytes:
                raise ValueError("frame too large")
            frame = parse_json(raw)
            kind = frame.get("type") if isinstance(frame, dict) else None
        except ValueError:
            kind = None
        if kind == "pong":
            continue
        if kind == "ping":
            reply = event_frame("pong")
        else:
            reply = event_frame(
                "error",
                error='expected a JSON object such as {"type": "ping"}; /ws only sends events',
                code="invalid_frame",
            )
        if subscriber.queue.qsize() < subscriber.queue.maxsize - 1:
            subscriber.queue.put_nowait(reply)
