"""Background sessions, each owned by the client that started it.

Reads take ``owner``: only that client's sessions are found (``None``: every
client's, for admins).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, select, true, update

from chatfleet.serving.errors import Conflict, NotFound
from chatfleet.serving.store._database import Database
from chatfleet.serving.store._models import SessionRow, utcnow
from chatfleet.serving.store._records import (
    FINISHED_SESSION_STATUSES,
    SESSION_STATUSES,
    Session,
    SessionStatus,
)


def _session(row: SessionRow) -> Session:
    return Session(
        id=row.id,
        owner=row.owner,
        status=row.status,  # type: ignore[arg-type]
        message=row.message,
        thinking=row.thinking,
        response=row.response,
        model=row.model,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
    )


def _owned_by(owner: str | None) -> ColumnElement[bool]:
    return true() if owner is None else SessionRow.owner == owner


class SessionStore(Database):
    replica_id: str

    async def create_session(
        self, message: str, *, owner: str, model: str | None = None
    ) -> Session:
        async with self._tx() as s:
            row = SessionRow(
                owner=owner,
                message=message,
                model=model,
                status="pending",
                replica=self.replica_id,
            )
            s.add(row)
            await s.flush()
            return _session(row)

    async def get_session(self, session_id: str, *, owner: str | None = None) -> Session | None:
        """The session, if it exists and ``owner`` (when given) owns it."""
        query = select(SessionRow).where(SessionRow.id == session_id, _owned_by(owner))
        async with self._tx() as s:
            row = await s.scalar(query)
            return _session(row) if row is not None else None

    async def list_sessions(
        self,
        *,
        owner: str | None = None,
        limit: int = 50,
        offset: int = 0,
        status: SessionStatus | None = None,
    ) -> list[Session]:
        """``owner``'s sessions (``None``: everyone's), newest first."""
        query = (
            select(SessionRow)
            .where(_owned_by(owner))
            .order_by(SessionRow.created_at.desc(), SessionRow.id)
        )
        if status is not None:
            query = query.where(SessionRow.status == status)
        async with self._tx() as s:
            rows = (await s.scalars(query.limit(limit).offset(offset))).all()
            return [_session(row) for row in rows]

    async def update_session(
        self,
        session_id: str,
        *,
        status: SessionStatus | None = None,
        thinking: str | None = None,
        response: str | None = None,
        model: str | None = None,
    ) -> Session:
        """Move a session along (``running``) or checkpoint its text. Raises `NotFound`."""
        if status is not None and status not in SESSION_STATUSES:
            raise ValueError(f"unknown session status {status!r}")
        async with self._tx() as s:
            row = await s.get(SessionRow, session_id)
            if row is None:
                raise NotFound(f"session {session_id!r} not found")
            now = utcnow()
            if status is not None:
                row.status = status
                if status == "running" and row.started_at is None:
                    row.started_at = now
            if thinking is not None:
                row.thinking = thinking
            if response is not None:
                row.response = response
            if model is not None:
                row.model = model
            row.updated_at = now
            await s.flush()
            return _session(row)

    async def finish_session(
        self,
        session_id: str,
        status: SessionStatus,
        *,
        thinking: str | None = None,
        response: str | None = None,
        error: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> Session:
        """End a session, once: raises `Conflict` if it had already finished."""
        if status not in FINISHED_SESSION_STATUSES:
            raise ValueError(f"{status!r} is not a final session status")
        now = utcnow()
        values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now}
        for key, value in (
            ("thinking", thinking),
            ("response", response),
            ("error", error),
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
        ):
            if value is not None:
                values[key] = value
        async with self._tx() as s:
            # One conditional UPDATE: two replicas can't both finish a session.
            result = await s.execute(
                update(SessionRow)
                .where(
                    SessionRow.id == session_id,
                    SessionRow.status.not_in(FINISHED_SESSION_STATUSES),
                )
                .values(**values)
            )
            row = await s.get(SessionRow, session_id, populate_existing=True)
            if row is None:
                raise NotFound(f"session {session_id!r} not found")
            if not result.rowcount:  # type: ignore[attr-defined]
                raise Conflict(f"session {session_id!r} already {row.status}")
            return _session(row)
