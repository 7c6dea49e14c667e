"""``GET /api/sessions/{id}/events?after=N``: a session's events again, then live (SSE).

What the store holds after event N (and what this replica has not written yet),
then the live events, each once and in order, until the session's last event
(``session.completed``, ``failed``, ``cancelled`` or ``interrupted``). Each SSE
message is ``id: <seq>``, ``event: <type>``, ``data: <the /ws frame>``, so a client
that loses the stream resumes with ``?after=<the last id>`` (or the standard
``Last-Event-ID`` header, which browsers' EventSource sends by itself). Another
client's session is not found (404).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Annotated

from fastapi import FastAPI, Header, Query
from fastapi.responses import Response

from chatfleet.serving.api._event_log import EventLog
from chatfleet.serving.api._events import TERMINAL_EVENTS, Event, Subscriber
from chatfleet.serving.api._streaming import EventStream
from chatfleet.serving.api._tenancy import CallerDep
from chatfleet.serving.errors import NotFound
from chatfleet.serving.store import Store

#: The highest event number (the column is a 32-bit integer).
MAX_SEQ = 2**31 - 1
#: A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
#: How long a finished session's stream waits for its last event before ending.
_LAST_EVENT_WAIT_S = 2.0


def sse_event(event: Event) -> str:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {event.frame}\n\n"


def add_resume_route(app: FastAPI, log: EventLog, store: Callable[[], Store]) -> None:
    @app.get(
        "/api/sessions/{session_id}/events",
        tags=["sessions"],
        summary="A session's events after N, then live, until it ends (SSE).",
        response_class=Response,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def session_events(
        session_id: str,
        caller: CallerDep,
        after: Annotated[
            int | None,
            Query(
                ge=0, le=MAX_SEQ, description="Replay events numbered above this (default: all)."
            ),
        ] = None,
        last_event_id: Annotated[
            str,
            Header(
                pattern=r"^[0-9]{1,9}$",
                description="EventSource's resume point (the last id it got): used if no after.",
            ),
        ] = "",
    ) -> Response:
        if after is None:
            after = _last_event_id(last_event_id)
        found = await store().get_session(session_id, owner=caller.sees)
        if found is None:
            raise NotFound(f"session {session_id!r} not found")
        # Subscribed before the replay is read: nothing falls between the two.
        subscriber = log.hub.subscribe(sees=caller.sees, session=session_id)
        return EventStream(_events(log, store, subscriber, session_id, after))


def _last_event_id(header: str) -> int:
    return int(header) if header else 0  # digits only: the header's pattern


async def _events(
    log: EventLog, store: Callable[[], Store], subscriber: Subscriber, session_id: str, after: int
) -> AsyncGenerator[str, None]:
    try:
        for event in await log.replay(session_id, after):
            if subscriber.fresh(event):
                yield sse_event(event)
                if event.type in TERMINAL_EVENTS:
                    return
        found = await store().get_session(session_id)
        # Finished, but its last event not replayed: it is on its way, or purged.
        wait = _LAST_EVENT_WAIT_S if found is None or found.finished else KEEPALIVE_S
        while True:
            try:
                item = await asyncio.wait_for(subscriber.queue.get(), wait)
            except TimeoutError:
                found = await store().get_session(session_id)
                if found is None or found.finished:
                    return  # its last event is gone (purged) or was never stored
                yield ": keepalive\n\n"
                continue
            if item is None:
                return  # too slow: dropped; the client resumes from its last id
            if isinstance(item, Event) and subscriber.fresh(item):
                yield sse_event(item)
                if item.type in TERMINAL_EVENTS:
                    return
    finally:
        log.hub.unsubscribe(subscriber)
