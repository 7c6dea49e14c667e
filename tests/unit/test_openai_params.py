"""Every /v1/chat/completions parameter is honoured or refused; none is dropped silently.

The ASGI app with fake engines, plus the openai and ollama engines against their real
local fake servers, so what reaches an engine is seen on the wire.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.fakes.ollama_server import FakeOllamaServer
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.remote_engines import NeverReached, remote_models
from tests.unit.test_api import CHAT, Harness, fake_model, make_config, sse_events

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.config import ENGINE_KINDS, EngineCapabilities, ModelConfig
from chatfleet.serving.engines import create_engine


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    h = Harness(
        make_config(
            fake_model("fake", reply_tokens=40),
            fake_model("thinker", reply_tokens=10, thinking_tokens=5),
        )
    )
    await h.start()
    async with h.http() as c:
        yield c


def _error(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    message: str = error["message"]
    return message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),
        ("stream", 1),
        ("top_p", True),
        ("temperature", "0.5"),
        ("seed", False),
        ("seed", 1.5),
        ("max_tokens", "5"),
        ("max_completion_tokens", True),
        ("n", True),
        ("logprobs", "false"),
    ],
)
async def test_fields_are_strictly_typed_as_openai_types_them(
    client: httpx.AsyncClient, field: str, value: Any
) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert field in _error(r, field)


async def test_stream_options_are_strict_too(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"foo": 1}}
    )
    assert _error(r, "stream_options.foo") == (
        "Unrecognized request argument supplied: stream_options.foo"
    )
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": "yes"}},
    )
    _error(r, "stream_options.include_usage")


async def test_an_unknown_field_is_refused_in_openai_words(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "foo": 1})
    assert _error(r, "foo") == "Unrecognized request argument supplied: foo"


@pytest.mark.parametrize(
    ("extra", "param", "what"),
    [
        ({"functions": [{"name": "f"}]}, "functions", "functions (deprecated: use tools)"),
        ({"function_call": "auto"}, "function_call", "function_call (deprecated: use tools)"),
        ({"n": 2}, "n", "n > 1 (one choice per request)"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "logit_bias"),
        ({"reasoning_effort": "high"}, "reasoning_effort", "reasoning_effort"),
        ({"store": True}, "store", "store (stored completions)"),
        ({"modalities": ["text", "audio"]}, "modalities", "modalities other than ['text']"),
        ({"service_tier": "flex"}, "service_tier", "service_tier flex"),
        ({"top_k": 20}, "top_k", "top_k"),
        ({"repetition_penalty": 1.1}, "repetition_penalty", "repetition_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "frequency_penalty"),
    ],
)
async def test_what_the_engine_cannot_do_is_refused_naming_parameter_and_model(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, what: str
) -> None:
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json={**CHAT, **extra, "stream": stream})
        assert _error(r, param) == f"model fake (engine fake) does not support {what}"


@pytest.mark.parametrize(
    ("extra", "param", "what"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
            "tools",
            "tools",
        ),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", "parallel_tool_calls (tools)"),
        (
            {"response_format": {"type": "json_object"}},
            "response_format",
            "response_format json_object (structured output)",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "response_format json_schema (structured output)",
        ),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
            "messages.0",
            "tool calls in messages (tools)",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    }
                ]
            },
            "messages.0",
            "tool calls in messages (tools)",
        ),
    ],
)
async def test_tools_and_formats_are_refused_by_an_engine_without_them(
    extra: dict[str, Any], param: str, what: str
) -> None:
    config = make_config(ModelConfig(name="smollm2", engine="transformers"))
    app = create_app(config, {"smollm2": NeverReached()})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chatfleet"
    ) as c:
        for stream in (False, True):
            body = {**CHAT, "model": "smollm2", **extra, "stream": stream}
            r = await c.post("/v1/chat/completions", json=body)
            prefix = f"model smollm2 (engine transformers) does not support {what}: "
            message = _error(r, param)
            assert message.startswith(prefix)
            # Why, and what to serve the model with instead.
            why = "it samples free text" if "tools" in what else "it has no constrained decoder"
            assert message.removeprefix(prefix).startswith(why), message


@pytest.mark.parametrize(
    ("message", "param", "what"),
    [
        (
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                ],
            },
            "messages.1.content",
            "non-text content (vision)",
        ),
    ],
)
async def test_image_messages_are_refused(
    client: httpx.AsyncClient, message: dict[str, Any], param: str, what: str
) -> None:
    body = {**CHAT, "messages": [*CHAT["messages"], message]}  # type: ignore[misc]
    r = await client.post("/v1/chat/completions", json=body)
    assert what in _error(r, param)


async def test_neutral_values_and_informational_fields_ask_for_nothing(
    client: httpx.AsyncClient,
) -> None:
    body = {
        **CHAT,
        "tools": [],
        "tool_choice": "none",
        "logprobs": False,
        "n": 1,
        "response_format": {"type": "text"},
        "store": False,
        "modalities": ["text"],
        "service_tier": "auto",
        "user": "user-1234",
        "safety_identifier": "hash-1",
        "prompt_cache_key": "k",
        "conversation_id": "conv-1",
    }
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


async def test_stop_seed_and_max_completion_tokens_are_honoured(
    client: httpx.AsyncClient,
) -> None:
    async def content(**fields: Any) -> tuple[str, str]:
        r = await client.post("/v1/chat/completions", json={**CHAT, **fields})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    plain, finish = await content()
    assert finish == "stop"
    words = plain.split()
    # A stop sequence ends the answer before it.
    cut, finish = await content(stop=[f" {words[3]} "])
    assert (cut, finish) == (" ".join(words[:3]), "stop")
    # A seed picks the words: the same seed the same ones, another seed others.
    seeded = await content(seed=7)
    assert seeded == await content(seed=7)
    assert seeded != await content(seed=8)
    assert seeded[0] != plain
    # max_completion_tokens is max_tokens' newer name.
    short, finish = await content(max_completion_tokens=3)
    assert (len(short.split()), finish) == (3, "length")


async def test_stop_is_honoured_when_streamed(client: httpx.AsyncClient) -> None:
    plain = (await client.post("/v1/chat/completions", json=CHAT)).json()
    words = plain["choices"][0]["message"]["content"].split()
    r = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "stop": f" {words[2]} "}
    )
    chunks = [json.loads(d) for _, d in sse_events(r.text)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == " ".join(words[:2])


async def test_models_say_what_each_supports(client: httpx.AsyncClient) -> None:
    models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    assert models["fake"]["capabilities"] == {
        "chat": True,
        "embeddings": False,
        "stop": True,
        "seed": True,
        "reasoning": False,
        "tools": True,
        "forced_tool_choice": True,
        "structured_output": True,
        "vision": False,
        "logprobs": True,
        "sampling_parameters": [],
    }
    assert models["thinker"]["capabilities"]["reasoning"] is True


def test_every_engine_declares_its_capabilities() -> None:
    declared = {
        kind: ModelConfig.model_validate(_minimal(kind)).capabilities() for kind in ENGINE_KINDS
    }
    assert not any(c.vision for c in declared.values())
    assert all(c.logprobs for c in declared.values())
    assert {k for k, c in declared.items() if c.tools} == {"fake", "ollama", "openai"}
    assert {k for k, c in declared.items() if c.structured_output} == {
        "fake",
        "vllm",
        "ollama",
        "openai",
    }
    assert declared["vllm"].sampling == {
        "top_k",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
    }
    assert declared["openai"].sampling == {"frequency_penalty", "presence_penalty"}
    assert declared["transformers"].sampling == {"repetition_penalty"}
    shared = EngineCapabilities.shared(list(declared.values()))
    assert shared.sampling == frozenset() and shared.stop and shared.seed


def _minimal(kind: str) -> dict[str, Any]:
    settings = {
        "vllm": {"model": "m"},
        "ollama": {"model": "m"},
        "openai": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
    }
    return {"name": kind, "engine": kind, **({kind: settings[kind]} if kind in settings else {})}


# --- sampling extras reach the engines that declare them -------------------------------------


@pytest.fixture
async def remote_client(
    openai_upstream: FakeOpenAIServer, ollama_upstream: FakeOllamaServer
) -> AsyncIterator[httpx.AsyncClient]:
    openai_upstream.reset()
    ollama_upstream.reset()
    config = make_config(
        *remote_models(openai_upstream, ollama_upstream),
    )
    clients = {m.name: LocalEngineClient(create_engine(m)) for m in config.models}
    for engine_client in clients.values():
        await engine_client.start()
    app = create_app(config, clients)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chatfleet"
    ) as c:
        yield c
    for engine_client in clients.values():
        await engine_client.engine.close()


async def test_sampling_extras_reach_the_engines_that_declare_them(
    remote_client: httpx.AsyncClient,
    openai_upstream: FakeOpenAIServer,
    ollama_upstream: FakeOllamaServer,
) -> None:
    extras = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5}
    r = await remote_client.post(
        "/v1/chat/completions", json={**CHAT, "model": "local", "seed": 3, **extras}
    )
    assert r.status_code == 200, r.text
    options = ollama_upstream.requests[0].body["options"]
    assert {k: options.get(k) for k in ("top_k", "min_p", "repeat_penalty", "seed")} == {
        "top_k": 20,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "seed": 3,
    }
    assert options["presence_penalty"] == 0.5

    r = await remote_client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "remote", "frequency_penalty": 0.4, "user": "u1"},
    )
    assert r.status_code == 200, r.text
    assert openai_upstream.requests[0].body["frequency_penalty"] == 0.4
    # top_k is not OpenAI's: the remote engine refuses it rather than risk the upstream's 400.
    r = await remote_client.post(
        "/v1/chat/completions", json={**CHAT, "model": "remote", "top_k": 5}
    )
    assert _error(r, "top_k") == "model remote (engine openai) does not support top_k"
    assert len(openai_upstream.requests) == 1  # refused before anything was sent


async def test_the_seed_systems_bodies_stay_lenient(client: httpx.AsyncClient) -> None:
    # Their clients send fields chatfleet has no use for; only the OpenAI endpoint is strict.
    r = await client.post("/api/generate", json={"prompt": "hi", "bogus": 1, "top_k": 5})
    assert r.status_code == 200
    assert [e for e, _ in sse_events(r.text)][-1] == "end_stream"


async def test_a_refused_request_never_reaches_the_engine() -> None:
    app = create_app(make_config(), {"fake": NeverReached()})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chatfleet"
    ) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "functions": [{"name": "f"}]})
    assert r.status_code == 400
