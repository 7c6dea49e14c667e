"""`Database`: the engine, its lifecycle and one transaction at a time; the aggregates
(`_conversations`, `_sessions`, `_logs`, `_tokens`) build on it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from sqlalchemy import event, text
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
from chatfleet.serving.errors import StoreUnavailable
from chatfleet.serving.store import _migrations
from chatfleet.serving.store._url import is_memory, resolve_url

logger = logging.getLogger(__name__)

_PING_TIMEOUT_S = 5.0


def when(value: datetime | float) -> datetime:
    """A datetime, or seconds since the epoch (a JWT ``exp``), as aware UTC."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: give a timezone-aware one")
        return value.astimezone(UTC)
    return datetime.fromtimestamp(value, UTC)


def _reason(exc: BaseException) -> str:
    return str(exc.orig if isinstance(exc, DBAPIError) else exc)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Cascading deletes need foreign keys on; WAL lets readers and one writer overlap.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Database:
    """An async SQLAlchemy engine over SQLite or PostgreSQL, migrated by Alembic."""

    def __init__(
        self, config: StoreConfig | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self.config = config or StoreConfig()
        self._url: URL = resolve_url(self.config, environ)
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @classmethod
    def from_url(cls, url: str, **fields: Any) -> Self:
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
