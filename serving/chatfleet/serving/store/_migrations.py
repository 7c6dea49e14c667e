"""Alembic, run from code: the scripts ship inside the package, no alembic.ini needed."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from pathlib import Path
from typing import IO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Replicas starting together: one migrates, the others wait for it (PostgreSQL).
_ADVISORY_LOCK = 0x63686174666C74  # "chatflt"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged scripts, bound to ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision``, in one transaction; returns the new revision.

    Replicas that start together take turns: on PostgreSQL through an advisory lock,
    on a SQLite file through a lock file beside it (several ingress replicas of one
    node share the file); the ones after the first find the schema at head.
    """

    def run(connection: Connection) -> str | None:
        command.upgrade(alembic_config(connection), revision)
        return _current(connection)

    async with contextlib.AsyncExitStack() as stack:
        database = engine.url.database
        if engine.url.get_backend_name() == "sqlite" and database and database != ":memory:":
            lock = await asyncio.to_thread(_lock_file, Path(f"{database}.migrate.lock"))
            stack.callback(lock.close)  # closing the file releases the lock
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK}
                )
            return await conn.run_sync(run)
    raise AssertionError("unreachable")  # the block returns or raises


def _lock_file(path: Path) -> IO[bytes]:
    """``path`` opened and exclusively locked (waits for the holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("ab")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle
