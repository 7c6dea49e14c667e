"""Tool calls on real vLLM through the ASGI app, driven by the official openai client.

The session's engine (conftest: the tiny random Llama, ``tool_call_parser: hermes``)
behind ``/v1/chat/completions``, streamed and not: what an agent framework sees.
Run in the vllm environment only (see .ci/vllm-env.sh).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio
from tests.fakes.closed_tools import WEATHER

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.config import AppConfig
from chatfleet.serving.engines.vllm_async import VLLMEngine

pytest.importorskip("vllm.sampling_params")

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]
CHOICES = [
    pytest.param("required", id="required"),
    pytest.param({"type": "function", "function": {"name": "get_weather"}}, id="named"),
]


@pytest_asyncio.fixture(loop_scope="session")
async def client(vllm_engine: VLLMEngine) -> AsyncIterator[openai.AsyncOpenAI]:
    engine_client = LocalEngineClient(vllm_engine)
    await engine_client.start()  # already started: only marks the client ready
    config = AppConfig(models=[vllm_engine.model], auth={"enabled": False})
    app = create_app(config, {vllm_engine.name: engine_client})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://chatfleet") as http:
        yield openai.AsyncOpenAI(
            api_key="unused", base_url="http://chatfleet/v1", http_client=http, max_retries=0
        )


def forced(tool_choice: Any) -> Any:
    """The request of a forced call, as both tests send it (streamed or not)."""
    return {
        "model": "tiny",
        "messages": QUESTION,
        "tools": [WEATHER],
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 80,
    }


def _valid(arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("tool_choice", CHOICES)
async def test_a_forced_choice_is_a_tool_call_not_streamed(
    client: openai.AsyncOpenAI, tool_choice: Any
) -> None:
    completion = await client.chat.completions.create(**forced(tool_choice))

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    _valid(call.function.arguments)


@pytest.mark.parametrize("tool_choice", CHOICES)
async def test_a_forced_choice_is_a_tool_call_streamed(
    client: openai.AsyncOpenAI, tool_choice: Any
) -> None:
    stream = await client.chat.completions.create(stream=True, **forced(tool_choice))
    pieces, finish, content = [], None, ""
    async for chunk in stream:
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish

    assert finish == "tool_calls"
    assert not content
    first, *rest = pieces
    assert first.index == 0 and first.id and first.function.name == "get_weather"  # type: ignore[union-attr]
    assert rest and all(p.index == 0 and p.id is None for p in rest)  # incremental arguments
    _valid("".join(p.function.arguments or "" for p in pieces))  # type: ignore[union-attr]


async def test_the_tool_result_goes_back_and_the_model_answers(
    client: openai.AsyncOpenAI,
) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = await client.chat.completions.create(
        model="tiny",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice=named,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=80,
    )
    (call,) = first.choices[0].message.tool_calls or []
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "-3 degrees and snowing"},
    ]

    second = await client.chat.completions.create(
        model="tiny",
        messages=history,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        temperature=0,
        max_tokens=12,
    )

    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert not answer.message.tool_calls  # the random model never writes <tool_call>
    assert (answer.message.content or "").strip()
