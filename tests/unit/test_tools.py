"""Tool calling and structured output, driven by the official ``openai`` client over real
uvicorn: the fake engine's scripted agent loop, JSON-schema answers, and what the Ollama
and OpenAI engines send upstream and bring back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
from tests.fakes.app_server import serving
from tests.fakes.ollama_server import FakeOllamaServer, OllamaAnswer
from tests.fakes.openai_server import Answer, FakeOpenAIServer
from tests.fakes.remote_engines import remote_models
from tests.fakes.tool_turns import after_tool_call
from tests.unit.test_api import fake_model, make_config

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines import create_engine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]

RECIPE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 3},
        "servings": {"type": "integer", "minimum": 2, "maximum": 12},
        "vegan": {"type": "boolean"},
        "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "minItems": 2},
        "cuisine": {"anyOf": [{"type": "null"}, {"enum": ["french", "thai"]}]},
    },
    "required": ["title", "servings", "vegan", "steps", "cuisine"],
    "additionalProperties": False,
    "$defs": {
        "step": {
            "type": "object",
            "properties": {"n": {"type": "integer"}, "text": {"type": "string"}},
            "required": ["n", "text"],
            "additionalProperties": False,
        }
    },
}
RECIPE_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "recipe", "schema": RECIPE, "strict": True},
}


async def _serve(config: AppConfig) -> AsyncIterator[openai.AsyncOpenAI]:
    clients = {m.name: LocalEngineClient(create_engine(m)) for m in config.models}
    for client in clients.values():
        await client.start()
    try:
        async with (
            serving(create_app(config, clients)) as url,
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as c,
        ):
            yield c
    finally:
        for client in clients.values():
            await client.engine.close()


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    config = make_config(
        fake_model("fake"),
        fake_model("scripted", tool_calls={"tool": "get_time", "parallel": 2}),
        fake_model("shy", tool_calls={"enabled": False}),
    )
    async for c in _serve(config):
        yield c


async def _stream_tool_calls(
    client: openai.AsyncOpenAI, **request: Any
) -> tuple[list[dict[str, Any]], str | None, str]:
    """The tool calls of a streamed answer, rebuilt as an agent framework does."""
    calls: dict[int, dict[str, Any]] = {}
    finish, content = None, ""
    stream = await client.chat.completions.create(stream=True, **request)
    async for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            if piece.id is not None:
                assert call["id"] is None, "only a call's first piece carries its id"
                call["id"] = piece.id
            assert piece.function is not None
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


async def test_a_two_step_agent_loop_with_the_fake_engine(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.create(
        model="fake", messages=QUESTION, tools=[WEATHER, CLOCK]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]

    history = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    second = await client.chat.completions.create(
        model="fake", messages=history, tools=[WEATHER, CLOCK]
    )
    answer = second.choices[0]
    assert answer.finish_reason == "stop"
    assert answer.message.tool_calls is None
    assert answer.message.content == "get_weather returned 18 degrees and sunny"


async def test_the_agent_loop_streamed_as_openai_streams_it(client: openai.AsyncOpenAI) -> None:
    calls, finish, content = await _stream_tool_calls(
        client, model="fake", messages=QUESTION, tools=[WEATHER]
    )
    assert finish == "tool_calls" and content == ""
    (call,) = calls
    assert call["id"] and call["name"] == "get_weather"
    # The arguments came in several pieces, and add up to the whole call.
    whole = await client.chat.completions.create(model="fake", messages=QUESTION, tools=[WEATHER])
    assert whole.choices[0].message.tool_calls is not None
    assert call["arguments"] == whole.choices[0].message.tool_calls[0].function.arguments
    assert len(call["arguments"]) > 6
    history = after_tool_call(QUESTION, call, "rain")
    calls, finish, content = await _stream_tool_calls(
        client, model="fake", messages=history, tools=[WEATHER]
    )
    assert (calls, finish, content) == ([], "stop", "get_weather returned rain")


async def test_tool_choice_is_honoured(client: openai.AsyncOpenAI) -> None:
    async def called(model: str = "fake", **request: Any) -> list[str]:
        r = await client.chat.completions.create(model=model, messages=QUESTION, **request)
        return [c.function.name for c in r.choices[0].message.tool_calls or []]

    tools: Any = [WEATHER, CLOCK]
    assert await called(tools=tools, tool_choice="none") == []
    named: Any = {"type": "function", "function": {"name": "get_time"}}
    assert await called(tools=tools, tool_choice=named) == ["get_time"]
    # Scripted: its configured tool, two calls at once unless parallel calls are off.
    assert await called("scripted", tools=tools) == ["get_time", "get_time"]
    assert await called("scripted", tools=tools, parallel_tool_calls=False) == ["get_time"]
    # A model scripted not to call on its own still calls when it is required to.
    assert await called("shy", tools=tools) == []
    assert await called("shy", tools=tools, tool_choice="required") == ["get_weather"]


async def test_parallel_calls_stream_with_their_own_indexes(client: openai.AsyncOpenAI) -> None:
    calls, finish, _ = await _stream_tool_calls(
        client, model="scripted", messages=QUESTION, tools=[WEATHER, CLOCK]
    )
    assert finish == "tool_calls"
    assert [c["name"] for c in calls] == ["get_time", "get_time"]
    assert calls[0]["id"] != calls[1]["id"]
    assert [json.loads(c["arguments"]) for c in calls] == [{}, {}]


@pytest.mark.parametrize("stream", [False, True])
async def test_json_schema_output_follows_the_schema(
    client: openai.AsyncOpenAI, stream: bool
) -> None:
    messages: Any = [{"role": "user", "content": "A recipe, please."}]
    if stream:
        chunks = await client.chat.completions.create(
            model="fake", messages=messages, response_format=RECIPE_FORMAT, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    else:
        r = await client.chat.completions.create(
            model="fake", messages=messages, response_format=RECIPE_FORMAT
        )
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content or ""
    document = json.loads(text)
    jsonschema.validate(document, RECIPE)
    assert len(document["steps"]) == 2


async def test_a_schema_asking_for_too_much_gets_a_bounded_answer(
    client: openai.AsyncOpenAI,
) -> None:
    # Valid, but no document of it is small: the fake answers within its bounds.
    async def answer(schema: dict[str, Any]) -> tuple[str, str | None]:
        form: Any = {"type": "json_schema", "json_schema": {"name": "greedy", "schema": schema}}
        r = await client.chat.completions.create(
            model="fake", messages=QUESTION, response_format=form, max_tokens=4096
        )
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    text, finish = await answer({"type": "array", "minItems": 10**9, "items": {"type": "integer"}})
    assert (json.loads(text), finish) == ([42] * 64, "stop")
    text, finish = await answer({"type": "string", "minLength": 10**9})
    assert finish == "stop" and 4096 <= len(json.loads(text)) < 4200


async def test_json_object_output_is_a_json_object(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="fake", messages=QUESTION, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    # stop still ends the answer, JSON or not (as engines that constrain decoding do).
    r = await client.chat.completions.create(
        model="fake", messages=QUESTION, response_format={"type": "json_object"}, stop=['":']
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ('{"answer', "stop")


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"tool_choice": "required"}, "tool_choice is only allowed when tools are specified"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice names 'x', which is not in tools",
        ),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nothing"}},
                }
            },
            "not a valid JSON Schema",
        ),
        ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "json_schema"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"$schema": 5}}}
                ]
            },
            "$schema is not a string",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"properties": [1]}},
                    }
                ]
            },
            "not a valid JSON Schema",
        ),
    ],
)
async def test_malformed_tools_and_formats_are_400s(
    client: openai.AsyncOpenAI, extra: dict[str, Any], says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="fake", messages=QUESTION, **extra)
    assert says in caught.value.message
    assert isinstance(caught.value.body, dict) and caught.value.body.get("type")


# --- remote engines: what goes upstream, what comes back -----------------------------------


@pytest.fixture
async def remote(
    openai_upstream: FakeOpenAIServer, ollama_upstream: FakeOllamaServer
) -> AsyncIterator[openai.AsyncOpenAI]:
    openai_upstream.reset()
    ollama_upstream.reset()
    config = make_config(
        *remote_models(openai_upstream, ollama_upstream),
        ModelConfig(
            name="remote-whole",
            engine="openai",
            openai={
                "base_url": openai_upstream.base_url,
                "model": "gpt-test",
                "max_retries": 0,
                "stream": False,
            },
        ),
    )
    async for c in _serve(config):
        yield c


async def test_tools_pass_through_to_an_openai_api(
    remote: openai.AsyncOpenAI, openai_upstream: FakeOpenAIServer
) -> None:
    call = ("call_up1", "get_weather", ['{"city": ', '"Paris", "unit": "celsius", ', '"days": 1}'])
    scripted = Answer(tool_calls=[call], finish_reason="tool_calls")
    openai_upstream.queue(scripted, scripted)
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    calls, finish, _ = await _stream_tool_calls(
        remote,
        model="remote",
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice=named,
        parallel_tool_calls=False,
    )
    assert finish == "tool_calls"
    assert calls == [
        {
            "id": "call_up1",
            "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}',
        }
    ]
    sent = openai_upstream.requests[0].body
    assert sent["tools"] == [WEATHER]
    assert sent["tool_choice"] == named and sent["parallel_tool_calls"] is False
    whole = await remote.chat.completions.create(model="remote", messages=QUESTION, tools=[WEATHER])
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.tool_calls is not None
    assert whole.choices[0].message.tool_calls[0].function.arguments == calls[0]["arguments"]
    # The result goes back with its call: the history reaches the upstream intact.
    history: Any = [
        *QUESTION,
        whole.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "call_up1", "content": "sunny"},
    ]
    openai_upstream.queue(Answer(content=["It is ", "sunny."]))
    r = await remote.chat.completions.create(model="remote", messages=history, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny."
    assert openai_upstream.requests[-1].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_up1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": calls[0]["arguments"]},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_up1"},
    ]


async def test_tool_calls_of_an_unstreamed_upstream_answer(
    remote: openai.AsyncOpenAI, openai_upstream: FakeOpenAIServer
) -> None:
    calls = [("call_a", "get_weather", ['{"city": "Rome"}']), ("call_b", "get_time", ["{}"])]
    openai_upstream.queue(Answer(tool_calls=calls, finish_reason="tool_calls"))
    streamed, finish, _ = await _stream_tool_calls(
        remote, model="remote-whole", messages=QUESTION, tools=[WEATHER, CLOCK]
    )
    assert openai_upstream.requests[0].body["stream"] is False
    assert finish == "tool_calls"
    assert streamed == [
        {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"id": "call_b", "name": "get_time", "arguments": "{}"},
    ]


async def test_response_format_passes_through_to_an_openai_api(
    remote: openai.AsyncOpenAI, openai_upstream: FakeOpenAIServer
) -> None:
    openai_upstream.queue(Answer(content=['{"title": ', '"x"}']))
    r = await remote.chat.completions.create(
        model="remote", messages=QUESTION, response_format=RECIPE_FORMAT
    )
    assert r.choices[0].message.content == '{"title": "x"}'
    assert openai_upstream.requests[0].body["response_format"] == RECIPE_FORMAT


async def test_ollama_native_tool_calls(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer
) -> None:
    arguments = {"city": "Paris", "unit": "celsius", "days": 2}
    scripted = OllamaAnswer(
        tool_calls=[{"function": {"name": "get_weather", "arguments": arguments}}]
    )
    ollama_upstream.queue(scripted, scripted)
    calls, finish, _ = await _stream_tool_calls(
        remote, model="local", messages=QUESTION, tools=[WEATHER]
    )
    assert finish == "tool_calls"
    (call,) = calls
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == arguments
    assert ollama_upstream.requests[0].body["tools"] == [WEATHER]
    whole = await remote.chat.completions.create(model="local", messages=QUESTION, tools=[WEATHER])
    (made,) = whole.choices[0].message.tool_calls or []
    assert whole.choices[0].finish_reason == "tool_calls"
    history: Any = [
        *QUESTION,
        whole.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": made.id, "content": "sunny"},
    ]
    await remote.chat.completions.create(model="local", messages=history, tools=[WEATHER])
    # Ollama's own shape: arguments as an object, the result named by its tool.
    assert ollama_upstream.requests[-1].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": arguments}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]


async def test_ollama_honours_what_it_can_of_tool_choice(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer
) -> None:
    # Ollama has no tool_choice: "none" leaves the tools out (required and a named tool
    # are forced through its format: test_ollama_forced_tools.py).
    await remote.chat.completions.create(
        model="local", messages=QUESTION, tools=[WEATHER], tool_choice="none"
    )
    assert "tools" not in ollama_upstream.requests[0].body
    # Nor parallel_tool_calls: with false, the calls past the first are dropped here.
    two = [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
    ]
    ollama_upstream.queue(OllamaAnswer(tool_calls=two), OllamaAnswer(tool_calls=two))
    r = await remote.chat.completions.create(model="local", messages=QUESTION, tools=[WEATHER])
    assert len(r.choices[0].message.tool_calls or []) == 2
    r = await remote.chat.completions.create(
        model="local", messages=QUESTION, tools=[WEATHER], parallel_tool_calls=False
    )
    (only,) = r.choices[0].message.tool_calls or []
    assert json.loads(only.function.arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("stream", [False, True])
async def test_ollama_json_schema_output_follows_the_schema(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer, stream: bool
) -> None:
    messages: Any = [{"role": "user", "content": "A recipe, please."}]
    if stream:
        chunks = await remote.chat.completions.create(
            model="local", messages=messages, response_format=RECIPE_FORMAT, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    else:
        r = await remote.chat.completions.create(
            model="local", messages=messages, response_format=RECIPE_FORMAT
        )
        text = r.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), RECIPE)
    assert ollama_upstream.requests[0].body["format"] == RECIPE
    await remote.chat.completions.create(
        model="local", messages=messages, response_format={"type": "json_object"}
    )
    assert ollama_upstream.requests[1].body["format"] == "json"
