"""Recovery and session events in the store, on SQLite and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from chatfleet.serving.config import StoreConfig
from chatfleet.serving.store import Store
from chatfleet.serving.store._events import OUT_OF_BAND_AHEAD, NewEvent


@pytest.fixture
async def two(store_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two replicas over one database."""
    a, b = Store.from_url(store_url), Store.from_url(store_url)
    await a.start()
    await b.start()
    yield a, b
    await b.close()
    await a.close()


async def test_a_live_replicas_work_is_never_recovered(two: tuple[Store, Store]) -> None:
    a, b = two
    session = await a.create_session("hi", owner="x")
    await a.update_session(session.id, status="running")
    conversation = await a.create_conversation(owner="x")
    reply = await a.begin_assistant_message(conversation.id)

    recovered = await b.recover(lease_s=60)

    assert recovered.sessions == [] and recovered.messages == 0
    found = await b.get_session(session.id)
    assert found is not None and found.status == "running"
    assert (await b.messages(conversation.id))[0].status == "partial"
    assert reply.status == "partial"


async def test_a_lapsed_replicas_sessions_and_replies_are_interrupted(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    mine = await b.create_session("mine", owner="y")
    session = await a.create_session("hi", owner="x")
    await a.update_session(session.id, status="running", response="half an ans")
    done = await a.create_session("done", owner="x")
    await a.finish_session(done.id, "completed", response="all")
    conversation = await a.create_conversation(owner="x")
    reply = await a.begin_assistant_message(conversation.id)
    await a.update_message(reply.id, content="half a reply")
    await asyncio.sleep(0.3)
    await b.heartbeat()  # b stays live; a's lease (0.2 s) lapses

    recovered = await b.recover(lease_s=0.2)

    assert recovered.sessions == [(session.id, "x")]
    assert recovered.messages == 1
    found = await b.get_session(session.id)
    assert found is not None and found.status == "interrupted"
    assert found.response == "half an ans" and found.finished_at is not None
    assert found.error is not None and "interrupted" in found.error
    assert (await b.get_session(done.id)).status == "completed"  # type: ignore[union-attr]
    assert (await b.get_session(mine.id)).status == "pending"  # type: ignore[union-attr]
    [message] = await b.messages(conversation.id)
    assert message.status == "interrupted" and message.content == "half a reply"
    assert message.error is not None and message.error.startswith("incomplete")
    assert await b.live_replicas(lease_s=0.2) == [b.replica_id]
    assert (await b.recover(lease_s=0.2)).sessions == []  # once


async def test_events_are_numbered_per_session_and_read_back_in_order(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    start = await b.last_event_id()
    await a.add_events(
        [NewEvent("s1", seq, "x", "llm.response", f'{{"seq":{seq}}}') for seq in (1, 2, 3)]
    )
    await a.add_events([NewEvent("s2", 1, "y", "session.created", "{}")])
    late = await b.add_event_next("s1", "x", "session.cancelled", lambda seq: f'{{"seq":{seq}}}')

    # Out of band: ahead of what s1's replica may still write, so never a clash.
    assert late.seq == 3 + OUT_OF_BAND_AHEAD and late.frame == f'{{"seq":{late.seq}}}'
    await a.add_events([NewEvent("s1", 4, "x", "llm.response", "{}")])
    assert [e.seq for e in await b.events_after("s1", 1)] == [2, 3, 4, late.seq]
    since = await b.events_since(start)
    assert [(e.session_id, e.seq) for e in since] == [
        ("s1", 1),
        ("s1", 2),
        ("s1", 3),
        ("s2", 1),
        ("s1", late.seq),
        ("s1", 4),
    ]
    assert {e.replica for e in since[:4]} == {a.replica_id}
    assert await b.purge_events(older_than_s=3600) == 0


def test_a_lease_shorter_than_two_heartbeats_is_refused() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        StoreConfig(heartbeat_s=10, lease_s=15)


async def test_work_no_replica_owns_is_recovered_at_start_up_only(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    session = await a.create_session("from before 0005", owner="x")
    conversation = await a.create_conversation(owner="x")
    reply = await a.begin_assistant_message(conversation.id)
    async with a._tx() as s:  # as migration 0005 leaves rows from before it
        await s.execute(text("UPDATE sessions SET replica = NULL"))
        await s.execute(text("UPDATE messages SET replica = NULL"))

    later = await b.recover(lease_s=60)
    at_start = await b.recover(lease_s=60, unowned=True)

    assert later.sessions == [(session.id, "x")]  # sessions: always (few, by status)
    assert later.messages == 0 and at_start.messages == 1
    [message] = await b.messages(conversation.id)
    assert message.id == reply.id and message.status == "interrupted"
