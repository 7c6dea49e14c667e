"""Session events through the store: numbered, written in batches, followed by every replica.

The replica running a session numbers its events (``seq``, from 1) and hands them to
its own subscribers at once (`EventLog.emit`); every ``events_flush_s`` the events
emitted meanwhile are written in one statement, so the per-token cost is an append
to a list. Every replica follows the table (`EventLog.follow`): on PostgreSQL a
``NOTIFY`` after each batch wakes it (LISTEN, asyncpg), else it polls every
``events_poll_s``; the events other replicas wrote reach its subscribers in each
session's order, each once. `EventLog.replay` is what a reconnecting client missed:
the store's events above N and those not yet written.

``id`` order is not commit order on PostgreSQL (two replicas' batches can commit the
other way round), so ids skipped while following are looked for again for a while
(`_FollowCursor`); a session's events come from one replica, in order, so a gap in
a session's ``seq`` is read from the store at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import IntegrityError

from chatfleet.serving.api._events import (
    REMEMBERED_SESSIONS,
    TERMINAL_EVENTS,
    Event,
    EventHub,
    event_frame,
)
from chatfleet.serving.store import Store
from chatfleet.serving.store._events import EVENTS_CHANNEL, NewEvent, SessionEvent

logger = logging.getLogger(__name__)

#: How long an id skipped while following is looked for again (a transaction that
#: committed late); longer than any batch insert takes.
_HOLE_WAIT_S = 30.0
#: Most skipped ids remembered at once.
_MAX_HOLES = 10_000
#: Most events kept unwritten while the store is unreachable; older ones are dropped.
_MAX_PENDING = 100_000


def _stored(event: SessionEvent) -> Event:
    return Event(event.frame, event.type, event.owner, event.session_id, event.seq)


class _FollowCursor:
    """Where following stands: the highest id read, and lower ids not read yet."""

    def __init__(self, start: int) -> None:
        self.top = start
        self.holes: dict[int, float] = {}

    @property
    def floor(self) -> int:
        return min(self.holes) - 1 if self.holes else self.top

    def saw(self, event_id: int) -> None:
        self.holes.pop(event_id, None)
        if event_id > self.top:
            now = time.monotonic()
            for missing in range(max(self.top + 1, event_id - _MAX_HOLES), event_id):
                self.holes[missing] = now
            self.top = event_id

    def expire(self) -> None:
        too_old = time.monotonic() - _HOLE_WAIT_S
        for hole in [h for h, since in self.holes.items() if since < too_old]:
            del self.holes[hole]


class EventLog:
    """This replica's session events: numbered, delivered, stored; others' followed."""

    def __init__(
        self,
        store: Callable[[], Store | None],
        hub: EventHub,
        *,
        on_followed: Callable[[Event], None] | None = None,
    ) -> None:
        self._store = store
        self.hub = hub
        self._on_followed = on_followed
        self._next: dict[str, int] = {}
        self._pending: list[NewEvent] = []
        self._writing: list[NewEvent] = []  # the batch being written
        # One batch at a time: a session's events must commit in order.
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.written = 0  # events stored by this replica
        self.followed = 0  # events of other replicas delivered here

    def emit(
        self,
        type_: str,
        data: dict[str, Any] | None = None,
        *,
        owner: str,
        session_id: str,
        **flat: Any,
    ) -> Event:
        """The session's next event: to this replica's subscribers now, to the store soon."""
        seq = self._next.get(session_id, 1)
        if type_ in TERMINAL_EVENTS:
            self._next.pop(session_id, None)
        else:
            self._next[session_id] = seq + 1
        frame = event_frame(type_, data, session_id=session_id, seq=seq, **flat)
        event = Event(frame, type_, owner, session_id, seq)
        if self._store() is not None:  # no store: nowhere to write, nothing to resume
            self._pending.append(NewEvent(session_id, seq, owner, type_, frame))
        self.hub.deliver(event)
        return event

    def forget(self, session_id: str) -> None:
        """Stop numbering a session that another replica finished."""
        self._next.pop(session_id, None)

    async def emit_stored(
        self,
        type_: str,
        data: dict[str, Any] | None = None,
        *,
        owner: str,
        session_id: str,
        **flat: Any,
    ) -> Event | None:
        """An event of a session not running here (cancelled or recovered by this
        replica): numbered by the store, stored, then delivered."""
        store = self._store()
        if store is None:
            return None
        stored = await store.add_event_next(
            session_id,
            owner,
            type_,
            lambda seq: event_frame(type_, data, session_id=session_id, seq=seq, **flat),
        )
        event = _stored(stored)
        self.hub.deliver(event)
        return event

    async def replay(self, session_id: str, after: int) -> list[Event]:
        """The session's events above ``after``, in order: stored, then not yet written."""
        # Unwritten ones first: one written meanwhile is then in one of the two reads.
        unwritten = [
            Event(e.frame, e.type, e.owner, e.session_id, e.seq)
            for e in [*self._writing, *self._pending]
            if e.session_id == session_id and e.seq > after
        ]
        store = self._store()
        stored = (
            []
            if store is None
            else [_stored(e) for e in await store.events_after(session_id, after)]
        )
        by_seq = {e.seq: e for e in [*stored, *unwritten]}
        return [by_seq[seq] for seq in sorted(by_seq)]

    async def flush(self) -> None:
        """Write the events emitted so far, in one statement, after any batch before."""
        store = self._store()
        if store is None:
            return
        async with self._flushing:
            batch, self._pending = self._pending, []
            if not batch:
                return
            self._writing = batch
            try:
                await self._write(store, batch)
            finally:
                self._writing = []

    async def _write(self, store: Store, batch: list[NewEvent]) -> None:
        try:
            await store.add_events(batch)
        except IntegrityError:
            # Should not happen (out-of-band numbers are far ahead); if it does, store
            # the others one by one and drop the clashing ones.
            for event in batch:
                try:
                    await store.add_events([event])
                except IntegrityError:
                    logger.warning(
                        "event %d of session %s clashed with one stored elsewhere; dropped",
                        event.seq,
                        event.session_id,
                    )
        except Exception:
            logger.warning("could not store %d session events; retrying", len(batch), exc_info=True)
            self._pending = [*batch, *self._pending][-_MAX_PENDING:]
            return
        self.written += len(batch)

    async def start(self, flush_s: float, poll_s: float) -> None:
        store = self._store()
        if store is None or self._tasks:
            return
        cursor = _FollowCursor(await store.last_event_id())
        self._tasks = [
            asyncio.create_task(self._flush_every(flush_s), name="session-events-flush"),
            asyncio.create_task(self._follow(store, cursor, poll_s), name="session-events-follow"),
        ]
        if store.dialect == "postgresql":
            self._tasks.append(
                asyncio.create_task(self._listen(store), name="session-events-listen")
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.flush()

    async def _flush_every(self, flush_s: float) -> None:
        while True:
            await asyncio.sleep(flush_s)
            await self.flush()

    async def _follow(self, store: Store, cursor: _FollowCursor, poll_s: float) -> None:
        last: dict[str, int] = {}  # the highest seq delivered of others' sessions
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll_s)
            self._wake.clear()
            try:
                while await self._follow_once(store, cursor, last):
                    pass
            except Exception:
                logger.warning("could not read other replicas' session events", exc_info=True)

    async def _follow_once(
        self, store: Store, cursor: _FollowCursor, last: dict[str, int], limit: int = 1000
    ) -> bool:
        """Deliver what others stored since the cursor; whether there may be more."""
        found = await store.events_since(cursor.floor, limit)
        for event in found:
            cursor.saw(event.id)
            if event.replica == store.replica_id:
                continue  # delivered when emitted
            seen = last.get(event.session_id)
            if seen is not None and event.seq <= seen:
                continue
            if seen is not None and event.seq > seen + 1:
                for missed in await store.events_after(event.session_id, seen):
                    if missed.seq < event.seq:
                        self._deliver_followed(missed, last)
            self._deliver_followed(event, last)
        cursor.expire()
        return len(found) == limit

    def _deliver_followed(self, event: SessionEvent, last: dict[str, int]) -> None:
        last[event.session_id] = event.seq
        if len(last) > REMEMBERED_SESSIONS:
            del last[next(iter(last))]
        self.followed += 1
        delivered = _stored(event)
        self.hub.deliver(delivered)
        if self._on_followed is not None:
            self._on_followed(delivered)

    async def _listen(self, store: Store) -> None:
        """Wake the follower on each ``NOTIFY``; polling goes on if this fails."""
        while True:
            try:
                await self._listen_once(store)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("LISTEN %s failed; polling meanwhile", EVENTS_CHANNEL, exc_info=True)
            await asyncio.sleep(5)

    async def _listen_once(self, store: Store) -> None:
        closed = asyncio.Event()
        async with store.raw_connection() as raw:
            await raw.add_listener(EVENTS_CHANNEL, lambda *_: self._wake.set())
            raw.add_termination_listener(lambda *_: closed.set())
            self._wake.set()  # what was written while not listening
            await closed.wait()
