"""Tool calling on the vllm engine without vLLM: the config field, the capability gate, and
the pure parts (vLLM's JSON for forced choices, the template's messages, the readers).

tests/vllm_cpu run the same paths on a real vLLM engine with its hermes parser.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import httpx
import pydantic
import pytest
from tests.unit.test_api import make_config

from chatfleet.serving.api import create_app
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines._vllm_tool_readers import (
    NamedCallReader,
    ParserReader,
    Piece,
    RequiredCallsReader,
    ToolReader,
)
from chatfleet.serving.engines._vllm_tools import forced_tool_schema, template_messages
from chatfleet.serving.engines.vllm_async import _structured
from chatfleet.serving.errors import EngineError
from chatfleet.serving.protocol import (
    Chunk,
    GenerationRequest,
    Message,
    ToolCall,
    ToolCallDelta,
    Usage,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"$ref": "#/$defs/city"}},
            "required": ["city"],
            "$defs": {"city": {"type": "string"}},
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop"}}
CHAT_TOOLS = {
    "model": "big",
    "messages": [{"role": "user", "content": "Weather in Oslo?"}],
    "tools": [WEATHER],
}


def _vllm(**settings: Any) -> ModelConfig:
    return ModelConfig(name="big", engine="vllm", vllm={"model": "org/m", **settings})


def _request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(model="big", messages=[Message("user", "hi")], **fields)


# --- the config field and the capability gate -------------------------------------------------


def test_a_parser_gives_the_vllm_engine_tools_and_forced_tool_choice() -> None:
    without, with_parser = _vllm().capabilities(), _vllm(tool_call_parser="hermes").capabilities()

    assert not without.tools and not without.forced_tool_choice
    assert with_parser.tools and with_parser.forced_tool_choice
    # The rest is the engine's as before.
    assert with_parser.structured_output and with_parser.sampling == without.sampling


@pytest.mark.parametrize("name", ["", "Hermes", "hermes; rm", "../x"])
def test_a_parser_name_that_cannot_be_one_is_refused_by_the_config(name: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="tool_call_parser"):
        _vllm(tool_call_parser=name)


class _Recorder:
    """An engine client that records the request and answers with one tool call."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    async def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        self.requests.append(request)
        call = ToolCallDelta(0, '{"city": "Oslo"}', "call_1", "get_weather")
        yield [
            Chunk(kind="tool_call", text="", call=call),
            Chunk("text", "", 0, "tool_calls", Usage(prompt_tokens=3, completion_tokens=5)),
        ]

    async def is_ready(self) -> bool:
        return True


async def _post(model: ModelConfig, body: dict[str, Any]) -> tuple[httpx.Response, _Recorder]:
    recorder = _Recorder()
    app = create_app(make_config(model), {"big": recorder})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chatfleet"
    ) as c:
        return await c.post("/v1/chat/completions", json=body), recorder


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({}, "tools"),
        ({"tool_choice": "required"}, "tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tools"),
    ],
)
async def test_without_a_parser_tools_are_refused_naming_the_field_to_set(
    extra: dict[str, Any], param: str
) -> None:
    r, recorder = await _post(_vllm(), {**CHAT_TOOLS, **extra})

    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith("model big (engine vllm) does not support tools: ")
    assert "set vllm.tool_call_parser" in error["message"]
    assert not recorder.requests


async def test_with_a_parser_tools_and_tool_choice_reach_the_engine() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {**CHAT_TOOLS, "tool_choice": choice, "parallel_tool_calls": False}

    r, recorder = await _post(_vllm(tool_call_parser="hermes"), body)

    assert r.status_code == 200, r.text
    (request,) = recorder.requests
    assert [t["function"]["name"] for t in request.tools] == ["get_weather"]
    assert request.tool_choice == choice and request.parallel_tool_calls is False
    choice_out = r.json()["choices"][0]
    assert choice_out["finish_reason"] == "tool_calls"
    assert choice_out["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


# --- vLLM's JSON for required and named tool choices ------------------------------------------


def test_a_named_choice_is_held_to_the_functions_parameters() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert (
        forced_tool_schema(_request(tools=[WEATHER, NOOP], tool_choice=named))
        == (
            WEATHER["function"]["parameters"]  # type: ignore[index]
        )
    )
    # A function without parameters is called with an empty object.
    noop = {"type": "function", "function": {"name": "noop"}}
    assert forced_tool_schema(_request(tools=[WEATHER, NOOP], tool_choice=noop)) == {
        "type": "object",
        "properties": {},
    }


def test_required_is_held_to_an_array_of_calls_of_the_offered_tools() -> None:
    tools = [WEATHER, NOOP]
    before = copy.deepcopy(tools)

    schema = forced_tool_schema(_request(tools=tools, tool_choice="required"))
    single = forced_tool_schema(
        _request(tools=tools, tool_choice="required", parallel_tool_calls=False)
    )

    weather_parameters = {
        k: v for k, v in WEATHER["function"]["parameters"].items() if k != "$defs"
    }  # type: ignore[union-attr]
    assert schema == {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["get_weather"]},
                        "parameters": weather_parameters,
                    },
                    "required": ["name", "parameters"],
                },
                {
                    "properties": {
                        "name": {"type": "string", "enum": ["noop"]},
                        "parameters": {"type": "object", "properties": {}},
                    },
                    "required": ["name", "parameters"],
                },
            ],
        },
        "$defs": {"city": {"type": "string"}},  # where the items' $refs resolve
    }
    assert single == {**schema, "maxItems": 1}
    assert tools == before  # the request's tools are not changed


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_other_choices_are_not_constrained(choice: str | None) -> None:
    assert forced_tool_schema(_request(tools=[WEATHER], tool_choice=choice)) is None
    assert forced_tool_schema(_request(tool_choice=choice)) is None


# --- the conversation as chat templates take it -----------------------------------------------


def test_history_calls_reach_the_template_with_arguments_as_objects() -> None:
    messages = [
        Message("user", "Weather?"),
        Message(
            "assistant",
            "",
            tool_calls=(
                ToolCall("c1", "get_weather", '{"city": "Oslo"}'),
                ToolCall("c2", "noop", "not json"),
                ToolCall("c3", "noop", "[1]"),
            ),
        ),
        Message("tool", "cold", tool_call_id="c1"),
    ]

    rendered = template_messages(messages)
    wire = template_messages(messages, objects=False)

    assert rendered[0] == {"role": "user", "content": "Weather?"}
    assert [c["function"]["arguments"] for c in rendered[1]["tool_calls"]] == [
        {"city": "Oslo"},
        {},  # as vLLM: what is not a JSON object would break every later turn
        {},
    ]
    assert rendered[1]["tool_calls"][0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    assert rendered[2] == {"role": "tool", "content": "cold", "tool_call_id": "c1"}
    assert wire[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'


# --- reading calls out of the stream ------------------------------------------------------------


def _feed(reader: ToolReader, text: str, step: int) -> list[Piece]:
    pieces: list[Piece] = []
    for i in range(0, len(text), step):
        pieces += reader.feed(text[i : i + step], [])
    return pieces + reader.finish()


def _gathered(pieces: list[Piece]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for p in pieces:
        assert isinstance(p, ToolCallDelta), p
        call = calls.setdefault(p.index, ["", ""])
        if p.name is not None:
            assert p.id and not call[0], "a call is named once, by its first piece"
            call[0] = p.name
        else:
            assert call[0], "a piece came before the call was named"
        call[1] += p.arguments
    return [(name, arguments) for name, arguments in (calls[i] for i in sorted(calls))]


REQUIRED = (
    '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris }]", "n": [1, {"a": 2}]}},'
    ' {"parameters": {}, "name": "noop"}, {"name": "x", "parameters": 5}]'
    ' after the array, nothing is read: [{"name": "late", "parameters": {}}]'
)


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_required_calls_are_read_however_the_text_is_cut(step: int) -> None:
    reader = RequiredCallsReader(_request(tools=[WEATHER, NOOP], tool_choice="required"))

    pieces = _feed(reader, REQUIRED, step)

    assert _gathered(pieces) == [
        ("get_weather", '{"city": "Pa\\"ris }]", "n": [1, {"a": 2}]}'),
        ("noop", "{}"),  # its parameters came before its name
        ("x", "5"),
    ]
    assert reader.called
    if step == 1:  # streamed: the arguments come in pieces as they are written
        assert len([p for p in pieces if isinstance(p, ToolCallDelta) and p.index == 0]) > 10


def test_required_keeps_the_first_call_without_parallel_tool_calls() -> None:
    request = _request(tools=[WEATHER, NOOP], tool_choice="required", parallel_tool_calls=False)

    pieces = _feed(RequiredCallsReader(request), REQUIRED, 3)

    assert [name for name, _ in _gathered(pieces)] == ["get_weather"]


def test_a_required_call_cut_short_is_still_named() -> None:
    reader = RequiredCallsReader(_request(tools=[WEATHER], tool_choice="required"))

    pieces = _feed(reader, '[{"name": "get_weather", "parameters": {"ci', 4)
    pieces += _feed(RequiredCallsReader(_request()), '[{"name": "noop"', 4)

    assert _gathered(pieces[:-1]) == [("get_weather", '{"ci')]
    assert pieces[-1] == ToolCallDelta(0, "", pieces[-1].id, "noop")  # type: ignore[union-attr]


def test_a_named_choice_streams_the_answer_as_the_calls_arguments() -> None:
    reader = NamedCallReader(_request(tools=[WEATHER]), "get_weather")

    pieces = _feed(reader, '{"city": "Oslo"}', 4)

    assert pieces[0] == ToolCallDelta(0, '{"ci', pieces[0].id, "get_weather")  # type: ignore[union-attr]
    assert _gathered(pieces) == [("get_weather", '{"city": "Oslo"}')]
    assert reader.called


def test_each_choice_gets_its_reader() -> None:
    def parser(request: GenerationRequest) -> str:
        return "parser reader"

    named = {"type": "function", "function": {"name": "get_weather"}}
    assert ToolReader.for_request(_request(), parser) is None
    assert ToolReader.for_request(_request(tools=[WEATHER], tool_choice="none"), parser) is None
    assert isinstance(
        ToolReader.for_request(_request(tools=[WEATHER], tool_choice=named), parser),
        NamedCallReader,
    )
    assert isinstance(
        ToolReader.for_request(_request(tools=[WEATHER], tool_choice="required"), parser),
        RequiredCallsReader,
    )
    for choice in ("auto", None):
        reader = ToolReader.for_request(_request(tools=[WEATHER], tool_choice=choice), parser)
        assert reader == "parser reader"


class _Parser:
    """Plays a vLLM ToolParser's streaming side: a script of DeltaMessages, one per feed."""

    def __init__(self, script: list[Any], remaining: str = "") -> None:
        self.script = script
        self.remaining = remaining
        self.seen: list[tuple[Any, ...]] = []

    def extract_tool_calls_streaming(self, *args: Any) -> Any:
        self.seen.append(args)
        return self.script.pop(0)

    def get_remaining_unstreamed_args(self) -> str:
        return self.remaining


def _delta(content: str | None = None, *calls: tuple[int, str | None, str | None]) -> Any:
    tool_calls = [
        SimpleNamespace(index=i, id=None, function=SimpleNamespace(name=name, arguments=args))
        for i, name, args in calls
    ]
    return SimpleNamespace(content=content, tool_calls=tool_calls)


def test_auto_hands_on_the_parsers_content_and_calls() -> None:
    parser = _Parser(
        [
            _delta("Let me look."),
            None,  # the parser holds back a partial tag
            _delta(None, (0, None, '{"ci')),  # arguments before the name: held
            _delta(None, (0, "get_weather", "")),
            _delta(None, (0, None, 'ty": "Os')),
            _delta(None, (1, "noop", "{}")),
        ],
        remaining='lo"}',
    )
    request = _request(tools=[WEATHER, NOOP], tool_choice="auto")
    reader = ParserReader(request, parser, "vllm request")

    pieces = [p for text in ("a", "b", "c", "d", "e", "f") for p in reader.feed(text, [7])]
    pieces += reader.finish()

    assert pieces[0] == "Let me look."
    # The remaining arguments go to the last call named, as vLLM's server adds them.
    assert _gathered(pieces[1:]) == [("get_weather", '{"city": "Os'), ("noop", '{}lo"}')]
    assert pieces[1] == ToolCallDelta(0, '{"ci', pieces[1].id, "get_weather")  # type: ignore[union-attr]
    previous, current, delta, previous_ids, ids, delta_ids, vllm_request = parser.seen[-1]
    assert (previous, current, delta) == ("abcde", "abcdef", "f")
    assert (len(previous_ids), len(ids), delta_ids) == (5, 6, [7])
    assert vllm_request == "vllm request"

    first_only = ParserReader(
        _request(tools=[WEATHER, NOOP], parallel_tool_calls=False),
        _Parser([_delta(None, (0, "get_weather", "{}")), _delta(None, (1, "noop", "{}"))]),
        None,
    )
    kept = first_only.feed("x", []) + first_only.feed("y", [])
    assert [p.name for p in kept if isinstance(p, ToolCallDelta)] == ["get_weather"]


def test_the_arguments_of_a_read_call_are_json() -> None:
    # The gathered required call decodes (what the ingress sends as arguments).
    reader = RequiredCallsReader(_request(tools=[WEATHER], tool_choice="required"))
    ((_, arguments),) = _gathered(
        _feed(reader, '[{"name":"get_weather","parameters":{"city":"Oslo"}}]', 3)
    )
    assert json.loads(arguments) == {"city": "Oslo"}


def test_a_parser_that_fails_is_an_engine_error_not_a_crash() -> None:
    class Broken:
        def extract_tool_calls_streaming(self, *args: Any) -> Any:
            raise IndexError("list index out of range")

    reader = ParserReader(_request(tools=[WEATHER]), Broken(), None)

    with pytest.raises(EngineError, match="reading the tool calls failed: IndexError"):
        reader.feed("<tool_call>", [1])


def test_a_forced_choice_is_what_structured_outputs_hold_the_answer_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As vLLM's server: a required or named choice wins over response_format.
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = SimpleNamespace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    form = {"type": "json_object"}
    named = {"type": "function", "function": {"name": "get_weather"}}

    forced = _structured(_request(tools=[WEATHER], tool_choice=named, response_format=form))
    required = _structured(_request(tools=[WEATHER], tool_choice="required"))
    auto = _structured(_request(tools=[WEATHER], tool_choice="auto", response_format=form))

    assert forced["structured_outputs"].json == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert required["structured_outputs"].json["type"] == "array"
    assert vars(auto["structured_outputs"]) == {"json_object": True}
    assert _structured(_request(tools=[WEATHER], tool_choice="none")) == {}
