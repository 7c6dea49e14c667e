"""What the official ``openai`` client (and code written for OpenAI's API) asks of the
server beyond the parameters' own tests: ``client.models.retrieve``, OpenAI's neutral
values that ask for nothing, and 400s that name the parameter at fault."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from tests.fakes.app_server import serving
from tests.unit.test_api import fake_model, make_config
from tests.unit.test_tools import QUESTION, WEATHER

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines.fake import FakeEngine


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    config = make_config(
        fake_model("fake", reply_tokens=6), ModelConfig(name="smollm2", engine="transformers")
    )
    # smollm2 refuses what is asked here before its engine is reached: a fake stands in.
    engines = {m.name: LocalEngineClient(FakeEngine(fake_model(m.name))) for m in config.models}
    for engine in engines.values():
        await engine.start()
    async with (
        serving(create_app(config, engines)) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as c,
    ):
        yield c


async def test_a_model_is_retrieved_by_its_id(client: openai.AsyncOpenAI) -> None:
    listed = {m.id: m for m in (await client.models.list()).data}
    model = await client.models.retrieve("smollm2")
    assert model.model_dump() == listed["smollm2"].model_dump()
    assert model.model_extra is not None
    assert model.model_extra["capabilities"]["tools"] is False

    with pytest.raises(openai.NotFoundError) as unknown:
        await client.models.retrieve("gpt-4o")
    error = unknown.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


async def test_penalties_at_openais_defaults_ask_for_nothing(client: openai.AsyncOpenAI) -> None:
    # As OpenAI's playground writes its code; the fake engine has no penalties.
    r = await client.chat.completions.create(
        model="fake", messages=QUESTION, frequency_penalty=0, presence_penalty=0.0
    )
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", ["fake", "smollm2"])
async def test_a_penalty_other_than_zero_is_still_refused(
    client: openai.AsyncOpenAI, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=model, messages=QUESTION, presence_penalty=0.1)
    assert refused.value.param == "presence_penalty"
    assert f"model {model} " in refused.value.message


async def test_stream_options_need_a_stream(client: openai.AsyncOpenAI) -> None:
    # As OpenAI's API and vLLM's server answer: not a usage chunk silently never sent.
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="fake", messages=QUESTION, stream_options={"include_usage": True}
        )
    assert refused.value.param == "stream_options"
    assert "only allowed when stream is true" in refused.value.message


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        ({"tool_choice": "required"}, "only allowed when tools are specified"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice names 'x', which is not in tools",
        ),
    ],
)
async def test_a_tool_choice_without_its_tool_names_tool_choice(
    client: openai.AsyncOpenAI, request_: dict[str, Any], why: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="fake", messages=QUESTION, **request_)
    assert (refused.value.param, why in refused.value.message) == ("tool_choice", True)

    responses_request: dict[str, Any] = {"tool_choice": "required"}
    if "tools" in request_:
        tool = {"type": "function", **WEATHER["function"]}
        responses_request = {"tools": [tool], "tool_choice": {"type": "function", "name": "x"}}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model="fake", input="Weather?", store=False, **responses_request
        )
    assert (refused.value.param, why in refused.value.message) == ("tool_choice", True)


async def test_a_responses_text_without_a_format_is_free_text(client: openai.AsyncOpenAI) -> None:
    r = await client.responses.create(model="fake", input="Foxes?", text={}, store=False)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "text"
    # Not "text.format: Field required": the parameter at fault is the one named.
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model="fake", input="Foxes?", text={"verbosity": "low"}, store=False
        )
    assert refused.value.param == "text.verbosity"


async def test_a_responses_image_is_refused_as_not_served(client: openai.AsyncOpenAI) -> None:
    image = {"type": "input_image", "image_url": "https://example.com/fox.png", "detail": "auto"}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model="fake",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "?"}, image]}],
            store=False,
        )
    assert "content[1]: part type 'input_image' is not served" in refused.value.message
    assert refused.value.param is not None and refused.value.param.startswith("input.0")


async def test_an_empty_include_asks_for_nothing(client: openai.AsyncOpenAI) -> None:
    # OpenAI's Agents SDK sends include on every call, empty unless asked otherwise.
    r = await client.responses.create(model="fake", input="Foxes?", include=[], store=False)
    assert r.status == "completed"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model="fake", input="Foxes?", include=["reasoning.encrypted_content"], store=False
        )
    assert refused.value.param == "include"
    assert "only [] is served" in refused.value.message
