"""The event log: what happened to conversations and sessions, by whom."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select

from chatfleet.serving.store._database import Database, when
from chatfleet.serving.store._models import LogRow
from chatfleet.serving.store._records import LogEntry


def _log(row: LogRow) -> LogEntry:
    return LogEntry(
        id=row.id,
        owner=row.owner,
        created_at=row.created_at,
        level=row.level,
        event=row.event,
        conversation_id=row.conversation_id,
        session_id=row.session_id,
        data=row.data,
    )


class LogStore(Database):
    async def add_log(
        self,
        event: str,
        *,
        owner: str,
        level: str = "info",
        conversation_id: str | None = None,
        session_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> LogEntry:
        async with self._tx() as s:
            row = LogRow(
                owner=owner,
                event=event,
                level=level,
                conversation_id=conversation_id,
                session_id=session_id,
                data=data,
            )
            s.add(row)
            await s.flush()
            return _log(row)

    async def list_logs(
        self,
        *,
        owner: str | None = None,
        limit: int = 100,
        event: str | None = None,
        level: str | None = None,
        conversation_id: str | None = None,
        session_id: str | None = None,
    ) -> list[LogEntry]:
        """Newest first, optionally filtered (``owner``: that client's entries only)."""
        query = select(LogRow).order_by(LogRow.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(LogRow.owner == owner)
        if event is not None:
            query = query.where(LogRow.event == event)
        if level is not None:
            query = query.where(LogRow.level == level)
        if conversation_id is not None:
            query = query.where(LogRow.conversation_id == conversation_id)
        if session_id is not None:
            query = query.where(LogRow.session_id == session_id)
        async with self._tx() as s:
            return [_log(row) for row in (await s.scalars(query)).all()]

    async def purge_logs(self, before: datetime) -> int:
        """Delete log entries older than ``before``; returns how many."""
        async with self._tx() as s:
            result = await s.execute(delete(LogRow).where(LogRow.created_at < when(before)))
            return int(result.rowcount)  # type: ignore[attr-defined]
