"""Tool calls and results in stored conversations (``/v1/messages``), on SQLite and
PostgreSQL: the assistant's calls are kept, a tool's result goes in with its call id,
and the history the engine sees next has both."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.fakes.chat_app import ChatApp, fake_model
from tests.fakes.remote_engines import NeverReached
from tests.unit.test_api import sse_events
from tests.unit.test_tools import QUESTION, WEATHER

from chatfleet.serving.api import create_app
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.protocol import ToolCall
from chatfleet.serving.store import Store


@pytest.fixture
async def chat(store_url: str) -> AsyncIterator[ChatApp]:
    app = ChatApp(Store.from_url(store_url), fake_model("fake"))
    await app.start()
    yield app
    await app.store.close()


@pytest.fixture
async def client(chat: ChatApp) -> AsyncIterator[httpx.AsyncClient]:
    async with chat.http() as c:
        yield c


async def test_tool_calls_and_results_are_stored_and_prepended(
    chat: ChatApp, client: httpx.AsyncClient
) -> None:
    first = await client.post("/v1/messages", json={"messages": QUESTION, "tools": [WEATHER]})
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["reply"], body["finish_reason"]) == ("", "tool_calls")
    (call,) = body["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    conversation_id = body["conversation_id"]

    result = {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees"}
    second = await client.post(
        "/v1/messages",
        json={"conversation_id": conversation_id, "messages": [result], "tools": [WEATHER]},
    )
    assert second.status_code == 200, second.text
    assert second.json()["reply"] == "get_weather returned 18 degrees"
    prompt = chat.engines["fake"].requests[-1].messages
    assert [(m.role, m.content, m.tool_calls, m.tool_call_id) for m in prompt] == [
        ("user", QUESTION[0]["content"], (), None),
        (
            "assistant",
            "",
            (ToolCall(call["id"], "get_weather", call["function"]["arguments"]),),
            None,
        ),
        ("tool", "18 degrees", (), call["id"]),
    ]

    stored = (await client.get(f"/v1/conversations/{conversation_id}")).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"] == [call]
    assert stored[2]["tool_call_id"] == call["id"]
    assert "tool_calls" not in stored[3] and "tool_call_id" not in stored[0]


async def test_tool_calls_stream_as_their_own_events(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/messages", json={"messages": QUESTION, "tools": [WEATHER], "stream": True}
    )
    assert r.status_code == 200, r.text
    events = [(e, json.loads(d)) for e, d in sse_events(r.text)]
    pieces: list[dict[str, Any]] = [d for e, d in events if e == "tool_call_chunk"]
    assert pieces[0]["id"] and pieces[0]["function"]["name"] == "get_weather"
    assert all("id" not in p for p in pieces[1:]) and len(pieces) > 2
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert json.loads(arguments)["city"]
    assert events[-1][0] == "end_stream" and events[-1][1]["finish_reason"] == "tool_calls"
    conversation = events[0][1]["conversation_id"]
    stored = (await client.get(f"/v1/conversations/{conversation}")).json()["messages"]
    assert stored[-1]["tool_calls"][0]["function"]["arguments"] == arguments


async def test_a_transformers_model_refuses_tools_here_too(tmp_path: Path) -> None:
    config = AppConfig(
        models=[ModelConfig(name="smollm2", engine="transformers")], auth={"enabled": False}
    )
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    app = create_app(config, {"smollm2": NeverReached()}, store=store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chatfleet"
    ) as c:
        r = await c.post("/v1/messages", json={"messages": QUESTION, "tools": [WEATHER]})
    await store.close()
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools"
