"""The Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``) driven by the
official ``openai`` client over real uvicorn, with auth on and the store on SQLite and
PostgreSQL: streamed and not, ``previous_response_id`` across turns (and branches), the
fake engine's scripted function-call loop, structured output, and the 400s and 404s."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from tests.fakes.app_server import serving, wait_for
from tests.fakes.chat_app import RecordingEngine, fake_model
from tests.unit.test_tools import RECIPE

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.auth import Authenticator
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.protocol import GenerationRequest
from chatfleet.serving.store import Store

KEY = "k" * 48
SECRETS = {"alice": "alice-secret", "bob": "bob-secret"}
CLIENTS = [
    {
        "client_id": name,
        "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "scopes": ["chat"],
    }
    for name, secret in SECRETS.items()
]
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


class Served:
    def __init__(
        self, engines: dict[str, RecordingEngine], clients: dict[str, Any], store: Store
    ) -> None:
        self.engines = engines
        self.store = store
        self.alice: openai.AsyncOpenAI = clients["alice"]
        self.bob: openai.AsyncOpenAI = clients["bob"]

    def last_request(self, model: str = "fake") -> GenerationRequest:
        return self.engines[model].requests[-1]


@pytest.fixture
async def served(store_url: str) -> AsyncIterator[Served]:
    config = AppConfig(
        models=[
            fake_model("fake", reply_tokens=8),
            fake_model("broken", fail_after_tokens=3),
            fake_model("thinker", reply_tokens=4, thinking_tokens=3),
            fake_model("slow", reply_tokens=2000, tokens_per_second=50),
            # An engine without tools or structured output (never reached: refused first).
            ModelConfig(name="smollm2", engine="transformers"),
        ],
        auth={"clients": CLIENTS},
    )
    store = Store.from_url(store_url)
    engines = {m.name: RecordingEngine(m if m.fake else fake_model(m.name)) for m in config.models}
    clients = {n: LocalEngineClient(e) for n, e in engines.items()}

    async def start_engines() -> None:
        for client in clients.values():
            await client.start()

    app = create_app(
        config,
        clients,
        metrics=Metrics(),
        auth=Authenticator(config.auth, KEY, store),
        store=store,
        on_startup=start_engines,
    )
    async with serving(app) as url:
        openai_clients = {}
        async with httpx.AsyncClient(base_url=url) as anonymous:
            for name, secret in SECRETS.items():
                r = await anonymous.post(
                    "/auth/token", json={"client_id": name, "client_secret": secret}
                )
                assert r.status_code == 200, r.text
                openai_clients[name] = openai.AsyncOpenAI(
                    base_url=f"{url}/v1", api_key=r.json()["access_token"], max_retries=0
                )
        try:
            yield Served(engines, openai_clients, store)
        finally:
            for c in openai_clients.values():
                await c.close()


def _tokens(request: GenerationRequest) -> int:
    return sum(len(m.content.split()) + 4 for m in request.messages)  # as the fake counts


async def test_a_response_is_answered_and_stored(served: Served) -> None:
    r = await served.alice.responses.create(model="fake", input="Tell me about foxes.")
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status == "completed" and r.store is True
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant"
    assert len(r.output_text.split()) == 8
    prompt = served.last_request()
    assert [(m.role, m.content) for m in prompt.messages] == [("user", "Tell me about foxes.")]
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (_tokens(prompt), 8)
    assert r.usage.total_tokens == r.usage.input_tokens + 8

    again = await served.alice.responses.retrieve(r.id)
    assert again.model_dump() == r.model_dump()


async def test_max_output_tokens_makes_an_incomplete_response(served: Served) -> None:
    r = await served.alice.responses.create(model="fake", input="Foxes?", max_output_tokens=3)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert len(r.output_text.split()) == 3

    with pytest.raises(openai.BadRequestError) as refused:
        await served.alice.responses.create(model="fake", input="Foxes?", max_output_tokens=10**6)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "max_output_tokens"
    assert error["message"].startswith("max_output_tokens 1000000 exceeds this model's limit")


async def test_a_streamed_response_is_openai_event_sequence(served: Served) -> None:
    stream = await served.alice.responses.create(
        model="fake", input="Tell me about dogs.", stream=True
    )
    events = [e async for e in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 2  # streamed word by word, not in one piece
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert len(text.split()) == 8
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.status == "completed"
    stored = await served.alice.responses.retrieve(final.id)
    assert stored.output_text == text and stored.status == "completed"

    # The SDK's own accumulating helper reads the same events into the same response.
    async with served.alice.responses.stream(model="fake", input="Tell me about dogs.") as s:
        accumulated = await s.get_final_response()
    assert accumulated.output_text == text


async def test_a_failure_mid_stream_is_an_error_event_then_response_failed(
    served: Served,
) -> None:
    stream = await served.alice.responses.create(model="broken", input="Hello?", stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    error, failed = events[-2:]
    assert error.code == "engine_error"  # type: ignore[union-attr]
    response = failed.response  # type: ignore[union-attr]
    assert response.status == "failed" and response.error.code == "engine_error"
    said = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert len(said.split()) == 3 and response.output_text == said
    stored = await served.alice.responses.retrieve(response.id)
    assert (stored.status, stored.output_text) == ("failed", said)

    with pytest.raises(openai.APIStatusError) as failed_whole:
        await served.alice.responses.create(model="broken", input="Hello?")
    assert failed_whole.value.status_code == 502
    assert failed_whole.value.body["code"] == "engine_error"  # type: ignore[index]


async def test_reasoning_is_its_own_output_item(served: Served) -> None:
    r = await served.alice.responses.create(model="thinker", input="Think first.")
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content is not None and len(reasoning.content[0].text.split()) == 3
    assert len(r.output_text.split()) == 4

    stream = await served.alice.responses.create(model="thinker", input="Think first.", stream=True)
    events = [e async for e in stream]
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    said = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (thought, said) == (reasoning.content[0].text, r.output_text)
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1]

    # An agent sends the whole output back: the reasoning item is taken, not prompted.
    replayed = [item.model_dump(exclude_none=True) for item in r.output]
    await served.alice.responses.create(
        model="thinker", input=[*replayed, {"role": "user", "content": "And then?"}], store=False
    )
    prompt = served.last_request("thinker").messages
    assert [(m.role, m.content) for m in prompt] == [
        ("assistant", r.output_text),
        ("user", "And then?"),
    ]


async def test_a_stream_the_client_leaves_is_stopped_and_stored_as_cancelled(
    served: Served,
) -> None:
    stream = await served.alice.responses.create(model="slow", input="A long one.", stream=True)
    response_id = ""
    async for event in stream:
        if event.type == "response.created":
            response_id = event.response.id
        if event.type == "response.output_text.delta":
            break
    await stream.close()

    async def cancelled() -> Any:
        found = await served.alice.responses.retrieve(response_id)
        return found if found.status == "cancelled" else None

    found = await wait_for(cancelled, within=30)
    assert 0 < len(found.output_text.split()) < 2000
    assert served.engines["slow"].cancelled  # the generation was stopped, not run out


async def test_previous_response_id_carries_three_turns(served: Served) -> None:
    first = await served.alice.responses.create(
        model="fake", input="My name is Ada.", instructions="Answer in English."
    )
    second = await served.alice.responses.create(
        model="fake", input="What is my name?", previous_response_id=first.id
    )
    third = await served.alice.responses.create(
        model="fake", input="And my last name?", previous_response_id=second.id
    )
    prompt = served.last_request()
    # The instructions held for the first response only, as in OpenAI's API.
    assert [(m.role, m.content) for m in prompt.messages] == [
        ("user", "My name is Ada."),
        ("assistant", first.output_text),
        ("user", "What is my name?"),
        ("assistant", second.output_text),
        ("user", "And my last name?"),
    ]
    # The fake's answer counts the prompt it was given: every earlier turn is in it.
    assert third.usage is not None and second.usage is not None
    assert third.usage.input_tokens == _tokens(prompt)
    assert third.usage.input_tokens > second.usage.input_tokens + len(second.output_text.split())
    assert third.previous_response_id == second.id

    # A second answer built on the first is a branch: it never sees the other one.
    await served.alice.responses.create(
        model="fake", input="Say it again.", previous_response_id=first.id
    )
    assert [m.content for m in served.last_request().messages] == [
        "My name is Ada.",
        first.output_text,
        "Say it again.",
    ]


async def test_the_function_call_loop_with_the_fake_engines_scripted_tools(
    served: Served,
) -> None:
    first = await served.alice.responses.create(
        model="fake", input="What is the weather in Paris?", tools=[WEATHER]
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city"}
    assert first.status == "completed" and first.output_text == ""
    tools = served.last_request().tools
    assert tools == [
        {
            "type": "function",
            "function": {k: v for k, v in WEATHER.items() if k != "type"},
        }
    ]

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}
    second = await served.alice.responses.create(
        model="fake", input=[result], previous_response_id=first.id, tools=[WEATHER]
    )
    assert second.output_text == "get_weather returned 18 degrees"
    assert [m.role for m in served.last_request().messages] == ["user", "assistant", "tool"]

    # Stateless, as agents that keep their own history do: the call sent back as an item.
    replayed = await served.alice.responses.create(
        model="fake",
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            call.model_dump(exclude_none=True),
            result,
        ],
        tools=[WEATHER],
        store=False,
    )
    assert replayed.output_text == "get_weather returned 18 degrees"
    with pytest.raises(openai.NotFoundError):
        await served.alice.responses.retrieve(replayed.id)  # store: false keeps nothing


async def test_a_streamed_function_call(served: Served) -> None:
    stream = await served.alice.responses.create(
        model="fake", input="Weather in Lyon?", tools=[WEATHER], tool_choice="required", stream=True
    )
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == pieces and json.loads(pieces)["city"]
    final = events[-1]
    assert final.type == "response.completed"
    (call,) = final.response.output
    assert call.type == "function_call" and call.arguments == pieces


async def test_text_format_json_schema(served: Served) -> None:
    r = await served.alice.responses.create(
        model="fake",
        input="A recipe, please.",
        text={
            "format": {"type": "json_schema", "name": "recipe", "schema": RECIPE, "strict": True}
        },
        max_output_tokens=2000,
    )
    jsonschema.validate(json.loads(r.output_text), RECIPE)
    assert served.last_request().response_format == {
        "type": "json_schema",
        "json_schema": {"name": "recipe", "schema": RECIPE, "strict": True},
    }


@pytest.mark.parametrize(
    ("extra", "param_or_words"),
    [
        ({"extra_body": {"frobnicate": 1}}, "Unrecognized request argument supplied: frobnicate"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"tool_choice": "required"}, "tool_choice is only allowed when tools"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "message, function_call"),
        ({"text": {"format": {"type": "xml"}}}, "text"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
async def test_bad_requests_are_400s_in_openais_shape(
    served: Served, extra: dict[str, Any], param_or_words: str
) -> None:
    body = {"model": "fake", "input": "Hi", **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        await served.alice.responses.create(**body)  # type: ignore[call-overload]
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert param_or_words in f"{error['message']} {error['param']}"


@pytest.mark.parametrize(
    ("extra", "param", "what"),
    [
        ({"tools": [WEATHER]}, "tools", "tools"),
        (
            {"text": {"format": {"type": "json_schema", "name": "r", "schema": RECIPE}}},
            "text.format",
            "text.format json_schema (structured output)",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c1", "output": "18"}]},
            "input",
            "function calls in input (tools)",
        ),
    ],
)
async def test_what_the_engine_cannot_do_is_refused_naming_the_parameter(
    served: Served, extra: dict[str, Any], param: str, what: str
) -> None:
    for stream in (False, True):
        body = {"model": "smollm2", "input": "Hi", "stream": stream, **extra}
        with pytest.raises(openai.BadRequestError) as refused:
            await served.alice.responses.create(**body)  # type: ignore[call-overload]
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == param
        assert error["message"].startswith(
            f"model smollm2 (engine transformers) does not support {what}"
        )
    with pytest.raises(openai.NotFoundError) as unknown:
        await served.alice.responses.create(model="nope", input="Hi")
    assert unknown.value.body["param"] == "model"  # type: ignore[index]


async def test_another_clients_response_is_not_found(served: Served) -> None:
    mine = await served.alice.responses.create(model="fake", input="A secret.")
    for probe in (mine.id, "resp_" + "0" * 32):
        with pytest.raises(openai.NotFoundError):
            await served.bob.responses.retrieve(probe)
        with pytest.raises(openai.NotFoundError) as refused:
            await served.bob.responses.create(
                model="fake", input="What was it?", previous_response_id=probe
            )
        assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert (await served.alice.responses.retrieve(mine.id)).output_text == mine.output_text
