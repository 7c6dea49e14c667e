"""The Responses API on real Ray Serve, through the official client: a conversation carried
by ``previous_response_id`` over the store the ingress replica opens (streamed and not),
its input items and a deletion, and the fake engine's function-call loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from tests.unit.test_responses import WEATHER

from chatfleet.serving.config import AppConfig, ModelConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def client(ray_serve: Any, tmp_path_factory: pytest.TempPathFactory) -> openai.OpenAI:
    folder: Path = tmp_path_factory.mktemp("ray-responses")
    config = AppConfig(
        auth={"enabled": False},
        store={"data_dir": str(folder)},
        models=[ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 6})],
    )
    url = ray_serve.deploy(config, "responses")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _prompt_tokens(*texts: str) -> int:
    return sum(len(t.split()) + 4 for t in texts)  # as the fake engine counts a prompt


def test_a_conversation_by_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(model="fake", input="My name is Ada.")
    assert first.status == "completed" and len(first.output_text.split()) == 6

    # The second turn streamed: the SDK's helper reads the events into the response.
    with client.responses.stream(
        model="fake", input="What is my name?", previous_response_id=first.id
    ) as stream:
        kinds = [event.type for event in stream]
        second = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert len(second.output_text.split()) == 6

    third = client.responses.create(
        model="fake", input="And my last name?", previous_response_id=second.id
    )
    # The fake counts the prompt it was given: both earlier turns were in it.
    assert third.usage is not None
    assert third.usage.input_tokens == _prompt_tokens(
        "My name is Ada.",
        first.output_text,
        "What is my name?",
        second.output_text,
        "And my last name?",
    )
    assert client.responses.retrieve(third.id).output_text == third.output_text

    # Its own input is listed; deleting the first response leaves the later ones whole.
    (item,) = client.responses.input_items.list(third.id).data
    assert item.type == "message" and item.content[0].text == "And my last name?"
    deleted = client.responses.with_raw_response.delete(first.id).http_response.json()
    assert deleted == {"id": first.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert client.responses.retrieve(third.id).output_text == third.output_text


def test_the_function_call_loop(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="fake", input="What is the weather in Paris?", tools=[WEATHER], stream=True
        )
    )
    final = events[-1]
    assert final.type == "response.completed"
    (call,) = final.response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city"}

    answer = client.responses.create(
        model="fake",
        previous_response_id=final.response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}],
        tools=[WEATHER],
    )
    assert answer.output_text == "get_weather returned 18 degrees"
