"""A Responses stream held while its model's replica starts (scaled to zero): the loading
comment comes at once, the official ``openai`` client iterates the events as if it were
not there, the turn is stored once the answer opens, and a model that does not start
ends the stream with ``error`` and ``response.failed`` events (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from tests.fakes.app_server import serving, wait_for
from tests.unit.test_loading import _Cold

from chatfleet.serving.api import Metrics, create_app
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.errors import ModelStarting
from chatfleet.serving.store import Store

BODY = {"model": "cold", "input": "Hello there", "stream": True}


@pytest.fixture
async def cold() -> _Cold:
    client = _Cold(FakeEngine(ModelConfig(name="cold", engine="fake", fake={"reply_tokens": 5})))
    await client.start()
    return client


@pytest.fixture
async def url(cold: _Cold, store_url: str) -> AsyncIterator[str]:
    config = AppConfig(models=[cold.engine.model], auth={"enabled": False})
    app = create_app(config, {"cold": cold}, metrics=Metrics(), store=Store.from_url(store_url))
    async with serving(app) as served:
        yield served


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]


async def test_the_stream_says_loading_before_the_answer_opens(cold: _Cold, url: str) -> None:
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/responses", json=BODY) as response,
    ):
        assert response.status_code == 200
        lines = aiter(response.aiter_lines())
        # Read while the model is still starting: the notice cannot wait for it.
        assert await anext(lines) == ": loading model cold"
        assert not cold.replica_up.is_set()
        cold.replica_up.set()
        events = _events([line async for line in lines])
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    async with httpx.AsyncClient(base_url=url) as http:
        stored = (await http.get(f"/v1/responses/{final['id']}")).json()
    assert stored["status"] == "completed" and stored["output"] == final["output"]


async def test_the_openai_client_iterates_past_the_notice(cold: _Cold, url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    try:
        opening = asyncio.ensure_future(
            client.responses.create(model="cold", input="Hello there", stream=True)
        )
        # The notice is sent before any event: the response starts while the model loads.
        stream = await asyncio.wait_for(opening, 30)
        await wait_for(lambda: _async(cold.waiting == 1))
        assert not cold.replica_up.is_set()
        cold.replica_up.set()
        events = [e async for e in stream]
    finally:
        await client.close()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output_text == text


async def test_a_model_that_does_not_start_fails_the_stream(cold: _Cold, url: str) -> None:
    cold.fail = ModelStarting("model cold did not start within 2 s; retry in 5 s", retry_after=5)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    try:
        stream = await client.responses.create(model="cold", input="Hello there", stream=True)
        cold.replica_up.set()
        events = [e async for e in stream]
    finally:
        await client.close()
    assert [e.type for e in events] == ["error", "response.failed"]
    assert events[0].code == "model_starting"  # type: ignore[union-attr]
    failed = events[1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == "model cold did not start within 2 s; retry in 5 s"
    assert cold.withdrawn == 0 and cold.waiting == 1


async def _async(value: bool) -> bool:
    return value
