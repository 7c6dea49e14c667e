"""The store against SQLite and a real PostgreSQL server (started in a temp dir)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

import chatfleet.serving.store as store_pkg
from chatfleet.serving.cli import main
from chatfleet.serving.config import StoreConfig
from chatfleet.serving.errors import Conflict, NotFound, StoreUnavailable
from chatfleet.serving.store import LOCAL_OWNER, Store, head_revision, resolve_url
from chatfleet.serving.store._models import Base


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = Store.from_url(store_url)
    await s.start()
    yield s
    await s.close()


def test_public_surface() -> None:
    assert set(store_pkg.__all__) == {
        "FINISHED_SESSION_STATUSES",
        "LOCAL_OWNER",
        "Conversation",
        "LogEntry",
        "MessageRole",
        "MessageStatus",
        "Session",
        "SessionStatus",
        "Store",
        "StoredMessage",
        "StoredResponse",
        "UsageEntry",
        "head_revision",
        "resolve_url",
    }


async def test_migrations_build_exactly_the_models(store: Store, store_url: str) -> None:
    assert await store.revision() == head_revision() == "0006"
    engine = create_async_engine(store_url)

    def diff(conn: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))

    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()
    assert await store.upgrade() == "0006"  # again: a no-op


async def test_conversation_messages_and_history(store: Store) -> None:
    conv = await store.create_conversation(owner="alice", title="greetings", model="fake")
    await store.add_user_message(conv.id, "hello")
    answer = await store.begin_assistant_message(conv.id, model="fake")
    assert answer.status == "partial"
    assert answer.content == ""
    await store.update_message(answer.id, content="hi the", thinking="hmm")
    done = await store.finish_message(
        answer.id,
        status="cancelled",
        content="hi there",
        thinking="hmm",
        prompt_tokens=5,
        completion_tokens=2,
    )
    assert (done.status, done.content, done.thinking) == ("cancelled", "hi there", "hmm")
    failed = await store.begin_assistant_message(conv.id)
    await store.finish_message(failed.id, status="failed", content="", error="boom")
    await store.append_message(conv.id, "user", "and then?")

    got = await store.get_conversation(conv.id)
    assert got is not None
    assert (got.title, got.model, got.message_count) == ("greetings", "fake", 4)
    assert got.created_at.tzinfo is not None
    assert [m.status for m in await store.messages(conv.id)] == [
        "complete",
        "cancelled",
        "failed",
        "complete",
    ]
    # The empty failed answer is left out of the prompt; the partial one stays.
    history = await store.history(conv.id)
    assert [(m.role, m.content) for m in history] == [
        ("user", "hello"),
        ("assistant", "hi there"),
        ("user", "and then?"),
    ]
    assert [m.content for m in await store.history(conv.id, limit=2)] == ["hi there", "and then?"]

    other = await store.create_conversation(owner="alice")
    await store.add_user_message(other.id, "newer")
    listed = await store.list_conversations()
    assert [c.id for c in listed] == [other.id, conv.id]
    assert [c.message_count for c in listed] == [1, 4]
    assert [c.id for c in await store.list_conversations(limit=1, offset=1)] == [conv.id]

    assert await store.delete_conversation(conv.id) is True
    assert await store.delete_conversation(conv.id) is False
    assert await store.get_conversation(conv.id) is None
    assert await store.messages(conv.id) == []
    with pytest.raises(NotFound):
        await store.add_user_message(conv.id, "too late")
    with pytest.raises(NotFound):
        await store.update_message(answer.id, content="x")


async def test_concurrent_writers(store: Store) -> None:
    conv = await store.create_conversation(owner="alice")
    await asyncio.gather(*(store.add_user_message(conv.id, f"m{i}") for i in range(20)))
    assert sorted(m.content for m in await store.messages(conv.id)) == sorted(
        f"m{i}" for i in range(20)
    )


async def test_everything_survives_a_restart(store_url: str) -> None:
    async with Store.from_url(store_url) as first:
        conv = await first.create_conversation(owner="alice")
        await first.add_user_message(conv.id, "remember me")
        await first.revoke("jti-1", time.time() + 60)
        await first.revoke("jti-expired", time.time() - 60)
        session = await first.create_session("background", owner="alice")
    async with Store.from_url(store_url) as second:
        assert [m.content for m in await second.history(conv.id)] == ["remember me"]
        assert await second.is_revoked("jti-1")
        assert not await second.is_revoked("jti-expired")  # purged on start
        got = await second.get_session(session.id)
        assert got is not None
        assert got.message == "background"


async def test_session_lifecycle(store: Store) -> None:
    first = await store.create_session("one", owner="alice", model="fake")
    assert (first.status, first.started_at, first.finished) == ("pending", None, False)
    running = await store.update_session(first.id, status="running")
    assert running.started_at is not None
    await store.update_session(first.id, thinking="let me see", response="The answ")
    done = await store.finish_session(
        first.id, "completed", response="The answer", prompt_tokens=3, completion_tokens=2
    )
    assert (done.status, done.thinking, done.response) == ("completed", "let me see", "The answer")
    assert done.finished
    assert done.finished_at is not None
    assert done.completion_tokens == 2
    with pytest.raises(Conflict, match="already completed"):
        await store.finish_session(first.id, "cancelled")
    with pytest.raises(NotFound):
        await store.finish_session("nope", "cancelled")
    with pytest.raises(NotFound):
        await store.update_session("nope", status="running")
    with pytest.raises(ValueError, match="not a final"):
        await store.finish_session(first.id, "running")

    second = await store.create_session("two", owner="alice")
    failed = await store.finish_session(second.id, "failed", error="engine crashed")
    assert failed.error == "engine crashed"
    assert [s.id for s in await store.list_sessions()] == [second.id, first.id]
    assert [s.id for s in await store.list_sessions(status="completed")] == [first.id]
    assert await store.get_session("nope") is None


async def test_logs(store: Store) -> None:
    await store.add_log("request", owner="alice", data={"path": "/v1/messages", "n": [1, 2]})
    await store.add_log(
        "engine.error", owner="alice", level="error", conversation_id="c1", data={"e": "x"}
    )
    await store.add_log("session.completed", owner="alice", session_id="s1")
    logs = await store.list_logs()
    assert [entry.event for entry in logs] == ["session.completed", "engine.error", "request"]
    assert logs[2].data == {"path": "/v1/messages", "n": [1, 2]}
    assert [e.event for e in await store.list_logs(level="error")] == ["engine.error"]
    assert [e.event for e in await store.list_logs(conversation_id="c1")] == ["engine.error"]
    assert [e.event for e in await store.list_logs(session_id="s1")] == ["session.completed"]
    assert await store.purge_logs(datetime.now(UTC) + timedelta(seconds=1)) == 3
    assert await store.list_logs() == []


async def test_revoked_tokens(store: Store) -> None:
    now = datetime.now(UTC)
    await store.revoke("old", now - timedelta(seconds=5))
    await store.revoke("new", (now + timedelta(hours=1)).timestamp())
    await store.revoke("new", now + timedelta(hours=1))  # idempotent
    assert await store.is_revoked("old")
    assert await store.is_revoked("new")
    assert not await store.is_revoked("other")
    assert await store.purge_expired() == 1
    assert not await store.is_revoked("old")
    assert await store.is_revoked("new")
    with pytest.raises(ValueError, match="naive"):
        await store.revoke("naive", datetime.now())


async def test_ping_and_lifecycle(tmp_path: object) -> None:
    s = Store(StoreConfig(data_dir=str(tmp_path)))
    assert not await s.ping()
    with pytest.raises(RuntimeError, match="not started"):
        await s.get_session("x")
    await s.start()
    await s.start()  # idempotent
    assert await s.ping()
    await s.close()
    assert not await s.ping()


async def test_unreachable_postgres_is_store_unavailable() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        store = Store.from_url(f"postgresql+asyncpg://nobody@127.0.0.1:{port}/none")
        with pytest.raises(StoreUnavailable, match=r"cannot open the store at postgresql"):
            await store.start()


def test_url_resolution(tmp_path: object) -> None:
    default = resolve_url(StoreConfig(), {"CHATFLEET_DATA_DIR": str(tmp_path)})
    assert default.drivername == "sqlite+aiosqlite"
    assert default.database == f"{tmp_path}/chatfleet.db"
    home = resolve_url(StoreConfig(), {})
    assert str(home.database).endswith(".local/share/chatfleet/chatfleet.db")
    assert resolve_url(StoreConfig(data_dir="/srv/x"), {}).database == "/srv/x/chatfleet.db"

    from_env = resolve_url(
        StoreConfig(url_env="DB_URL"), {"DB_URL": "postgresql://u:hunter2@db:5432/chat"}
    )
    assert from_env.drivername == "postgresql+asyncpg"
    with pytest.raises(ValueError, match="DB_URL"):
        resolve_url(StoreConfig(url_env="DB_URL"), {})
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        resolve_url(StoreConfig(url=SecretStr("mysql://u@h/d")), {})
    with pytest.raises(ValueError, match="not a valid database URL") as info:
        resolve_url(StoreConfig(url=SecretStr("::hunter2::")), {})
    assert "hunter2" not in str(info.value)
    masked = Store(StoreConfig(url=SecretStr("postgres://u:hunter2@db/chat")))
    assert "hunter2" not in masked.url
    assert masked.dialect == "postgresql"


async def test_cli_db_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "chatfleet.yaml"
    config.write_text(f"store:\n  data_dir: {tmp_path}/data\n")
    # main() runs its own event loop: keep it off this test's loop.
    rc = await asyncio.to_thread(main, ["db", "upgrade", "--config", str(config)])
    assert rc == 0
    assert "is at revision 0006" in capsys.readouterr().out
    assert (tmp_path / "data" / "chatfleet.db").is_file()
    missing = await asyncio.to_thread(
        main, ["db", "upgrade", "--config", str(tmp_path / "absent.yaml")]
    )
    assert missing == 2


async def test_each_client_finds_only_its_own(store: Store) -> None:
    alice = await store.create_conversation(owner="alice", title="alice's")
    bob = await store.create_conversation(owner="bob", title="my password is hunter2")
    assert [c.id for c in await store.list_conversations(owner="alice")] == [alice.id]
    assert {c.id for c in await store.list_conversations()} == {alice.id, bob.id}  # admins
    assert await store.get_conversation(bob.id, owner="alice") is None
    found = await store.get_conversation(bob.id)
    assert found is not None and found.owner == "bob"
    assert await store.delete_conversation(bob.id, owner="alice") is False
    assert await store.get_conversation(bob.id, owner="bob") is not None  # still there
    assert await store.delete_conversation(bob.id, owner="bob") is True

    mine = await store.create_session("mine", owner="alice")
    theirs = await store.create_session("theirs", owner="bob")
    assert [s.id for s in await store.list_sessions(owner="alice")] == [mine.id]
    assert [s.id for s in await store.list_sessions(owner="bob", status="pending")] == [theirs.id]
    assert await store.get_session(theirs.id, owner="alice") is None
    assert (await store.get_session(theirs.id)) == theirs

    await store.add_log("one", owner="alice")
    await store.add_log("two", owner="bob")
    assert [e.event for e in await store.list_logs(owner="bob")] == ["two"]
    assert [e.owner for e in await store.list_logs()] == ["bob", "alice"]


async def test_migration_0002_gives_earlier_rows_to_the_local_client(store_url: str) -> None:
    """A database written before owners existed: its rows go to `local`, none is lost."""
    engine = create_async_engine(store_url)
    try:
        await Store.from_url(store_url).upgrade("0001")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO conversations (id, title, created_at, updated_at)"
                    " VALUES ('c1', 'old', :t, :t)"
                ),
                {"t": datetime(2026, 11, 1, tzinfo=UTC)},
            )
            await conn.execute(
                text(
                    "INSERT INTO sessions (id, status, message, thinking, response,"
                    " created_at, updated_at) VALUES ('s1', 'completed', 'm', '', 'r', :t, :t)"
                ),
                {"t": datetime(2026, 11, 1, tzinfo=UTC)},
            )
    finally:
        await engine.dispose()
    async with Store.from_url(store_url) as store:  # migrates to head on start
        assert await store.revision() == "0006"
        conversation = await store.get_conversation("c1", owner=LOCAL_OWNER)
        assert conversation is not None and conversation.title == "old"
        session = await store.get_session("s1", owner=LOCAL_OWNER)
        assert session is not None and session.response == "r"
        assert await store.get_conversation("c1", owner="alice") is None
    # The default that filled the old rows is gone: a new row must name its owner.
    engine = create_async_engine(store_url)
    try:
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO conversations (id, created_at, updated_at)"
                        " VALUES ('c2', :t, :t)"
                    ),
                    {"t": datetime(2026, 12, 1, tzinfo=UTC)},
                )
    finally:
        await engine.dispose()


async def test_usage_adds_up_per_client_model_and_day(store: Store) -> None:
    day = datetime(2026, 12, 5, 10, tzinfo=UTC)
    await asyncio.gather(  # counted at once, as replicas do: no count is lost
        *(
            store.record_usage("alice", "fake", prompt_tokens=3, completion_tokens=5, at=day)
            for _ in range(20)
        )
    )
    await store.record_usage("alice", "big", prompt_tokens=1, completion_tokens=1, at=day)
    await store.record_usage("bob", "fake", prompt_tokens=7, completion_tokens=0, at=day)
    await store.record_usage(
        "alice", "fake", prompt_tokens=2, completion_tokens=2, at=day - timedelta(days=1)
    )
    mine = await store.usage(owner="alice")
    assert [
        (u.day.isoformat(), u.model, u.requests, u.prompt_tokens, u.completion_tokens) for u in mine
    ] == [
        ("2026-12-05", "big", 1, 1, 1),
        ("2026-12-05", "fake", 20, 60, 100),
        ("2026-12-04", "fake", 1, 2, 2),
    ]
    assert await store.tokens_on("alice", day.date()) == 162
    assert await store.tokens_on("bob", day.date()) == 7
    assert {u.owner for u in await store.usage()} == {"alice", "bob"}
    assert [u.owner for u in await store.usage(model="fake", since=day.date())] == [
        "alice",
        "bob",
    ]
    assert mine[0].to_dict()["total_tokens"] == 2


async def test_requests_are_counted_per_client_and_minute(store: Store) -> None:
    at = datetime(2026, 12, 5, 10, 0, 30, tzinfo=UTC)
    counts = await asyncio.gather(*(store.count_request("alice", at) for _ in range(10)))
    assert sorted(counts) == list(range(1, 11))
    assert await store.count_request("bob", at) == 1
    assert await store.count_request("alice", at + timedelta(seconds=40)) == 1  # next minute
