"""Live session events: the `EventHub` and ``WS /ws``, each subscriber seeing its own.

Every event is ``{type, session_id, seq, data, ts}`` (``connected``, ``ping``,
``pong`` and ``error`` have neither ``session_id`` nor ``seq``); the event types and
the flat fields beside ``data`` are described in `chatfleet.serving.api._sessions`.
``seq`` numbers a session's events from 1, one by one (an event another replica
adds, a cancel or a recovery, is numbered further ahead). A subscriber gets the events of its own
client's sessions (an admin's: every session's), whichever replica runs them
(`chatfleet.serving.api._event_log`). A client frame
``{"type": "resume", "session_id": ..., "after": N}`` replays the session's events
numbered above N, in order; from then on that session's events reach the
subscriber once each and in order (live ones it already had are not sent again).
Another client's session, or an unknown one, gets an ``error`` frame
(``not_found``). A subscriber
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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

#: Sessions whose last sent event a subscriber remembers (to send nothing twice).
REMEMBERED_SESSIONS = 10_000

#: The last event of a session.
TERMINAL_EVENTS = frozenset(
    {"session.completed", "session.failed", "session.cancelled", "session.interrupted"}
)


def event_frame(type_: str, data: dict[str, Any] | None = None, **flat: Any) -> str:
    """One ``/ws`` event; ``data`` defaults to the flat fields but ``session_id`` and ``seq``."""
    if data is None:
        data = {k: v for k, v in flat.items() if k not in ("session_id", "seq")}
    return json.dumps(
        {"type": type_, **flat, "data": data, "ts": datetime.now(UTC).isoformat()},
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class Event:
    """A frame to send; a session's event also says whose it is and its number."""

    frame: str
    type: str = ""
    owner: str | None = None
    session_id: str | None = None
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Resume:
    """A subscriber's request to replay a session's events numbered above ``after``."""

    session_id: str
    after: int


#: Reads a session's events numbered above ``after`` from the store, in order.
Replay = Callable[[str, int], Awaitable[list[Event]]]


class Subscriber:
    __slots__ = ("id", "queue", "sees", "sent", "session")

    def __init__(self, queue_size: int, sees: str | None, session: str | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.sees = sees  # the owner whose events it gets; None: everyone's (an admin)
        self.session = session  # only this session's events; None: every session's
        # None is the "you are dropped" sentinel; one slot is kept free for it.
        self.queue: asyncio.Queue[Event | Resume | None] = asyncio.Queue(maxsize=queue_size + 1)
        # The highest seq sent of each session (the latest ones): nothing is sent twice.
        self.sent: dict[str, int] = {}

    def fresh(self, event: Event) -> bool:
        """Whether ``event`` is news to this subscriber (and note it as sent)."""
        if event.session_id is None:
            return True
        if event.seq <= self.sent.get(event.session_id, 0):
            return False
        self.sent[event.session_id] = event.seq
        if len(self.sent) > REMEMBERED_SESSIONS:
            del self.sent[next(iter(self.sent))]  # the longest-known session's
        return True


class EventHub:
    """Fans events out to the ``/ws`` subscribers allowed to see them, never waiting."""

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._subscribers: dict[str, Subscriber] = {}
        self.dropped = 0

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self,
        greeting: Callable[[str], str] | None = None,
        *,
        sees: str | None,
        session: str | None = None,
    ) -> Subscriber:
        """A new subscriber to ``sees``'s events (``None``: all), or to one ``session``'s,
        whose first frame is ``greeting(its id)``."""
        subscriber = Subscriber(self.queue_size, sees, session)
        if greeting is not None:
            subscriber.queue.put_nowait(Event(greeting(subscriber.id)))
        self._subscribers[subscriber.id] = subscriber
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.pop(subscriber.id, None)

    def deliver(self, event: Event) -> None:
        """A session's event, to its owner's subscribers and the admins'."""
        for subscriber in list(self._subscribers.values()):
            if subscriber.sees is not None and subscriber.sees != event.owner:
                continue
            if subscriber.session is not None and subscriber.session != event.session_id:
                continue
            if subscriber.queue.qsize() >= self.queue_size:
                self._drop(subscriber)
                continue
            subscriber.queue.put_nowait(event)

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


def add_events_socket(
    app: FastAPI, gw: Gateway, hub: EventHub, active: Callable[[], int], replay: Replay
) -> None:
    """``WS /ws``: ``hub``'s events for the caller, ``replay`` for a ``resume`` frame;
    ``active()`` counts this replica's sessions."""
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

        async def may_resume(session_id: str) -> bool:
            store = gw.store
            found = (
                None
                if store is None
                else await store.get_session(session_id, owner=subscriber.sees)
            )
            return found is not None

        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(send_events(ws, subscriber, settings.ping_interval_s, replay)),
            asyncio.create_task(
                receive_frames(ws, subscriber, settings.max_message_bytes, may_resume)
            ),
        ]
        claims = request_claims(ws)
        # The token's end: a callback of the replica's token watch, not a task per socket.
        token: asyncio.Future[AuthenticationError] | None = None
        stop_watch = None
        if gw.auth is not None and claims is not None:
            token = asyncio.get_running_loop().create_future()
            stop_watch = gw.auth.when_invalid(claims, token.set_result)
        try:
            await asyncio.wait(
                [*tasks, token] if token is not None else tasks,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if stop_watch is not None:
                stop_watch()
            hub.unsubscribe(subscriber)
            gauge.dec()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if token is not None and token.done() and not token.cancelled():
            await end_for_token(ws, token.result())


async def send_events(
    ws: WebSocket, subscriber: Subscriber, ping_interval: float, replay: Replay
) -> None:
    while True:
        item: Event | Resume | None
        try:
            item = await asyncio.wait_for(subscriber.queue.get(), ping_interval)
        except TimeoutError:
            item = Event(event_frame("ping"))
        if item is None:
            await ws.close(code=TRY_AGAIN_LATER, reason="too slow: events were dropped")
            return
        if isinstance(item, Resume):
            # Everything above ``after`` again, then live events only past what was
            # replayed: in order, nothing missing, nothing twice.
            subscriber.sent.pop(item.session_id, None)
            for event in await replay(item.session_id, item.after):
                if subscriber.fresh(event):
                    await ws.send_text(event.frame)
            continue
        if subscriber.fresh(item):
            await ws.send_text(item.frame)


def read_resume(frame: dict[str, Any]) -> Resume:
    """A ``resume`` frame's request; `ValueError` saying what is wrong with it."""
    session_id, after = frame.get("session_id"), frame.get("after", 0)
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("resume needs session_id, a string")
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValueError("resume's after must be a whole number of at least 0")
    return Resume(session_id, after)


async def receive_frames(
    ws: WebSocket,
    subscriber: Subscriber,
    max_bytes: int,
    may_resume: Callable[[str], Awaitable[bool]],
) -> None:
    """Clients mostly listen: a ``ping`` gets a ``pong``, a ``resume`` its session's
    events again, anything else an ``error``."""
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
        reply: Event | Resume
        if kind == "pong":
            continue
        if kind == "ping":
            reply = Event(event_frame("pong"))
        elif kind == "resume":
            reply = await resume_or_error(frame, may_resume)
        else:
            reply = Event(
                event_frame(
                    "error",
                    error='expected a JSON object such as {"type": "ping"} or {"type": "resume",'
                    ' "session_id": "...", "after": 0}',
                    code="invalid_frame",
                )
            )
        if subscriber.queue.qsize() < subscriber.queue.maxsize - 1:
            subscriber.queue.put_nowait(reply)


async def resume_or_error(
    frame: dict[str, Any], may_resume: Callable[[str], Awaitable[bool]]
) -> Event | Resume:
    try:
        resume = read_resume(frame)
    except ValueError as exc:
        return Event(event_frame("error", error=str(exc), code="invalid_frame"))
    if not await may_resume(resume.session_id):
        return Event(
            event_frame(
                "error",
                error=f"session {resume.session_id!r} not found",
                code="not_found",
                session_id=resume.session_id,
            )
        )
    return resume


async def end_for_token(ws: WebSocket, ended: AuthenticationError) -> None:
    """Close a subscriber whose token expired or was revoked: an ``error`` event, then 1008."""
    try:
        await ws.send_text(event_frame("error", error=ended.message, code=ended.code))
        await ws.close(code=POLICY_VIOLATION, reason=ended.message)
    except Exception:  # gone meanwhile: nothing left to tell it
        logger.debug("closing a /ws subscriber whose token ended failed", exc_info=True)
