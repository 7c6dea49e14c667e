"""Fixtures the unit tests share: the store on SQLite and on one real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fakes.postgres import MISSING_REASON, PostgresCluster, postgres_cluster
from tests.fakes.required import missing


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster | None]:
    """One PostgreSQL server for the whole session; each test takes its own database."""
    yield from postgres_cluster()


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/store.db"
    cluster: PostgresCluster | None = request.getfixturevalue("pg_cluster")
    if cluster is None:
        missing(MISSING_REASON)
    return await cluster.new_database()
