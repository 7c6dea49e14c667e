"""A request held while its model's replica starts: the client is told at once.

The engine client here yields `ModelLoading` as the handle client does when no replica
runs, then waits for ``replica_up`` (the replica coming up) before the first token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.fakes.app_server import serving, wait_for
from websockets.asyncio.client import connect

from chatfleet.serving.api import (
    LocalEngineClient,
    LocalRouterClient,
    Metrics,
    ModelLoading,
    create_app,
)
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.errors import ModelStarting
from chatfleet.serving.protocol import Chunk, Classification, GenerationRequest
from chatfleet.serving.routing import Router
from chatfleet.serving.store import Store

CHAT = {"model": "cold", "messages": [{"role": "user", "content": "Hello there"}]}


class _Cold(LocalEngineClient):
    """Says it is loading, then answers once ``replica_up`` is set (or ``fail`` raises)."""

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.replica_up = asyncio.Event()
        self.fail: Exception | None = None
        self.waiting = 0
        self.withdrawn = 0

    async def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        self.waiting += 1
        try:
            yield ModelLoading()
            await self.replica_up.wait()
        except BaseException:
            self.withdrawn += 1
            raise
        if self.fail is not None:
            raise self.fail
        async for batch in super().batches(request):
            yield batch


@pytest.fixture
async def cold() -> _Cold:
    client = _Cold(FakeEngine(ModelConfig(name="cold", engine="fake", fake={"reply_tokens": 5})))
    await client.start()
    return client


def _app(client: _Cold) -> Any:
    config = AppConfig(models=[client.engine.model], auth={"enabled": False})
    return create_app(config, {"cold": client}, metrics=Metrics())


async def test_sse_says_loading_before_the_answer_opens(cold: _Cold) -> None:
    async with serving(_app(cold)) as url, httpx.AsyncClient(timeout=30) as http:
        body = {**CHAT, "stream": True}
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = aiter(response.aiter_lines())
            # Read while the model is still starting: the notice cannot wait for it.
            assert await anext(lines) == ": loading model cold"
            assert not cold.replica_up.is_set()
            cold.replica_up.set()
            rest = [line async for line in lines if line]
    chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert rest[-1] == "data: [DONE]"


async def test_the_openai_client_skips_the_notice(cold: _Cold) -> None:
    cold.replica_up.set()
    async with serving(_app(cold)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
        stream = await client.chat.completions.create(
            model="cold", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
    assert text


async def test_generate_and_ws_chat_send_a_loading_event(cold: _Cold) -> None:
    async with serving(_app(cold)) as url, httpx.AsyncClient(timeout=30) as http:
        body = {"model": "cold", "prompt": "hi"}
        async with http.stream("POST", f"{url}/api/generate", json=body) as response:
            lines = aiter(response.aiter_lines())
            assert await anext(lines) == "event: loading"
            assert json.loads((await anext(lines)).removeprefix("data: ")) == {
                "model": "cold",
                "status": "loading",
            }
            cold.replica_up.set()
            events = [line async for line in lines if line.startswith("event: ")]
        assert events[0] == "event: metadata" and events[-1] == "event: end_stream"
        cold.replica_up.clear()
        async with connect(url.replace("http", "ws", 1) + "/ws/chat") as ws:
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            await ws.send(json.dumps({"type": "chat", "content": "hi", "model": "cold"}))
            loading = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (loading["type"], loading["model"]) == ("loading", "cold")
            cold.replica_up.set()
            types: list[str] = []
            while not types or types[-1] not in ("complete", "error"):
                types.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
    assert "token" in types and types[-1] == "complete", types


async def test_a_model_that_does_not_start_is_a_503_or_an_error_event(cold: _Cold) -> None:
    cold.fail = ModelStarting("model cold did not start within 2 s; retry in 5 s", retry_after=5)
    cold.replica_up.set()
    async with serving(_app(cold)) as url, httpx.AsyncClient(timeout=30) as http:
        refused = await http.post(f"{url}/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert refused.json()["error"] == {
            "message": "model cold did not start within 2 s; retry in 5 s",
            "type": "server_error",
            "param": None,
            "code": "model_starting",
        }
        # Streamed, the notice went out before the start failed: an error event follows.
        cold.replica_up.clear()
        body = {**CHAT, "stream": True}
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = aiter(response.aiter_lines())
            assert await anext(lines) == ": loading model cold"
            cold.replica_up.set()
            rest = [line async for line in lines if line]
        assert json.loads(rest[0].removeprefix("data: "))["error"]["code"] == "model_starting"
        assert rest[-1] == "data: [DONE]"
        cold.replica_up.clear()
        async with http.stream("POST", f"{url}/api/generate", json={"prompt": "hi"}) as response:
            lines = aiter(response.aiter_lines())
            assert await anext(lines) == "event: loading"
            cold.replica_up.set()
            events = [line async for line in lines if line.startswith("event")]
        assert events == ["event: error", "event: end_stream"]


async def test_a_client_that_leaves_while_held_withdraws_its_request(cold: _Cold) -> None:
    async with serving(_app(cold)) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            body = {**CHAT, "stream": True}
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert await anext(aiter(response.aiter_lines())) == ": loading model cold"
        # The client is gone before the model started: nothing keeps waiting for it.
        await wait_for(lambda: _true(cold.withdrawn == 1))
    assert cold.waiting == 1


async def _true(value: bool) -> bool:
    return value


async def test_a_session_tells_its_subscribers_the_model_is_loading(
    cold: _Cold, tmp_path: Path
) -> None:
    config = AppConfig(models=[cold.engine.model], auth={"enabled": False})
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    app = create_app(config, {"cold": cold}, metrics=Metrics(), store=store)
    async with (
        serving(app) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        connect(url.replace("http", "ws", 1) + "/ws") as ws,
    ):
        assert json.loads(await ws.recv())["type"] == "connected"
        created = await http.post("/api/sessions", json={"message": "Go", "model": "cold"})
        assert created.status_code == 202, created.text
        kinds: list[str] = []
        async with asyncio.timeout(20):
            while "llm.loading" not in kinds:
                event = json.loads(await ws.recv())
                kinds.append(event["type"])
            assert (event["model"], event["data"]) == ("cold", {"model": "cold"})
            assert not cold.replica_up.is_set()  # told while the model still starts
            cold.replica_up.set()
            while kinds[-1] != "session.completed":
                kinds.append(json.loads(await ws.recv())["type"])
    assert kinds[:2] == ["session.created", "llm.loading"]
    assert "llm.response" in kinds


async def test_select_sends_a_loading_event_before_its_metadata(cold: _Cold) -> None:
    config = AppConfig.model_validate(
        {
            "models": [cold.engine.model],
            "classifier": {},
            "auth": {"enabled": False},
            "routing": {"routes": [{"category": "chit-chat", "model": "cold"}]},
        }
    )

    async def classify(prompt: str) -> Classification:
        return Classification(["chit-chat"], [1.0])

    router = LocalRouterClient(Router(config, classify))
    app = create_app(config, {"cold": cold}, router=router, metrics=Metrics())
    async with serving(app) as url, httpx.AsyncClient(timeout=30) as http:
        body = {"prompt": "hi"}
        async with http.stream("POST", f"{url}/api/models/select", json=body) as response:
            lines = aiter(response.aiter_lines())
            assert await anext(lines) == "event: loading"
            cold.replica_up.set()
            events = [line async for line in lines if line.startswith("event: ")]
    assert events[0] == "event: metadata" and events[-1] == "event: end_stream"
