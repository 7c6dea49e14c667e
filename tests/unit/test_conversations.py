"""``/v1/messages`` and ``/v1/conversations`` over a SQLite store (PostgreSQL: integration)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.fakes.app_server import serving, wait_for
from tests.fakes.chat_app import ChatApp, fake_model

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.config import AppConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.protocol import Classification
from chatfleet.serving.store import Store


def sqlite_store(folder: Path) -> Store:
    return Store.from_url(f"sqlite+aiosqlite:///{folder}/chat.db")


MODELS = (
    fake_model("fake", reply_tokens=12),
    fake_model("thinker", reply_tokens=6, thinking_tokens=4),
    fake_model("broken", reply_tokens=30, fail_after_tokens=20),
    fake_model("dead", fail_after_tokens=0),
    fake_model("slow", reply_tokens=2000, tokens_per_second=100),
)


@pytest.fixture
async def chat(tmp_path: Path) -> AsyncIterator[ChatApp]:
    app = ChatApp(sqlite_store(tmp_path), *MODELS)
    await app.start()
    yield app
    await app.store.close()


@pytest.fixture
async def client(chat: ChatApp) -> AsyncIterator[httpx.AsyncClient]:
    async with chat.http() as c:
        yield c


def say(text: str, **fields: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], **fields}


async def test_history_is_stored_and_prepended(chat: ChatApp, client: httpx.AsyncClient) -> None:
    first = await client.post("/v1/messages", json=say("Hello there"))
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model"] == "fake"
    assert len(body["reply"].split()) == 12
    assert body["usage"]["completion_tokens"] == 12
    conversation_id = body["conversation_id"]

    second = await client.post(
        "/v1/messages", json=say("And then?", conversation_id=conversation_id)
    )
    assert second.status_code == 200, second.text
    assert second.json()["conversation_id"] == conversation_id
    prompt = chat.engines["fake"].requests[-1].messages
    assert [(m.role, m.content) for m in prompt] == [
        ("user", "Hello there"),
        ("assistant", body["reply"]),
        ("user", "And then?"),
    ]

    got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
    assert got["title"] == "Hello there"
    assert got["message_count"] == 4
    assert [(m["role"], m["status"]) for m in got["messages"]] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert got["messages"][1]["completion_tokens"] == 12

    listed = (await client.get("/v1/conversations")).json()
    assert [c["id"] for c in listed["data"]] == [conversation_id]

    deleted = await client.delete(f"/v1/conversations/{conversation_id}")
    assert deleted.json() == {
        "id": conversation_id,
        "object": "conversation.deleted",
        "deleted": True,
    }
    for response in (
        await client.get(f"/v1/conversations/{conversation_id}"),
        await client.delete(f"/v1/conversations/{conversation_id}"),
        await client.post("/v1/messages", json=say("hi", conversation_id=conversation_id)),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


async def test_history_survives_a_restart(tmp_path: Path) -> None:
    first = ChatApp(sqlite_store(tmp_path))
    await first.start()
    async with first.http() as client:
        conversation_id = (await client.post("/v1/messages", json=say("Remember me"))).json()[
            "conversation_id"
        ]
    await first.store.close()

    second = ChatApp(sqlite_store(tmp_path))
    await second.start()
    try:
        async with second.http() as client:
            r = await client.post(
                "/v1/messages", json=say("Still?", conversation_id=conversation_id)
            )
        assert r.status_code == 200, r.text
        prompt = second.engines["fake"].requests[-1].messages
        assert prompt[0].content == "Remember me"
        assert len(prompt) == 3
    finally:
        await second.store.close()


async def test_thinking_is_stored_apart_and_streamed(
    chat: ChatApp, client: httpx.AsyncClient
) -> None:
    r = await client.post("/v1/messages", json=say("Think first", model="thinker", stream=True))
    assert r.status_code == 200
    events = [
        (block.split("\n")[0][7:], json.loads(block.split("\n")[1][6:]))
        for block in r.text.strip().split("\n\n")
    ]
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "metadata"
    assert kinds[-1] == "end_stream"
    assert "thinking_chunk" in kinds
    assert kinds.index("thinking_chunk") < kinds.index("text_chunk")
    conversation_id = events[0][1]["conversation_id"]
    thinking = "".join(d["text"] for k, d in events if k == "thinking_chunk")
    text = "".join(d["text"] for k, d in events if k == "text_chunk")
    stored = await chat.store.messages(conversation_id)
    assert (stored[1].status, stored[1].thinking, stored[1].content) == (
        "complete",
        thinking,
        text,
    )
    assert len(thinking.split()) == 4


async def test_engine_crash_keeps_the_partial_answer_as_failed(
    chat: ChatApp, client: httpx.AsyncClient
) -> None:
    r = await client.post("/v1/messages", json=say("Break", model="broken"))
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "engine_error"
    (conversation,) = await chat.store.list_conversations()
    user, answer = await chat.store.messages(conversation.id)
    assert (user.role, user.status, user.content) == ("user", "complete", "Break")
    assert (answer.status, len(answer.content.split())) == ("failed", 20)
    assert answer.error == "fake engine failure after 20 tokens"

    # Streaming: the same, reported as an `error` event.
    streamed = await client.post(
        "/v1/messages",
        json=say("Break again", model="broken", stream=True, conversation_id=conversation.id),
    )
    assert "event: error" in streamed.text
    last = (await chat.store.messages(conversation.id))[-1]
    assert (last.status, len(last.content.split())) == ("failed", 20)
    logs = await chat.store.list_logs(event="message.finished", level="warning")
    assert [entry.data["status"] for entry in logs if entry.data] == ["failed", "failed"]


async def test_failure_before_the_first_token(chat: ChatApp, client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json=say("Nothing", model="dead"))
    assert r.status_code == 502
    (conversation,) = await chat.store.list_conversations()
    messages = await chat.store.messages(conversation.id)
    assert [(m.role, m.status, m.content) for m in messages] == [
        ("user", "complete", "Nothing"),
        ("assistant", "failed", ""),
    ]
    assert [m.content for m in await chat.store.history(conversation.id)] == ["Nothing"]


async def test_bad_requests_store_nothing(chat: ChatApp, client: httpx.AsyncClient) -> None:
    unknown_model = await client.post("/v1/messages", json=say("x", model="nope"))
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"]["code"] == "model_not_found"
    too_long = await client.post("/v1/messages", json=say("x", max_tokens=10**9))
    assert too_long.status_code == 400
    empty = await client.post("/v1/messages", json={"messages": []})
    assert empty.status_code == 400
    auto = await client.post("/v1/messages", json=say("hi", model="auto"))
    assert auto.status_code == 404
    assert "no routing configured" in auto.json()["error"]["message"]
    assert await chat.store.list_conversations() == []


async def test_auto_model_routes_and_stores_the_chosen_model(tmp_path: Path) -> None:
    async def classify(prompt: str) -> Classification:
        return Classification(["coding", "chit-chat"], [0.9, 0.1])

    chat = ChatApp(
        sqlite_store(tmp_path),
        fake_model("general", reply_tokens=5),
        fake_model("coder", reply_tokens=7),
        classify=classify,
        classifier={},
        routing={"routes": [{"category": "coding", "model": "coder"}]},
    )
    await chat.start()
    try:
        async with chat.http() as client:
            r = await client.post("/v1/messages", json=say("Fix my code", model="auto"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model"], body["route"]["category"]) == ("coder", "coding")
        assert "x-chatfleet-route" in r.headers
        answer = (await chat.store.messages(body["conversation_id"]))[-1]
        assert (answer.model, answer.status) == ("coder", "complete")
    finally:
        await chat.store.close()


async def test_without_a_store_the_routes_say_so() -> None:
    config = AppConfig(models=[fake_model()], auth={"enabled": False})
    engine = LocalEngineClient(FakeEngine(config.models[0]))
    await engine.start()
    app = create_app(config, {"fake": engine})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chatfleet"
    ) as client:
        r = await client.post("/v1/messages", json=say("hi"))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"
        ready = (await client.get("/ready")).json()
        assert "store" not in ready


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_client_disconnect_stores_the_partial_answer_as_cancelled(
    tmp_path: Path, stream: bool
) -> None:
    chat = ChatApp(sqlite_store(tmp_path), *MODELS)
    engine = chat.engines["slow"]
    async with serving(chat.app) as url, chat.http(url) as client:
        assert (await client.get("/ready")).json()["store"] == "ready"
        if stream:
            async with client.stream(
                "POST", "/v1/messages", json=say("Go slowly", model="slow", stream=True)
            ) as response:
                chunks = 0
                async for line in response.aiter_lines():
                    chunks += line.startswith("event: text_chunk")
                    if chunks == 5:
                        break  # closing the response closes the connection
        else:
            request = asyncio.create_task(
                client.post("/v1/messages", json=say("Go slowly", model="slow"))
            )
            await wait_for(lambda: _produced(engine))
            await asyncio.sleep(0.3)
            request.cancel()  # httpx drops the connection
            with pytest.raises(asyncio.CancelledError):
                await request

        async def cancelled_answer() -> object:
            (conversation,) = await chat.store.list_conversations()
            messages = await chat.store.messages(conversation.id)
            return messages if messages[-1].status == "cancelled" else None

        user, answer = await wait_for(cancelled_answer)
        assert (user.status, user.content) == ("complete", "Go slowly")
        words = len(answer.content.split())
        assert 0 < words < 2000
        assert engine.cancelled  # the generation itself was stopped
        assert engine.active == 0


async def _produced(engine: FakeEngine) -> bool:
    return engine.active > 0
