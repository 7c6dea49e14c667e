"""`Store`: conversations, sessions, logs and revoked tokens behind typed async methods."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from sqlalchemy import delete, event, func, select, text, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from chatfleet.serving.config import StoreConfig
from chatfleet.serving.errors import Conflict, NotFound, StoreUnavailable
from chatfleet.serving.store import _migrations
from chatfleet.serving.store._models import (
    ConversationRow,
    LogRow,
    MessageRow,
    RevokedTokenRow,
    SessionRow,
    utcnow,
)
from chatfleet.serving.store._records import (
    FINISHED_SESSION_STATUSES,
    MESSAGE_STATUSES,
    SESSION_STATUSES,
    Conversation,
    LogEntry,
    MessageRole,
    MessageStatus,
    Session,
    SessionStatus,
    StoredMessage,
)
from chatfleet.serving.store._url import is_memory, resolve_url

logger = logging.getLogger(__name__)

_PING_TIMEOUT_S = 5.0


def _when(value: datetime | float) -> datetime:
    """A datetime, or seconds since the epoch (a JWT ``exp``), as aware UTC."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: give a timezone-aware one")
        return value.astimezone(UTC)
    return datetime.fromtimestamp(value, UTC)


def _reason(exc: BaseException) -> str:
    return str(exc.orig if isinstance(exc, DBAPIError) else exc)


def _conversation(row: ConversationRow, count: int = 0) -> Conversation:
    return Conversation(
        id=row.id,
        title=row.title,
        model=row.model,
        created_at=row.created_at,
        updated_at=row.updated_at,
        message_count=count,
    )


def _message(row: MessageRow) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        conversation_id=row.conversation_id,
        role=row.role,  # type: ignore[arg-type]
        content=row.content,
        status=row.status,  # type: ignore[arg-type]
        created_at=row.created_at,
        updated_at=row.updated_at,
        thinking=row.thinking,
        model=row.model,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        error=row.error,
    )


def _session(row: SessionRow) -> Session:
    return Session(
        id=row.id,
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


def _log(row: LogRow) -> LogEntry:
    return LogEntry(
        id=row.id,
        created_at=row.created_at,
        level=row.level,
        event=row.event,
        conversation_id=row.conversation_id,
        session_id=row.session_id,
        data=row.data,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Cascading deletes need foreign keys on; WAL lets readers and one writer overlap.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """The ingress's database: SQLite by default, PostgreSQL in a cluster.

    Build it from a `StoreConfig`, ``await start()`` (migrates when
    ``migrate_on_start``), use it, ``await close()``. Methods return frozen
    records (`Conversation`, `StoredMessage`, `Session`, `LogEntry`); ``get_*``
    return ``None`` for unknown ids, updates raise `NotFound`. A database that
    can't be reached raises `StoreUnavailable`.
    """

    def __init__(
        self, config: StoreConfig | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self.config = config or StoreConfig()
        self._url: URL = resolve_url(self.config, environ)
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @classmethod
    def from_url(cls, url: str, **fields: Any) -> Store:
        return cls(StoreConfig(url=url, **fields))

    @property
    def url(self) -> str:
        """The database URL with any password masked (safe to log)."""
        return self._url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self._url.get_backend_name()

    @property
    def history_limit(self) -> int:
        return self.config.history_limit

    # ---- lifecycle ---------------------------------------------------------------

    def _create_engine(self) -> AsyncEngine:
        url = self._url
        if url.get_backend_name() == "sqlite":
            if is_memory(url):
                engine = create_async_engine(url, poolclass=StaticPool)
            else:
                assert url.database is not None
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
                engine = create_async_engine(url)
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            return engine
        return create_async_engine(
            url,
            pool_size=self.config.pool_size,
            max_overflow=self.config.pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
        )

    @property
    def started(self) -> bool:
        return self._engine is not None

    async def start(self) -> None:
        """Connect, and apply migrations when the config says so. Idempotent."""
        if self._engine is not None:
            return
        engine = self._create_engine()
        try:
            if self.config.migrate_on_start:
                revision = await _migrations.upgrade(engine)
                logger.info("store %s at migration %s", self.url, revision)
        except (DBAPIError, OSError) as exc:
            await engine.dispose()
            raise StoreUnavailable(f"cannot open the store at {self.url}: {_reason(exc)}") from exc
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            purged = await self.purge_expired()
        except Exception:  # housekeeping only: never a reason not to start
            logger.warning("could not purge expired token revocations", exc_info=True)
        else:
            if purged:
                logger.info("purged %d expired token revocations", purged)

    async def close(self) -> None:
        engine, self._engine, self._sessions = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def upgrade(self, revision: str = "head") -> str | None:
        """Apply migrations (``chatfleet db upgrade``); returns the resulting revision."""
        engine = self._engine or self._create_engine()
        try:
            return await _migrations.upgrade(engine, revision)
        except (DBAPIError, OSError) as exc:
            raise StoreUnavailable(
                f"cannot migrate the store at {self.url}: {_reason(exc)}"
            ) from exc
        finally:
            if engine is not self._engine:
                await engine.dispose()

    async def revision(self) -> str | None:
        """The migration the database is at (``None``: not migrated)."""
        return await _migrations.current_revision(self._require())

    async def ping(self) -> bool:
        """Whether the database answers (for ``/ready``); never raises."""
        if self._engine is None:
            return False
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S), self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            logger.warning("store %s does not answer", self.url, exc_info=True)
            return False
        return True

    def _require(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the store is not started: await store.start() first")
        return self._engine

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        """One transaction: committed on success, rolled back on error."""
        self._require()
        assert self._sessions is not None
        try:
            async with self._sessions() as session, session.begin():
                yield session
        except IntegrityError:
            raise
        except OSError as exc:  # asyncpg's connect errors are not wrapped
            raise StoreUnavailable("the database is unreachable") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc.orig, OSError):
                raise StoreUnavailable("the database is unreachable") from exc
            raise

    # ---- conversations -----------------------------------------------------------

    async def create_conversation(
        self, *, title: str | None = None, model: str | None = None
    ) -> Conversation:
        async with self._tx() as s:
            row = ConversationRow(title=title[:200] if title else None, model=model)
            s.add(row)
            await s.flush()
            return _conversation(row)

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        async with self._tx() as s:
            row = await s.get(ConversationRow, conversation_id)
            if row is None:
                return None
            count = await s.scalar(
                select(func.count())
                .select_from(MessageRow)
                .where(MessageRow.conversation_id == conversation_id)
            )
            return _conversation(row, count or 0)

    async def list_conversations(self, *, limit: int = 50, offset: int = 0) -> list[Conversation]:
        """Most recently active first, with their message counts."""
        counts = (
            select(MessageRow.conversation_id, func.count().label("n"))
            .group_by(MessageRow.conversation_id)
            .subquery()
        )
        query = (
            select(ConversationRow, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.conversation_id == ConversationRow.id)
            .order_by(ConversationRow.updated_at.desc(), ConversationRow.id)
            .limit(limit)
            .offset(offset)
        )
        async with self._tx() as s:
            return [_conversation(row, n) for row, n in (await s.execute(query)).all()]

    async def delete_conversation(self, conversation_id: str) -> bool:
        """Delete a conversation and its messages; ``False`` if there was none."""
        async with self._tx() as s:
            await s.execute(delete(MessageRow).where(MessageRow.conversation_id == conversation_id))
            result = await s.execute(
                delete(ConversationRow).where(ConversationRow.id == conversation_id)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def messages(self, conversation_id: str) -> list[StoredMessage]:
        """Every message of a conversation, oldest first."""
        query = (
            select(MessageRow)
            .where(MessageRow.conversation_id == conversation_id)
            .order_by(MessageRow.id)
        )
        async with self._tx() as s:
            return [_message(row) for row in (await s.scalars(query)).all()]

    async def history(self, conversation_id: str, limit: int | None = None) -> list[StoredMessage]:
        """The last ``limit`` messages worth prepending to a prompt, oldest first.

        That is every message with text, whatever its status: the partial answer
        of a cancelled or failed generation was said, so it stays in the history.
        Empty answers (a failure before the first token) are left out.
        """
        limit = limit or self.config.history_limit
        query = (
            select(MessageRow)
            .where(MessageRow.conversation_id == conversation_id, MessageRow.content != "")
            .order_by(MessageRow.id.desc())
            .limit(limit)
        )
        async with self._tx() as s:
            rows = (await s.scalars(query)).all()
        return [_message(row) for row in reversed(rows)]

    async def append_message(
        self,
        conversation_id: str,
        role: MessageRole,
        content: str,
        *,
        status: MessageStatus = "complete",
        thinking: str | None = None,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error: str | None = None,
    ) -> StoredMessage:
        """Add a message, committed when this returns. Raises `NotFound`."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        now = utcnow()
        try:
            async with self._tx() as s:
                conversation = await s.get(ConversationRow, conversation_id)
                if conversation is None:
                    raise NotFound(f"conversation {conversation_id!r} not found")
                conversation.updated_at = now
                row = MessageRow(
                    conversation_id=conversation_id,
                    role=role,
                    content=content,
                    thinking=thinking,
                    status=status,
                    model=model,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    error=error,
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                await s.flush()
                return _message(row)
        except IntegrityError as exc:  # deleted meanwhile
            raise NotFound(f"conversation {conversation_id!r} not found") from exc

    async def add_user_message(self, conversation_id: str, content: str) -> StoredMessage:
        return await self.append_message(conversation_id, "user", content)

    async def begin_assistant_message(
        self, conversation_id: str, *, model: str | None = None
    ) -> StoredMessage:
        """An empty assistant message in status ``partial``, to fill as the answer streams."""
        return await self.append_message(
            conversation_id, "assistant", "", status="partial", model=model
        )

    async def add_turn(
        self,
        conversation_id: str,
        messages: Sequence[tuple[MessageRole, str]],
        *,
        create: bool = False,
        title: str | None = None,
        conversation_model: str | None = None,
        model: str | None = None,
        error: str | None = None,
    ) -> StoredMessage:
        """One turn, all of it or nothing: the new ``messages``, then the assistant's reply.

        The reply is returned: empty and ``partial`` (to fill as the answer streams,
        as `begin_assistant_message`'s), or ``failed`` with ``error`` saying why no
        answer came. With ``create``, the conversation is created under
        ``conversation_id`` (with ``title`` and ``conversation_model``); otherwise it
        must exist (`NotFound`).
        """
        now = utcnow()
        try:
            async with self._tx() as s:
                if create:
                    conversation = ConversationRow(
                        id=conversation_id,
                        title=title[:200] if title else None,
                        model=conversation_model,
                        created_at=now,
                        updated_at=now,
                    )
                    s.add(conversation)
                else:
                    found = await s.get(ConversationRow, conversation_id)
                    if found is None:
                        raise NotFound(f"conversation {conversation_id!r} not found")
                    found.updated_at = now
                rows = [
                    MessageRow(
                        conversation_id=conversation_id,
                        role=role,
                        content=content,
                        status="complete",
                        created_at=now,
                        updated_at=now,
                    )
                    for role, content in messages
                ]
                reply = MessageRow(
                    conversation_id=conversation_id,
                    role="assistant",
                    content="",
                    status="partial" if error is None else "failed",
                    model=model,
                    error=error,
                    created_at=now,
                    updated_at=now,
                )
                for row in [*rows, reply]:
                    s.add(row)
                    await s.flush()  # one at a time: ids follow the conversation's order
                return _message(reply)
        except IntegrityError as exc:
            if create:
                raise Conflict(f"conversation {conversation_id!r} already exists") from exc
            raise NotFound(f"conversation {conversation_id!r} not found") from exc  # deleted

    async def update_message(
        self, message_id: int, *, content: str, thinking: str | None = None
    ) -> None:
        """Checkpoint the text of a message being written."""
        async with self._tx() as s:
            result = await s.execute(
                update(MessageRow)
                .where(MessageRow.id == message_id)
                .values(content=content, thinking=thinking or None, updated_at=utcnow())
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"message {message_id} not found")

    async def finish_message(
        self,
        message_id: int,
        *,
        status: MessageStatus,
        content: str,
        thinking: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        error: str | None = None,
    ) -> StoredMessage:
        """Store a message's final text and status (complete, cancelled or failed)."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        async with self._tx() as s:
            row = await s.get(MessageRow, message_id)
            if row is None:
                raise NotFound(f"message {message_id} not found")
            row.status = status
            row.content = content
            row.thinking = thinking or None
            row.prompt_tokens = prompt_tokens
            row.completion_tokens = completion_tokens
            row.error = error
            row.updated_at = utcnow()
            await s.flush()
            return _message(row)

    # ---- sessions ------------------------------------------------------------------

    async def create_session(self, message: str, *, model: str | None = None) -> Session:
        async with self._tx() as s:
            row = SessionRow(message=message, model=model, status="pending")
            s.add(row)
            await s.flush()
            return _session(row)

    async def get_session(self, session_id: str) -> Session | None:
        async with self._tx() as s:
            row = await s.get(SessionRow, session_id)
            return _session(row) if row is not None else None

    async def list_sessions(
        self, *, limit: int = 50, offset: int = 0, status: SessionStatus | None = None
    ) -> list[Session]:
        """Newest first."""
        query = select(SessionRow).order_by(SessionRow.created_at.desc(), SessionRow.id)
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

    # ---- logs ----------------------------------------------------------------------

    async def add_log(
        self,
        event: str,
        *,
        level: str = "info",
        conversation_id: str | None = None,
        session_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> LogEntry:
        async with self._tx() as s:
            row = LogRow(
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
        limit: int = 100,
        event: str | None = None,
        level: str | None = None,
        conversation_id: str | None = None,
        session_id: str | None = None,
    ) -> list[LogEntry]:
        """Newest first, optionally filtered."""
        query = select(LogRow).order_by(LogRow.id.desc()).limit(limit)
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
            result = await s.execute(delete(LogRow).where(LogRow.created_at < _when(before)))
            return int(result.rowcount)  # type: ignore[attr-defined]

    # ---- revoked tokens ------------------------------------------------------------

    async def revoke(self, jti: str, expires_at: datetime | float) -> None:
        """Remember a token id as revoked until it expires. Idempotent.

        ``expires_at`` is an aware datetime or seconds since the epoch (the
        token's ``exp`` claim).
        """
        expires = _when(expires_at)
        try:
            async with self._tx() as s:
                if await s.get(RevokedTokenRow, jti) is None:
                    s.add(RevokedTokenRow(jti=jti, expires_at=expires))
        except IntegrityError:
            pass  # revoked concurrently: the outcome is the same

    async def is_revoked(self, jti: str) -> bool:
        async with self._tx() as s:
            found = await s.scalar(select(RevokedTokenRow.jti).where(RevokedTokenRow.jti == jti))
            return found is not None

    async def purge_expired(self, now: datetime | float | None = None) -> int:
        """Forget revocations of tokens that have expired anyway; returns how many."""
        cutoff = _when(now) if now is not None else utcnow()
        async with self._tx() as s:
            result = await s.execute(
                delete(RevokedTokenRow).where(RevokedTokenRow.expires_at <= cutoff)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]
