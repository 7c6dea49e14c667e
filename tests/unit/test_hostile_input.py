"""Hostile input never reaches a 5xx, and a refused request stores nothing half-done.

The real app (through ``httpx.ASGITransport``) over SQLite and over a real PostgreSQL
started in a temp dir: the two stores once answered the same input differently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from tests.fakes.app_server import serving
from tests.fakes.chat_app import ChatApp, fake_model
from websockets.asyncio.client import connect

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.auth import Authenticator, MemoryRevocationStore
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.protocol import Classification, GenerationRequest
from chatfleet.serving.store import Store

JSON = {"content-type": "application/json"}
SECRET = "hostile-input-secret"
CLIENT = {"client_id": "app", "secret_sha256": hashlib.sha256(SECRET.encode()).hexdigest()}
MODELS = (
    fake_model("fake", reply_tokens=5),
    fake_model("dead", fail_after_tokens=0),
)


@pytest.fixture
async def chat(store_url: str) -> AsyncIterator[ChatApp]:
    app = ChatApp(Store.from_url(store_url), *MODELS)
    await app.start()
    yield app
    await app.store.close()


@pytest.fixture
async def client(chat: ChatApp) -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: a 500 is an answer to assert on, not a test crash.
    transport = httpx.ASGITransport(app=chat.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://chatfleet") as c:
        yield c


def error_of(response: httpx.Response, status: int, code: str = "invalid_request_error") -> Any:
    """The OpenAI-shaped error of a response; its status and code checked."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert sorted(error) == ["code", "message", "param", "type"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert isinstance(error["message"], str) and error["message"]
    return error


async def nothing_stored(store: Store) -> None:
    assert await store.list_conversations() == []
    assert await store.list_sessions() == []


def chat_body(*contents: object, **fields: object) -> bytes:
    """A JSON body whose user messages are given as JSON *source* (escapes kept as sent)."""
    messages = ",".join(f'{{"role":"user","content":{c}}}' for c in contents)
    extra = "".join(f',"{k}":{json.dumps(v)}' for k, v in fields.items())
    return f'{{"messages":[{messages}]{extra}}}'.encode()


# ---- 1. JSON nested too deeply --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b'{"client_id": "\xff"}'],
    ids=["nested-100000-deep", "not-utf-8"],
)
async def test_unparseable_json_is_a_400_on_every_route(raw: bytes) -> None:
    config = AppConfig(models=[fake_model()], auth={"clients": [CLIENT]})
    auth = Authenticator(config.auth, "k" * 48, MemoryRevocationStore())
    engines = {m.name: LocalEngineClient(FakeEngine(m)) for m in config.models}
    app = create_app(config, engines, metrics=Metrics(), auth=auth)
    token = auth.mint("app", ["chat", "admin"]).access_token
    posts = sorted(
        route.path
        for route in app.routes
        if isinstance(route, APIRoute) and "POST" in route.methods and "{" not in route.path
    )
    assert {"/auth/token", "/auth/validate", "/v1/chat/completions", "/v1/messages"} <= set(posts)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://cf") as client:
        for path in posts:
            r = await client.post(
                path, content=raw, headers={**JSON, "Authorization": f"Bearer {token}"}
            )
            error = error_of(r, 400)
            assert error["message"] == "request body is not valid JSON", path
        # The parser still reads what it should.
        good = {"client_id": "app", "client_secret": SECRET}
        assert (await client.post("/auth/token", json=good)).status_code == 200


async def test_unparseable_websocket_frames_get_an_error_frame(tmp_path: Path) -> None:
    chat = ChatApp(Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db"), *MODELS)
    nested = "[" * 60_000  # under websocket.max_message_bytes
    async with serving(chat.app) as url:
        ws_url = url.replace("http://", "ws://")
        async with connect(f"{ws_url}/ws/chat") as ws:
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            await ws.send(nested)
            assert json.loads(await ws.recv())["code"] == "invalid_frame"
            await ws.send(json.dumps({"type": "ping", "timestamp": 1}))
            assert json.loads(await ws.recv()) == {"type": "pong", "timestamp": 1}
        async with connect(f"{ws_url}/ws") as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            await ws.send(nested)
            assert json.loads(await ws.recv())["code"] == "invalid_frame"
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv())["type"] == "pong"


# ---- 2. and 3. text that cannot be stored: lone surrogates, NUL -------------------------

UNSTORABLE = {"lone-surrogate": r'"\ud800x"', "nul": r'"a\u0000b"'}


@pytest.mark.parametrize("text", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_unstorable_text_is_refused_and_nothing_is_stored(
    chat: ChatApp, client: httpx.AsyncClient, text: str
) -> None:
    part = f'[{{"type":"text","text":{text}}}]'
    refused = [
        ("/v1/chat/completions", chat_body(text, model="fake"), "messages.0.content"),
        ("/v1/chat/completions", chat_body(part, model="fake"), "messages.0.content"),
        ("/v1/messages", chat_body(text), "messages.0.content"),
        # Once stored a conversation with the first message and no reply.
        ("/v1/messages", chat_body('"Hello"', text), "messages.1.content"),
        ("/v1/messages", chat_body(text, stream=True), "messages.0.content"),
        ("/api/generate", f'{{"prompt":{text}}}'.encode(), "prompt"),
        ("/api/generate", f'{{"prompt":"hi","system":{text}}}'.encode(), "system"),
        ("/api/sessions", f'{{"message":{text}}}'.encode(), "message"),
        ("/api/alerts", f'{{"message":"hi","stop":["x",{text}]}}'.encode(), "stop"),
    ]
    for path, raw, param in refused:
        error = error_of(await client.post(path, content=raw, headers=JSON), 400)
        assert error["param"] == param, (path, error)
        assert "must" in error["message"], error
    await nothing_stored(chat.store)
    # The same texts as plain characters are fine.
    ok = await client.post("/v1/messages", json={"messages": [{"role": "user", "content": "ab"}]})
    assert ok.status_code == 200, ok.text


async def test_nul_in_ids_is_not_found_on_both_stores(
    chat: ChatApp, client: httpx.AsyncClient
) -> None:
    for r in (
        await client.get("/v1/conversations/a%00b"),
        await client.delete("/v1/conversations/a%00b"),
        await client.get("/api/sessions/a%00b"),
        await client.post("/api/sessions/a%00b/cancel"),
    ):
        error_of(r, 404, "not_found")
    r = await client.post(
        "/v1/messages", content=chat_body('"hi"', conversation_id="a\x00b"), headers=JSON
    )
    assert error_of(r, 400)["param"] == "conversation_id"
    await nothing_stored(chat.store)


async def test_text_from_elsewhere_is_stored_alike_on_both_stores(chat: ChatApp) -> None:
    """An engine's answer (or any caller of the store) with NUL or a lone surrogate.

    Neither can be stored as is on PostgreSQL (nor a surrogate on SQLite): both
    stores keep U+FFFD in their place rather than fail the write.
    """
    store = chat.store
    conversation = await store.create_conversation(owner="alice", title="t\x00itle")
    assert conversation.title == "t\ufffditle"
    message = await store.append_message(conversation.id, "assistant", "a\x00b\ud800c")
    await store.finish_message(
        message.id, status="failed", content="a\x00b", thinking="\udfff", error="e\x00"
    )
    (stored,) = await store.messages(conversation.id)
    assert (stored.content, stored.thinking, stored.error) == ("a\ufffdb", "\ufffd", "e\ufffd")
    session = await store.create_session("m\x00", owner="alice")
    finished = await store.finish_session(session.id, "completed", response="r\ud800")
    assert (finished.message, finished.response) == ("m\ufffd", "r\ufffd")
    await store.add_log("x\x00", owner="alice", data={"error": "a\x00b\ud800"})
    (log,) = await store.list_logs()
    assert log.event == "x\ufffd"
    assert await store.get_conversation("a\x00b") is None


# ---- 4. paging past any store --------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/conversations", "/api/sessions"])
async def test_offset_and_limit_are_bounded(
    chat: ChatApp, client: httpx.AsyncClient, path: str
) -> None:
    for query, param in [
        ("offset=9223372036854775808", "query.offset"),
        ("offset=9223372036854775807", "query.offset"),
        ("offset=1000000001", "query.offset"),
        ("offset=-1", "query.offset"),
        ("limit=9223372036854775808", "query.limit"),
        ("limit=501", "query.limit"),
        ("limit=0", "query.limit"),
    ]:
        error = error_of(await client.get(f"{path}?{query}"), 400)
        assert error["param"] == param, query
    r = await client.get(f"{path}?offset=1000000000&limit=500")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


async def test_seed_is_bounded(client: httpx.AsyncClient) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "seed": 2**64}
    error = error_of(await client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "seed"


# ---- 5. a failed request stores nothing half-done -------------------------------------


async def test_a_refused_turn_stores_nothing_and_a_failed_one_says_why(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def classify(prompt: str) -> Classification:
        return Classification(["coding", "chit-chat"], [0.9, 0.1])

    chat = ChatApp(
        Store.from_url(store_url),
        fake_model("general", reply_tokens=5),
        # Its limit is only known once the router has chosen it.
        ModelConfig(
            name="coder",
            engine="fake",
            fake={"reply_tokens": 5},
            defaults={"max_tokens": 20, "max_tokens_limit": 50},
        ),
        fake_model("dead", fail_after_tokens=0),
        classify=classify,
        classifier={},
        routing={"routes": [{"category": "coding", "model": "coder"}]},
    )
    await chat.start()
    transport = httpx.ASGITransport(app=chat.app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://chatfleet")
    store = chat.store
    try:

        def say(text: str, **fields: object) -> dict[str, object]:
            return {"messages": [{"role": "user", "content": text}], **fields}

        # Refused after the routing decision: a new conversation is not even created...
        r = await client.post("/v1/messages", json=say("Fix it", model="auto", max_tokens=100))
        assert error_of(r, 400)["param"] == "max_tokens"
        await nothing_stored(store)

        # ... and an existing one keeps exactly what it had.
        first = await client.post("/v1/messages", json=say("Fix it", model="auto"))
        assert first.status_code == 200, first.text
        conversation_id = first.json()["conversation_id"]
        for stream in (False, True):
            again = say("More", model="auto", max_tokens=100, conversation_id=conversation_id)
            r = await client.post("/v1/messages", json={**again, "stream": stream})
            assert error_of(r, 400)["param"] == "max_tokens"
        kept = [(m.role, m.status) for m in await store.messages(conversation_id)]
        assert kept == [("user", "complete"), ("assistant", "complete")]

        # The engine cannot start: the user's message and a failed reply saying why.
        r = await client.post("/v1/messages", json=say("Nothing", model="dead"))
        assert r.status_code == 502
        (dead, _) = await store.list_conversations()
        rows = [(m.role, m.status, m.content, m.error) for m in await store.messages(dead.id)]
        assert rows == [
            ("user", "complete", "Nothing", None),
            ("assistant", "failed", "", "fake engine failure after 0 tokens"),
        ]

        # A bug before the first token (not an engine error) is a 500, stored the same way.
        async def broken(self: FakeEngine, request: GenerationRequest) -> Any:
            raise RuntimeError("a bug")
            yield

        monkeypatch.setattr(type(chat.engines["general"]), "stream", broken)
        r = await client.post(
            "/v1/messages", json=say("Hello", model="general", conversation_id=conversation_id)
        )
        assert r.status_code == 500
        last_two = [(m.role, m.status, m.error) for m in await store.messages(conversation_id)][-2:]
        assert last_two == [
            ("user", "complete", None),
            ("assistant", "failed", "generation failed"),
        ]
    finally:
        await client.aclose()
        await store.close()
