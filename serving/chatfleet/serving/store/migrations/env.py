"""Alembic environment of the chatfleet store.

The store runs migrations through ``chatfleet.serving.store`` (``Store.upgrade``,
``chatfleet db upgrade``), which passes an open connection in
``config.attributes["connection"]``. Run directly (``alembic -x url=... upgrade
head`` with ``script_location`` pointing here), it connects to that URL itself.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from chatfleet.serving.store._models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("give the database URL: alembic -x url=postgresql+asyncpg://...")
    asyncio.run(_run_from_url(url))


_main()
