"""Live session events: the `EventHub` and ``WS /ws``, each subscriber seeing its own.

Every event is ``{type, session_id, data, ts}`` (``connected``, ``ping``, ``pong``
and ``error`` have no ``session_id``); the event types and the flat fields beside
``data`` are described in `chatfleet.serving.api._sessions`. A subscriber gets the
events of its own client's sessions (an admin's: every session's). A subscriber
that falls ``queue_size`` events behind is dropped and closed (1013), so a slow
browser never slows a generation down; one whose token expires or is revoked gets
an ``error`` event (code ``token_expired`` or ``token_revoked``) and is closed
with 1008 (`end_for_token`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, WebSocket

from chatfleet.serving.api._auth import request_claims
from chatfleet.serving.api._gateway import Gateway
from chatfleet.serving.api._schemas import parse_json
from chatfleet.serving.api._tenancy import caller_of
from chatfleet.serving.errors import AuthenticationError

logger = logging.getLogger(__name__)

# WebSocket close codes (RFC 6455 §7.4.1).
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
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


def add_events_socket(app: FastAPI, gw: Gateway, hub: EventHub, active: Callable[[], int]) -> None:
    """``WS /ws``: ``hub``'s events for the caller; ``active()`` counts this replica's sessions."""
    gauge = gw.metrics.websocket_connections.labels("events")

    @app.websocket("/ws")
    async def events(ws: WebSocket) -> None:
        await ws.accept()
        settings = gw.config.websocket
        if hub.count >= settings.max_connections:
            await ws.send_text(
                event_frame(
                    "error", error="too many event subscribers; retry later", code="overloaded"
                )
            )
            await ws.close(code=TRY_AGAIN_LATER, reason="too many subscribers")
            return
        subscriber = hub.subscribe(
            lambda sid: event_frame(
                "connected", message=GREETING, subscriber_id=sid, sessions=active()
            ),
            sees=caller_of(ws).sees,
        )
        gauge.inc()
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(send_events(ws, subscriber, settings.ping_interval_s)),
            asyncio.create_task(receive_frames(ws, subscriber, settings.max_message_bytes)),
        ]
        claims = request_claims(ws)
        token = None
        if gw.auth is not None and claims is not None:
            token = asyncio.create_task(gw.auth.until_invalid(claims))
            tasks.append(token)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hub.unsubscribe(subscriber)
            gauge.dec()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if token is not None and token.done() and not token.cancelled():
            await end_for_token(ws, token.result())


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


async def end_for_token(ws: WebSocket, ended: AuthenticationError) -> None:
    """Close a subscriber whose token expired or was revoked: an ``error`` event, then 1008."""
    try:
        await ws.send_text(event_frame("error", error=ended.message, code=ended.code))
        await ws.close(code=POLICY_VIOLATION, reason=ended.message)
    except Exception:  # gone meanwhile: nothing left to tell it
        logger.debug("closing a /ws subscriber whose token ended failed", exc_info=True)
