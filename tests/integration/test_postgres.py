"""Conversations and sessions on a real PostgreSQL server started in a temp dir."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from tests.fakes.app_server import serving, wait_for
from tests.fakes.chat_app import ChatApp, fake_model
from tests.fakes.postgres import MISSING_REASON, PostgresCluster, postgres_cluster
from tests.fakes.required import missing

from chatfleet.serving.store import Store, head_revision

MODELS = (
    fake_model("fake", reply_tokens=12),
    fake_model("slow", reply_tokens=2000, tokens_per_second=100),
)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    for cluster in postgres_cluster():
        if cluster is None:
            missing(MISSING_REASON)
        yield cluster


@pytest.fixture
async def database(pg_cluster: PostgresCluster) -> str:
    return await pg_cluster.new_database()


async def test_replicas_migrating_at_once(database: str) -> None:
    stores = [Store.from_url(database) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in stores))  # one migrates, the others wait
    try:
        assert {await s.revision() for s in stores} == {head_revision()}
    finally:
        for s in stores:
            await s.close()


async def test_history_and_revocations_survive_a_restart(database: str) -> None:
    first = ChatApp(Store.from_url(database), *MODELS)
    await first.start()
    async with first.http() as client:
        r = await client.post(
            "/v1/messages", json={"messages": [{"role": "user", "content": "Remember me"}]}
        )
        assert r.status_code == 200, r.text
        conversation_id = r.json()["conversation_id"]
        reply = r.json()["reply"]
    await first.store.revoke("token-1", time.time() + 600)
    await first.store.close()

    second = ChatApp(Store.from_url(database), *MODELS)
    await second.start()
    try:
        async with second.http() as client:
            r = await client.post(
                "/v1/messages",
                json={
                    "conversation_id": conversation_id,
                    "messages": [{"role": "user", "content": "Still there?"}],
                },
            )
            assert r.status_code == 200, r.text
            listed = (await client.get("/v1/conversations")).json()["data"]
        prompt = second.engines["fake"].requests[-1].messages
        assert [m.content for m in prompt] == ["Remember me", reply, "Still there?"]
        assert listed[0]["message_count"] == 4
        assert await second.store.is_revoked("token-1")
    finally:
        await second.store.close()


async def test_disconnect_mid_stream_is_stored_as_cancelled(database: str) -> None:
    chat = ChatApp(Store.from_url(database), *MODELS)
    async with serving(chat.app) as url, chat.http(url) as client:
        ready = await client.get("/ready")
        assert ready.json()["store"] == "ready"
        body = {
            "model": "slow",
            "stream": True,
            "messages": [{"role": "user", "content": "Go slowly"}],
        }
        async with client.stream("POST", "/v1/messages", json=body) as response:
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("event: text_chunk")
                if chunks == 5:
                    break

        async def cancelled() -> object:
            (conversation,) = await chat.store.list_conversations()
            messages = await chat.store.messages(conversation.id)
            return messages if messages[-1].status == "cancelled" else None

        user, answer = await wait_for(cancelled)
        assert user.content == "Go slowly"
        assert 0 < len(answer.content.split()) < 2000

        # A background session on the same server, cancelled halfway.
        session = (
            await client.post("/api/sessions", json={"message": "Go", "model": "slow"})
        ).json()

        async def running() -> bool:
            found = await chat.store.get_session(session["id"])
            return found is not None and found.status == "running"

        await wait_for(running)
        cancel = await client.post(f"/api/sessions/{session['id']}/cancel")
        assert cancel.json()["status"] == "cancelled"
        assert (await client.post(f"/api/sessions/{session['id']}/cancel")).status_code == 409
