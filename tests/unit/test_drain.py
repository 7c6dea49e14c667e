"""Draining the ingress (api._drain) on a real uvicorn server: readiness, refusals, and
every kind of stream ending with its terminal event."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.fakes.app_server import serving, wait_for
from tests.fakes.chat_app import ChatApp, fake_model
from tests.fakes.stream_ends import sse_events, ws_chat_frames
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chatfleet.serving.store import Store

SLOW = fake_model("slow", reply_tokens=400, tokens_per_second=20)
QUICK = fake_model("quick", reply_tokens=6, tokens_per_second=20)
#: One token, then 100 s of nothing: a stream the drain finds waiting on its engine.
STALLED = fake_model("stalled", reply_tokens=50, tokens_per_second=0.01)


@pytest.fixture
async def chat(tmp_path: Path) -> ChatApp:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    app = ChatApp(store, SLOW, QUICK, STALLED, server={"drain_timeout_s": 1.0})
    return app


async def _sse(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], started: asyncio.Event
) -> str:
    text = ""
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_text():
            text += chunk
            if text.count("\n\n") >= 4:  # past the opening events: tokens flow
                started.set()
    return text


async def test_a_drain_past_its_timeout_ends_every_stream_with_its_terminal_event(
    chat: ChatApp,
) -> None:
    gw = chat.app.state.gateway
    async with serving(chat.app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        started = [asyncio.Event() for _ in range(4)]
        sse_chat = asyncio.create_task(
            _sse(
                http,
                "/v1/chat/completions",
                {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
                started[0],
            )
        )
        sse_generate = asyncio.create_task(
            _sse(http, "/api/generate", {"model": "slow", "prompt": "Hi"}, started[1])
        )
        sse_messages = asyncio.create_task(
            _sse(
                http,
                "/v1/messages",
                {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
                started[2],
            )
        )
        ws_chat = asyncio.create_task(ws_chat_frames(url, started[3]))
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 30)
        async with (
            connect(url.replace("http", "ws") + "/ws/chat") as idle_ws,
            connect(url.replace("http", "ws") + "/ws") as subscriber,
        ):
            await idle_ws.recv()  # connection_ack: open before the drain
            await subscriber.recv()  # its greeting
            drain = asyncio.create_task(gw.drain.run())
            ready = await http.get("/ready")
            assert (ready.status_code, ready.json()["draining"]) == (503, True)
            assert (await http.get("/health")).json()["status"] == "draining"
            refused = await http.post(
                "/v1/chat/completions",
                json={"model": "quick", "messages": [{"role": "user", "content": "Hi"}]},
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            async with connect(url.replace("http", "ws") + "/ws/chat") as late:
                frame = json.loads(await late.recv())
                assert (frame["type"], frame["code"]) == ("error", "shutting_down")
                with pytest.raises(ConnectionClosed):
                    await late.recv()
                assert late.close_code == 1001
            await asyncio.wait_for(drain, 30)
            last = json.loads(await idle_ws.recv())
            assert (last["type"], last["code"]) == ("error", "shutting_down")
            with pytest.raises(ConnectionClosed):
                await idle_ws.recv()
            assert idle_ws.close_code == 1001
            # A /ws subscriber: an error event, then close 1001.
            frames = [json.loads(raw) async for raw in subscriber]
            assert (frames[-1]["type"], frames[-1]["code"]) == ("error", "shutting_down")
            assert subscriber.close_code == 1001

        openai_events = sse_events(await asyncio.wait_for(sse_chat, 30))
        assert openai_events[-1] == (None, "[DONE]")
        assert openai_events[-2][1]["error"]["code"] == "shutting_down"

        generate_events = sse_events(await asyncio.wait_for(sse_generate, 30))
        assert generate_events[-2][0] == "error"
        assert generate_events[-2][1]["error"]["code"] == "shutting_down"
        assert generate_events[-1][0] == "end_stream"
        assert generate_events[-1][1]["finish_reason"] == "interrupted"

        message_events = sse_events(await asyncio.wait_for(sse_messages, 30))
        assert message_events[-1][0] == "end_stream"
        assert message_events[-1][1]["finish_reason"] == "interrupted"
        stored = await chat.store.messages(message_events[0][1]["conversation_id"])
        assert stored[1].status == "interrupted"
        assert stored[1].content  # what was said before the drain stays

        frames, code = await asyncio.wait_for(ws_chat, 30)
        assert frames[-1]["type"] == "error"
        ended = [f for f in frames if f["type"] == "error" and f["code"] == "shutting_down"]
        assert ended and code == 1001
        assert gw.drain.streams == 0


async def test_streams_that_finish_within_the_timeout_complete_normally(
    tmp_path: Path,
) -> None:
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    chat = ChatApp(store, SLOW, QUICK, server={"drain_timeout_s": 30.0})
    gw = chat.app.state.gateway
    async with serving(chat.app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        started = asyncio.Event()
        body = {"model": "quick", "prompt": "Hi"}
        streams = [
            asyncio.create_task(_sse(http, "/api/generate", body, started)) for _ in range(3)
        ]
        await asyncio.wait_for(started.wait(), 30)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(gw.drain.run(), 30)
        # The drain ended when the streams did, not at its 30 s timeout.
        assert loop.time() - began < 25
        for stream in streams:
            events = sse_events(await stream)
            assert events[-1][0] == "end_stream"
            assert events[-1][1]["finish_reason"] in ("stop", "length")
            assert "error" not in [kind for kind, _ in events]


async def test_the_openai_client_sees_the_shutdown_as_an_error(chat: ChatApp) -> None:
    gw = chat.app.state.gateway
    async with serving(chat.app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = ""
        with pytest.raises(openai.APIError, match="shutting down"):
            async for chunk in stream:
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                if text.strip() and gw.drain._run is None:
                    asyncio.get_running_loop().create_task(gw.drain.run())
        assert text
        await wait_for(lambda: asyncio.sleep(0, gw.drain.streams == 0))
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model="quick", messages=[{"role": "user", "content": "Hi"}]
            )
        assert refused.value.status_code == 503


async def test_a_stream_waiting_on_its_engine_is_interrupted_at_the_deadline(
    chat: ChatApp,
) -> None:
    gw = chat.app.state.gateway
    async with serving(chat.app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        started = asyncio.Event()
        body = {"model": "stalled", "prompt": "Hi"}
        stream = asyncio.create_task(_sse(http, "/api/generate", body, started))
        await wait_for(lambda: asyncio.sleep(0, chat.engines["stalled"].active == 1))
        await asyncio.wait_for(gw.drain.run(), 30)
        # Ended long before the engine's next token (100 s away), and the engine stopped.
        events = sse_events(await asyncio.wait_for(stream, 30))
        assert [kind for kind, _ in events] == ["metadata", "text_chunk", "error", "end_stream"]
        assert events[-1][1]["finish_reason"] == "interrupted"
        assert len(chat.engines["stalled"].cancelled) == 1
        assert gw.drain.streams == 0
