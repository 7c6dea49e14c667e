"""Fixtures the unit tests share: the store on SQLite and on one real PostgreSQL server,
and the fake upstream servers of the remote engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fakes.ollama_server import FakeOllamaServer
from tests.fakes.openai_server import FakeOpenAIServer
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


@pytest.fixture(scope="module")
def openai_upstream() -> Iterator[FakeOpenAIServer]:
    """A real local server speaking OpenAI's API, for the openai engine (``reset()`` it)."""
    with FakeOpenAIServer() as running:
        yield running


@pytest.fixture(scope="module")
def ollama_upstream() -> Iterator[FakeOllamaServer]:
    """A real local server speaking Ollama's API, for the ollama engine (``reset()`` it)."""
    with FakeOllamaServer() as running:
        yield running
