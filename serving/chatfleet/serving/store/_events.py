"""Session events: every ``/ws`` event of a session, numbered per session (``seq``).

The replica running a session numbers its events and writes them in batches
(`add_events`); other replicas follow the table in ``id`` order (`events_since`),
and a client that reconnects reads what it missed (`events_after`). Events of a
session are written by one replica at a time, in order, so a session's events are
committed in ``seq`` order. Out-of-band events (a cancel through another replica,
recovery) are numbered by the database `OUT_OF_BAND_AHEAD` past the session's last
stored event (`add_event_next`), ahead of what its replica, if it is still running
it, writes before it hears of them: numbers only increase, and never clash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, text

from chatfleet.serving.store._database import Database
from chatfleet.serving.store._models import SessionEventRow, utcnow

#: The PostgreSQL channel a replica notifies after writing events, so the others read
#: them at once rather than at their next poll.
EVENTS_CHANNEL = "chatfleet_session_events"

#: How far past a session's last stored event an out-of-band event is numbered: more
#: than its replica emits between two flushes and hearing of the event.
OUT_OF_BAND_AHEAD = 1000


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One stored event: ``frame`` is the JSON text sent to subscribers."""

    id: int
    session_id: str
    seq: int
    owner: str
    replica: str | None
    type: str
    frame: str


def _event(row: SessionEventRow) -> SessionEvent:
    return SessionEvent(
        id=row.id,
        session_id=row.session_id,
        seq=row.seq,
        owner=row.owner,
        replica=row.replica,
        type=row.type,
        frame=row.frame,
    )


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to store: a session's ``seq``-th, as ``frame``."""

    session_id: str
    seq: int
    owner: str
    type: str
    frame: str


class EventStore(Database):
    replica_id: str

    async def add_events(self, events: Sequence[NewEvent]) -> None:
        """Store a batch of events in one statement, and tell other replicas."""
        if not events:
            return
        now = utcnow()
        rows = [
            {
                "session_id": e.session_id,
                "seq": e.seq,
                "owner": e.owner,
                "replica": self.replica_id,
                "type": e.type,
                "frame": e.frame,
                "created_at": now,
            }
            for e in events
        ]
        async with self._tx() as s:
            await s.execute(insert(SessionEventRow), rows)
            if self.dialect == "postgresql":
                await s.execute(text(f"NOTIFY {EVENTS_CHANNEL}"))

    async def add_event_next(
        self, session_id: str, owner: str, type_: str, frame: Callable[[int], str]
    ) -> SessionEvent:
        """Store an out-of-band event of a session (``frame(seq)`` builds its text),
        `OUT_OF_BAND_AHEAD` past its last stored one."""
        async with self._tx() as s:
            last = await s.scalar(
                select(func.max(SessionEventRow.seq)).where(
                    SessionEventRow.session_id == session_id
                )
            )
            row = SessionEventRow(
                session_id=session_id,
                seq=(last or 0) + OUT_OF_BAND_AHEAD,
                owner=owner,
                replica=self.replica_id,
                type=type_,
                frame="",
                created_at=utcnow(),
            )
            row.frame = frame(row.seq)
            s.add(row)
            await s.flush()
            if self.dialect == "postgresql":
                await s.execute(text(f"NOTIFY {EVENTS_CHANNEL}"))
            return _event(row)

    async def events_after(self, session_id: str, after: int = 0) -> list[SessionEvent]:
        """A session's stored events numbered above ``after``, in order."""
        query = (
            select(SessionEventRow)
            .where(SessionEventRow.session_id == session_id, SessionEventRow.seq > after)
            .order_by(SessionEventRow.seq)
        )
        async with self._tx() as s:
            return [_event(row) for row in (await s.scalars(query)).all()]

    async def events_since(self, after_id: int, limit: int = 1000) -> list[SessionEvent]:
        """Every session's events stored with an ``id`` above ``after_id``, by ``id``."""
        query = (
            select(SessionEventRow)
            .where(SessionEventRow.id > after_id)
            .order_by(SessionEventRow.id)
            .limit(limit)
        )
        async with self._tx() as s:
            return [_event(row) for row in (await s.scalars(query)).all()]

    async def last_event_id(self) -> int:
        async with self._tx() as s:
            return int(await s.scalar(select(func.max(SessionEventRow.id))) or 0)

    async def purge_events(self, older_than_s: float) -> int:
        """Forget events stored more than ``older_than_s`` ago."""
        since = utcnow() - timedelta(seconds=older_than_s)
        async with self._tx() as s:
            result = await s.execute(
                delete(SessionEventRow).where(SessionEventRow.created_at < since)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    @asynccontextmanager
    async def raw_connection(self) -> AsyncIterator[Any]:
        """A connection of the driver's own (asyncpg's, to LISTEN), closed afterwards."""
        async with self._require().connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                yield raw.driver_connection
            finally:
                # Never back to the pool with listeners on it.
                await conn.invalidate()
