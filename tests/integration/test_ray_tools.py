"""Tool calling and structured output on real Ray Serve, through the official client:
the fake engine's two-step agent loop (streamed and not), JSON-schema answers from the
fake engine and from Ollama (a local fake server the replica reaches over HTTP), and
tool calls passed through to an OpenAI-compatible API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from tests.fakes.ollama_server import FakeOllamaServer
from tests.fakes.openai_server import Answer, FakeOpenAIServer
from tests.fakes.tool_turns import after_tool_call
from tests.unit.test_tools import QUESTION, RECIPE, RECIPE_FORMAT, WEATHER

from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray

APP = "tools"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOllamaServer, FakeOpenAIServer]]:
    with FakeOllamaServer() as ollama, FakeOpenAIServer() as remote:
        yield ollama, remote


@pytest.fixture(scope="module")
def client(ray_serve: Any, upstreams: tuple[FakeOllamaServer, FakeOpenAIServer]) -> openai.OpenAI:
    ollama, remote = upstreams
    config = AppConfig(
        auth={"enabled": False},
        models=[
            ModelConfig(name="fake", engine="fake"),
            ModelConfig(
                name="local",
                engine="ollama",
                ollama={"base_url": ollama.url, "model": "qwen3:0.6b"},
            ),
            ModelConfig(
                name="remote",
                engine="openai",
                openai={"base_url": remote.base_url, "model": "gpt-test", "max_retries": 0},
            ),
        ],
    )
    url = ray_serve.deploy(config, APP)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _streamed(client: openai.OpenAI, **request: Any) -> tuple[list[dict[str, Any]], str, str]:
    calls: dict[int, dict[str, Any]] = {}
    finish, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **request):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.id or ""
            assert piece.function is not None
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


def test_a_two_step_agent_loop(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="fake", messages=QUESTION, tools=[WEATHER])
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls or []
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
    history: Any = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    second = client.chat.completions.create(model="fake", messages=history, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "get_weather returned 18 degrees"


def test_a_two_step_agent_loop_streamed(client: openai.OpenAI) -> None:
    calls, finish, content = _streamed(client, model="fake", messages=QUESTION, tools=[WEATHER])
    assert (finish, content) == ("tool_calls", "")
    (call,) = calls
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])  # type: ignore[index]
    history: Any = after_tool_call(QUESTION, call, "rain")
    calls, finish, content = _streamed(client, model="fake", messages=history, tools=[WEATHER])
    assert (calls, finish, content) == ([], "stop", "get_weather returned rain")


@pytest.mark.parametrize("model", ["fake", "local"])
def test_json_schema_output_follows_the_schema(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A recipe, please."}],
        response_format=RECIPE_FORMAT,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), RECIPE)


def test_tool_calls_pass_through_to_an_openai_api(
    client: openai.OpenAI, upstreams: tuple[FakeOllamaServer, FakeOpenAIServer]
) -> None:
    _, remote = upstreams
    remote.queue(
        Answer(
            tool_calls=[("call_9", "get_weather", ['{"city":', ' "Oslo"}'])],
            finish_reason="tool_calls",
        )
    )
    calls, finish, _ = _streamed(client, model="remote", messages=QUESTION, tools=[WEATHER])
    assert finish == "tool_calls"
    assert calls == [{"id": "call_9", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert remote.requests[-1].body["tools"] == [WEATHER]


@pytest.mark.parametrize("model", ["fake", "local", "remote"])
def test_logprobs_cross_the_replicas(client: openai.OpenAI, model: str) -> None:
    # Logprobs ride on the engine's chunks: through the handle or the relay, as chunks do.
    request: Any = {
        "model": model,
        "messages": [{"role": "user", "content": "alpha beta gamma delta"}],
        "logprobs": True,
        "top_logprobs": 2,
    }
    choice = client.chat.completions.create(**request).choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    streamed, text = [], ""
    for chunk in client.chat.completions.create(stream=True, **request):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                streamed += c.logprobs.content or []
    assert text == choice.message.content
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in choice.logprobs.content]


def test_ollama_agent_loop_with_tool_choice_required_then_auto(
    client: openai.OpenAI, upstreams: tuple[FakeOllamaServer, FakeOpenAIServer]
) -> None:
    # Ollama has no tool_choice: the replica forces the call through Ollama's format.
    ollama, _ = upstreams
    calls, finish, content = _streamed(
        client, model="local", messages=QUESTION, tools=[WEATHER], tool_choice="required"
    )
    assert (finish, content) == ("tool_calls", "")
    (call,) = calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])  # type: ignore[index]
    assert ollama.requests[-1].body["format"]["minItems"] == 1
    history: Any = after_tool_call(QUESTION, call, "rain")
    second = client.chat.completions.create(
        model="local", messages=history, tools=[WEATHER], tool_choice="auto"
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "rain"
    named = client.chat.completions.create(
        model="local",
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (made,) = named.choices[0].message.tool_calls or []
    assert named.choices[0].finish_reason == "tool_calls" and made.function.name == "get_weather"
    jsonschema.validate(json.loads(made.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
