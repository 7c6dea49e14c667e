"""``tool_choice`` ``required`` and a named function on the ollama engine, driven by the
official ``openai`` client over real uvicorn against the fake Ollama server: the answer
is constrained by Ollama's ``format`` (the calls' JSON schema, as vLLM builds it) and
read back as tool calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest
from tests.fakes.ollama_server import FakeOllamaServer, OllamaAnswer
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.remote_engines import remote_models
from tests.fakes.tool_turns import after_tool_call
from tests.unit.test_api import make_config
from tests.unit.test_tools import CLOCK, QUESTION, RECIPE, RECIPE_FORMAT, WEATHER
from tests.unit.test_tools import _serve as serve
from tests.unit.test_tools import _stream_tool_calls as stream_tool_calls

NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}
WEATHER_PARAMETERS: dict[str, Any] = WEATHER["function"]["parameters"]  # type: ignore[index]
#: A tool whose parameters hold ``$defs`` (a recipe's steps), and one whose ``step``
#: definition is another: hoisted to the root, the second must be renamed.
COOK = {"type": "function", "function": {"name": "cook", "parameters": RECIPE}}
STEP = {"type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]}
TIMER = {
    "type": "function",
    "function": {
        "name": "timer",
        "parameters": {
            "type": "object",
            "properties": {"step": {"$ref": "#/$defs/step"}},
            "required": ["step"],
            "$defs": {"step": STEP},
        },
    },
}


@pytest.fixture
async def remote(
    openai_upstream: FakeOpenAIServer, ollama_upstream: FakeOllamaServer
) -> AsyncIterator[openai.AsyncOpenAI]:
    openai_upstream.reset()
    ollama_upstream.reset()
    async for c in serve(make_config(*remote_models(openai_upstream, ollama_upstream))):
        yield c


def _pieces(document: Any) -> list[str]:
    text = json.dumps(document)
    return [text[i : i + 7] for i in range(0, len(text), 7)]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_named_tool_choice_answers_with_that_functions_arguments(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer, stream: bool
) -> None:
    tools: Any = [CLOCK, WEATHER]
    if stream:
        pieces: list[str] = []
        upstream = await remote.chat.completions.create(
            model="local", messages=QUESTION, tools=tools, tool_choice=NAMED, stream=True
        )
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        async for chunk in upstream:
            for piece in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                call = calls.setdefault(piece.index, {"id": piece.id, "name": ""})
                assert piece.function is not None
                call["name"] += piece.function.name or ""
                pieces.append(piece.function.arguments or "")
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        (call,) = calls.values()
        call_id, name, arguments = call["id"], call["name"], "".join(pieces)
        # Incremental: the arguments come as the model writes them, not in one piece.
        assert len([p for p in pieces if p]) > 3
    else:
        r = await remote.chat.completions.create(
            model="local", messages=QUESTION, tools=tools, tool_choice=NAMED
        )
        (made,) = r.choices[0].message.tool_calls or []
        call_id, name, arguments = made.id, made.function.name, made.function.arguments
        finish = r.choices[0].finish_reason
        assert r.choices[0].message.content is None
    assert finish == "tool_calls"
    assert name == "get_weather" and call_id.startswith("call_")
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
    body = ollama_upstream.requests[0].body
    # The format is the function's parameters; the tools stay for the model to read.
    assert body["format"] == WEATHER_PARAMETERS
    assert body["tools"] == tools


@pytest.mark.parametrize("stream", [False, True])
async def test_required_answers_with_the_calls_the_model_chose(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer, stream: bool
) -> None:
    weather = {"city": "Oslo", "unit": "celsius", "days": 3}
    chosen = [
        {"name": "get_time", "parameters": {}},
        {"name": "get_weather", "parameters": weather},
    ]
    ollama_upstream.queue(OllamaAnswer(content=_pieces(chosen)))
    tools: Any = [WEATHER, CLOCK]
    if stream:
        calls, finish, content = await stream_tool_calls(
            remote, model="local", messages=QUESTION, tools=tools, tool_choice="required"
        )
    else:
        r = await remote.chat.completions.create(
            model="local", messages=QUESTION, tools=tools, tool_choice="required"
        )
        finish, content = r.choices[0].finish_reason, r.choices[0].message.content
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in r.choices[0].message.tool_calls or []
        ]
    assert finish == "tool_calls" and not content
    assert [c["name"] for c in calls] == ["get_time", "get_weather"]
    assert [json.loads(c["arguments"]) for c in calls] == [{}, weather]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    form = ollama_upstream.requests[0].body["format"]
    assert form["minItems"] == 1 and "maxItems" not in form
    jsonschema.validate(chosen, form)  # the scripted answer is one the format allows
    with pytest.raises(jsonschema.ValidationError):  # a tool that was not offered
        jsonschema.validate([{"name": "get_wether", "parameters": weather}], form)
    with pytest.raises(jsonschema.ValidationError):  # another tool's arguments
        jsonschema.validate([{"name": "get_weather", "parameters": {"city": 1}}], form)
    with pytest.raises(jsonschema.ValidationError):  # no call at all
        jsonschema.validate([], form)


async def test_required_follows_the_schema_the_fake_model_is_held_to(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer
) -> None:
    # Unscripted, the fake server answers with a document its format accepts, as a
    # constrained model does: the calls' arguments then follow their tools' schemas,
    # $defs and $refs included (hoisted to the root, the clashing one renamed).
    tools: Any = [COOK, TIMER]
    r = await remote.chat.completions.create(
        model="local", messages=QUESTION, tools=tools, tool_choice="required"
    )
    form = ollama_upstream.requests[0].body["format"]
    jsonschema.validators.validator_for(form).check_schema(form)
    assert set(form["$defs"]) == {"step", "timer__step"}
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "cook"
    jsonschema.validate(json.loads(call.function.arguments), RECIPE)
    # The second tool's branch resolves to its own step, not the recipe's.
    timer = [{"name": "timer", "parameters": {"step": {"minutes": 4}}}]
    jsonschema.validate(timer, form)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            [{"name": "timer", "parameters": {"step": {"n": 1, "text": "x"}}}], form
        )


async def test_required_without_parallel_calls_is_one_call(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer
) -> None:
    two = [{"name": "get_time", "parameters": {}}, {"name": "get_time", "parameters": {"tz": "X"}}]
    ollama_upstream.queue(OllamaAnswer(content=_pieces(two)))
    r = await remote.chat.completions.create(
        model="local",
        messages=QUESTION,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert ollama_upstream.requests[0].body["format"]["maxItems"] == 1
    (only,) = r.choices[0].message.tool_calls or []
    assert json.loads(only.function.arguments) == {}


@pytest.mark.parametrize("stream", [False, True])
async def test_the_agent_loop_with_required_then_auto(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer, stream: bool
) -> None:
    tools: Any = [WEATHER, CLOCK]
    calls, finish, _ = (
        await stream_tool_calls(
            remote, model="local", messages=QUESTION, tools=tools, tool_choice="required"
        )
        if stream
        else await _whole_tool_calls(remote, messages=QUESTION, tools=tools)
    )
    assert finish == "tool_calls"
    (call,) = calls
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    history: Any = after_tool_call(QUESTION, call, "18 degrees and sunny")
    calls, finish, content = (
        await stream_tool_calls(
            remote, model="local", messages=history, tools=tools, tool_choice="auto"
        )
        if stream
        else await _whole_tool_calls(remote, messages=history, tools=tools, choice="auto")
    )
    assert (calls, finish, content) == ([], "stop", "18 degrees and sunny")
    second = ollama_upstream.requests[1].body
    assert "format" not in second and second["tools"] == tools
    assert second["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": arguments}}],
        },
        {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
    ]


async def _whole_tool_calls(
    client: openai.AsyncOpenAI, *, messages: Any, tools: Any, choice: Any = "required"
) -> tuple[list[dict[str, Any]], str | None, str]:
    r = await client.chat.completions.create(
        model="local", messages=messages, tools=tools, tool_choice=choice
    )
    message = r.choices[0].message
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]
    return calls, r.choices[0].finish_reason, message.content or ""


@pytest.mark.parametrize("choice", ["required", NAMED])
async def test_a_response_format_with_a_forced_tool_choice_is_refused(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer, choice: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await remote.chat.completions.create(
            model="local",
            messages=QUESTION,
            tools=[WEATHER],
            tool_choice=choice,
            response_format=RECIPE_FORMAT,
        )
    named = "required" if choice == "required" else "a named tool"
    error: Any = caught.value.body
    assert error["message"] == (
        "model local (engine ollama) does not support response_format json_schema with"
        f" tool_choice {named}: they conflict: Ollama has one format, and a forced"
        " tool_choice takes it for the calls' schema"
    )
    assert error["param"] == "response_format"
    assert ollama_upstream.requests == []
    # Each alone is honoured, and so is a format with tool_choice auto.
    await remote.chat.completions.create(
        model="local", messages=QUESTION, tools=[WEATHER], response_format=RECIPE_FORMAT
    )
    assert ollama_upstream.requests[0].body["format"] == RECIPE


async def test_an_answer_that_breaks_the_format(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer
) -> None:
    # Cut short by max_tokens, the calls cannot be read: the text comes back as it is.
    pieces = ['[{"name": ', '"get_time", "param', 'eters": {}}]']
    ollama_upstream.queue(OllamaAnswer(content=pieces))
    r = await remote.chat.completions.create(
        model="local", messages=QUESTION, tools=[CLOCK], tool_choice="required", max_tokens=2
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == '[{"name": "get_time", "param'
    assert r.choices[0].message.tool_calls is None
    # Whole but not the calls asked for: Ollama broke its format, a 502 that says so.
    ollama_upstream.queue(OllamaAnswer(content=["Sure, ", "the time is noon."]))
    with pytest.raises(openai.APIStatusError) as caught:
        await remote.chat.completions.create(
            model="local", messages=QUESTION, tools=[CLOCK], tool_choice="required"
        )
    assert caught.value.status_code == 502
    assert "did not answer with the tool calls tool_choice asks for" in caught.value.message
    # JSON calls, but of a tool that was not offered: as broken.
    stray = [{"name": "delete_everything", "parameters": {}}]
    ollama_upstream.queue(OllamaAnswer(content=_pieces(stray)))
    with pytest.raises(openai.APIStatusError) as caught:
        await remote.chat.completions.create(
            model="local", messages=QUESTION, tools=[CLOCK], tool_choice="required"
        )
    assert caught.value.status_code == 502


async def test_models_list_forced_tool_choice_for_ollama(remote: openai.AsyncOpenAI) -> None:
    r = await remote.with_raw_response.models.list()
    (local,) = [m for m in json.loads(r.text)["data"] if m["id"] == "local"]
    assert local["capabilities"]["forced_tool_choice"] is True


async def test_the_responses_api_forces_ollama_calls_too(
    remote: openai.AsyncOpenAI, ollama_upstream: FakeOllamaServer
) -> None:
    weather: Any = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}
    r = await remote.responses.create(
        model="local",
        input="Weather in Lyon?",
        tools=[weather],
        tool_choice="required",
        store=False,
    )
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    with pytest.raises(openai.BadRequestError) as caught:
        await remote.responses.create(
            model="local",
            input="Weather in Lyon?",
            tools=[weather],
            tool_choice="required",
            text={"format": {"type": "json_object"}},
            store=False,
        )
    error: Any = caught.value.body
    assert error["param"] == "text.format"
    assert "text.format json_object with tool_choice required: they conflict" in error["message"]
    assert len(ollama_upstream.requests) == 1
