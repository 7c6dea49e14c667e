"""vLLM's features on real Ray Serve, driven by the official openai client over HTTP.

The app chatfleet deploys in production (ingress replica, engine replica running vLLM
with its engine-core subprocess inside a Ray actor) on a private local Ray, started
for this module only: structured output, a streamed forced tool call, and logprobs,
each crossing the replicas as it would in a cluster. The tiny random Llama comes
from conftest. Run in the vllm environment only (see .ci/vllm-env.sh).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from tests.fakes.closed_tools import WEATHER
from tests.fakes.ray_serve import private_ray_serve
from tests.fakes.required import missing

from chatfleet.serving.config import AppConfig, ModelConfig

pytest.importorskip("vllm.sampling_params")
try:
    from ray import serve
except ImportError:
    # The vllm environment installs ray[serve]: without it, the env is an old build.
    missing("ray[serve] is not installed: rebuild with .ci/vllm-env.sh", module=True)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

APP = "vllm"
# Only closed choices: a random model left free in a string or a number would write on
# until max_tokens, and a truncated document proves nothing about the schema.
PICK: dict[str, Any] = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["colour", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def base_url(tiny_model: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on a Ray of its own: the main tier's session Ray (tests/integration) is
    another environment's, and this one must not outlive the module's vLLM replica."""
    # As `chatfleet serve` runs (tests/fakes/ray_serve.py); the vLLM settings conftest
    # put in this process's environment reach the workers with it.
    with private_ray_serve(
        tmp_path_factory.mktemp("ray-data"),
        object_store_memory=200 * 1024**2,  # chunks are small; the default takes GiBs
    ) as port:
        config = AppConfig(
            auth={"enabled": False},
            ingress={"num_cpus": 0.1, "num_replicas": 1},  # this tier is about the engine
            models=[tiny_model.model_copy(update={"num_cpus": 0.5})],
        )
        from chatfleet.serving.app import build_app

        began = time.perf_counter()
        # Blocks until the engine replica's vLLM is up (13-120 s on a loaded 2-core box).
        serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
        print(f"\nvLLM app on Ray Serve running in {time.perf_counter() - began:.1f} s")
        yield f"http://127.0.0.1:{port}/{APP}"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=180)


def test_a_json_schema_answer_follows_the_schema(client: openai.OpenAI) -> None:
    request: Any = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Pick a colour."}],
        "temperature": 0,
    }
    free = client.chat.completions.create(max_tokens=48, **request)
    constrained = client.chat.completions.create(
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": PICK}},
        **request,
    )

    choice = constrained.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), PICK)
    # The same random model unconstrained writes no such document: the replica's vLLM
    # got the schema, not just the prompt.
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content or "")


def test_a_named_tool_choice_streams_a_call_valid_against_the_tool(
    client: openai.OpenAI,
) -> None:
    request: Any = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 80,
    }
    pieces: list[Any] = []
    finish, content = None, ""
    stream = client.chat.completions.create(stream=True, **request)
    for chunk in stream:
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish

    assert finish == "tool_calls"
    assert not content
    first, *rest = pieces
    assert first.index == 0 and first.id and first.function is not None
    assert first.function.name == "get_weather"
    assert rest and all(p.index == 0 and p.id is None for p in rest)  # incremental arguments
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function is not None)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_logprobs_give_one_entry_per_token_with_two_alternatives(
    client: openai.OpenAI,
) -> None:
    request: Any = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "alpha beta gamma delta"}],
        "temperature": 0,
        "max_tokens": 16,
        "logprobs": True,
        "top_logprobs": 2,
    }
    completion = client.chat.completions.create(**request)

    choice = completion.choices[0]
    assert completion.usage is not None and choice.logprobs is not None
    entries = choice.logprobs.content or []
    assert entries and len(entries) == completion.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        # Greedy: the sampled token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)

    streamed: list[Any] = []
    text = ""
    for chunk in client.chat.completions.create(stream=True, **request):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                streamed += c.logprobs.content or []
    assert len(streamed) == len(entries) and "".join(e.token for e in streamed) == text
    assert all(len(e.top_logprobs) == 2 for e in streamed)
