"""``logprobs``/``top_logprobs`` on /v1/chat/completions, driven by the official openai
client over a real uvicorn: the fake engine's made-up values, the transformers engine's
checked against the model's own logits, the openai engine's relayed from its upstream.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai import AsyncOpenAI
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob
from tests.fakes.app_server import serving
from tests.fakes.ollama_server import FakeOllamaServer, OllamaAnswer
from tests.fakes.openai_server import FakeOpenAIServer, token_logprob
from tests.fakes.remote_engines import remote_models
from tests.unit.test_api import Harness, fake_model, make_config
from tests.unit.test_engine_transformers import (  # noqa: F401 - fixtures
    QUESTION,
    model_config,
    tiny_model_dir,
    tokenizer,
)
from transformers import AutoModelForCausalLM

from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines import create_engine
from chatfleet.serving.engines._logprobs import FLOOR, from_vllm

LN2 = math.log(2)
HELLO = [{"role": "user", "content": "say something"}]


async def ask(
    client: AsyncOpenAI, model: str, *, stream: bool, **fields: Any
) -> tuple[str, list[ChatCompletionTokenLogprob] | None]:
    """The answer's content and its logprobs (None when the answer had none)."""
    if not stream:
        completion = await client.chat.completions.create(
            model=model, messages=fields.pop("messages", HELLO), **fields
        )
        choice = completion.choices[0]
        return choice.message.content or "", (
            None if choice.logprobs is None else list(choice.logprobs.content or [])
        )
    chunks = await client.chat.completions.create(
        model=model, messages=fields.pop("messages", HELLO), stream=True, **fields
    )
    text, logprobs, any_logprobs = "", [], False
    async for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                any_logprobs = True
                logprobs += choice.logprobs.content or []
    return text, logprobs if any_logprobs else None


def client_of(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


# --- the fake engine --------------------------------------------------------------------


@pytest.fixture
async def fake_client() -> AsyncIterator[AsyncOpenAI]:
    h = Harness(
        make_config(
            fake_model("fake", reply_tokens=12),
            # Paced and reasoning first: streamed tokens arrive merged in batches.
            fake_model("paced", reply_tokens=40, thinking_tokens=4, tokens_per_second=400),
            fake_model("plain", logprobs=False),
        )
    )
    await h.start()
    async with serving(h.app) as url, client_of(url) as client:
        yield client


@pytest.mark.parametrize("stream", [False, True])
async def test_the_fake_reports_exact_made_up_logprobs(
    fake_client: AsyncOpenAI, stream: bool
) -> None:
    for model, tokens in (("fake", 12), ("paced", 40)):
        text, logprobs = await ask(fake_client, model, stream=stream, logprobs=True, top_logprobs=3)
        assert logprobs is not None and len(logprobs) == tokens
        # One entry per answer token, none for the reasoning: they spell the answer.
        assert "".join(t.token for t in logprobs) == text
        for t in logprobs:
            assert t.logprob == pytest.approx(-LN2)
            assert t.bytes == list(t.token.encode())
            assert [a.logprob for a in t.top_logprobs] == pytest.approx([-LN2, -2 * LN2, -3 * LN2])
            assert t.top_logprobs[0].token == t.token
            assert len({a.token for a in t.top_logprobs}) == 3
            assert all(a.bytes == list(a.token.encode()) for a in t.top_logprobs)


@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_come_only_when_asked(fake_client: AsyncOpenAI, stream: bool) -> None:
    text, logprobs = await ask(fake_client, "fake", stream=stream)
    assert text and logprobs is None
    text, logprobs = await ask(fake_client, "fake", stream=stream, logprobs=False)
    assert text and logprobs is None
    # top_logprobs 0 (or left out): each token's own logprob, no alternatives.
    for fields in ({"top_logprobs": 0}, {}):
        _, logprobs = await ask(fake_client, "fake", stream=stream, logprobs=True, **fields)
        assert logprobs is not None and len(logprobs) == 12
        assert all(t.top_logprobs == [] for t in logprobs)


@pytest.mark.parametrize(
    ("model", "fields", "param", "message"),
    [
        ("plain", {"logprobs": True}, "logprobs", "model plain (engine fake) does not support"),
        ("plain", {"logprobs": True, "top_logprobs": 2}, "logprobs", "does not support logprobs"),
        ("fake", {"top_logprobs": 2}, "top_logprobs", "used with logprobs set to true"),
        ("fake", {"logprobs": False, "top_logprobs": 2}, "top_logprobs", "logprobs set to true"),
        ("fake", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal"),
        ("fake", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "greater than"),
    ],
)
async def test_what_cannot_be_served_is_a_400_naming_the_parameter(
    fake_client: AsyncOpenAI, model: str, fields: dict[str, Any], param: str, message: str
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(fake_client, model, stream=stream, **fields)
        assert caught.value.status_code == 400
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["param"] == param and error["type"] == "invalid_request_error"
        assert message in error["message"]


# --- the openai engine: passed through -----------------------------------------------------


@pytest.fixture
async def remote_client(
    openai_upstream: FakeOpenAIServer, ollama_upstream: FakeOllamaServer
) -> AsyncIterator[AsyncOpenAI]:
    openai_upstream.reset()
    ollama_upstream.reset()
    remote, local = remote_models(openai_upstream, ollama_upstream)
    whole = ModelConfig(
        name="remote-whole",
        engine="openai",
        openai={**remote.openai.model_dump(), "stream": False},  # type: ignore[union-attr]
    )
    config = make_config(remote, whole, local)
    clients = {m.name: LocalEngineClient(create_engine(m)) for m in config.models}
    for engine_client in clients.values():
        await engine_client.start()
    async with serving(create_app(config, clients)) as url, client_of(url) as client:
        yield client


@pytest.mark.parametrize("upstream_streams", [True, False])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_openai_engine_relays_its_upstream_logprobs(
    remote_client: AsyncOpenAI,
    openai_upstream: FakeOpenAIServer,
    stream: bool,
    upstream_streams: bool,
) -> None:
    model = "remote" if upstream_streams else "remote-whole"
    messages = [{"role": "user", "content": "alpha beta gamma delta"}]
    text, logprobs = await ask(
        remote_client, model, stream=stream, messages=messages, logprobs=True, top_logprobs=2
    )
    assert text == "alpha beta gamma delta"  # the fake upstream echoes
    sent = openai_upstream.requests[-1].body
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    pieces = ["alpha", " beta", " gamma", " delta"]
    assert logprobs is not None
    assert [t.model_dump() for t in logprobs] == [
        token_logprob(p, i, 2) for i, p in enumerate(pieces)
    ]

    # Not asked, not sent: the upstream is not asked for what nobody reads.
    _, logprobs = await ask(remote_client, model, stream=stream, messages=messages)
    assert logprobs is None
    assert "logprobs" not in openai_upstream.requests[-1].body


@pytest.mark.parametrize("stream", [False, True])
async def test_the_ollama_engine_maps_ollamas_logprobs(
    remote_client: AsyncOpenAI, ollama_upstream: FakeOllamaServer, stream: bool
) -> None:
    messages = [{"role": "user", "content": "alpha beta gamma"}]
    text, logprobs = await ask(
        remote_client, "local", stream=stream, messages=messages, logprobs=True, top_logprobs=3
    )
    assert text == "alpha beta gamma"
    sent = ollama_upstream.requests[-1].body
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 3)
    assert logprobs is not None
    assert [t.model_dump() for t in logprobs] == [
        token_logprob(p, i, 3) for i, p in enumerate(["alpha", " beta", " gamma"])
    ]

    _, logprobs = await ask(remote_client, "local", stream=stream, messages=messages)
    assert logprobs is None
    assert "logprobs" not in ollama_upstream.requests[-1].body


@pytest.mark.parametrize(
    "logprobs",
    [
        "x",
        [{"token": 1, "logprob": -0.5}],
        [{"token": "a", "logprob": "-0.5"}],
        [{"token": "a", "logprob": -0.5, "bytes": [256]}],
        [{"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "b"}]}],
    ],
)
async def test_malformed_upstream_logprobs_are_a_502_not_a_crash(
    remote_client: AsyncOpenAI, ollama_upstream: FakeOllamaServer, logprobs: Any
) -> None:
    line = {"message": {"role": "assistant", "content": " b"}, "done": False}
    malformed = json.dumps({**line, "logprobs": logprobs}).encode() + b"\n"
    ollama_upstream.queue(
        OllamaAnswer(content=["a", " b"], malformed_after=1, malformed_line=malformed)
    )
    with pytest.raises(openai.APIStatusError) as caught:
        await ask(remote_client, "local", stream=False, logprobs=True)
    assert caught.value.status_code == 502
    assert "malformed" in str(caught.value.body)


# --- the transformers engine: the model's own log-probabilities -----------------------------


@pytest.fixture
async def tiny_client(tiny_model_dir: Path) -> AsyncIterator[AsyncOpenAI]:  # noqa: F811
    config = make_config(model_config(tiny_model_dir))
    client = LocalEngineClient(create_engine(config.models[0]))
    await client.start()
    async with serving(create_app(config, {"tiny": client})) as url, client_of(url) as c:
        yield c


def raw_logprobs(folder: Path, tokenizer: Any, answer_ids: list[int]) -> torch.Tensor:  # noqa: F811
    """log_softmax of the model's raw logits at each answer position (one forward pass)."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in QUESTION],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("stream", [False, True])
async def test_transformers_logprobs_are_the_raw_logits_log_softmax(
    tiny_client: AsyncOpenAI,
    tiny_model_dir: Path,  # noqa: F811
    tokenizer: Any,  # noqa: F811
    stream: bool,
) -> None:
    messages = [{"role": m.role, "content": m.content} for m in QUESTION]
    text, logprobs = await ask(
        tiny_client,
        "tiny",
        stream=stream,
        messages=messages,
        temperature=0,
        max_tokens=16,
        logprobs=True,
        top_logprobs=5,
    )
    assert logprobs is not None and len(logprobs) == 16  # this seed's model never ends
    answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(t.token for t in logprobs) == tokenizer.decode(answer_ids)
    expected = raw_logprobs(tiny_model_dir, tokenizer, answer_ids)
    assert len(answer_ids) == len(logprobs)
    penalized_differs = False
    for position, (t, token_id) in enumerate(zip(logprobs, answer_ids, strict=True)):
        row = expected[position]
        assert t.token == tokenizer.decode([token_id])
        # The raw distribution's, not the one the repetition penalty (1.2) reshaped.
        assert t.logprob == pytest.approx(float(row[token_id]), abs=1e-4)
        values, ids = row.topk(5)
        assert [a.token for a in t.top_logprobs] == [tokenizer.decode([i]) for i in ids.tolist()]
        assert [a.logprob for a in t.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        penalized_differs |= t.top_logprobs[0].token != t.token
    # Greedy under the penalty picked something other than the raw favourite at least
    # once: the logprobs above really are the raw ones, not the penalized ones.
    assert penalized_differs


# --- vLLM's shape, without vLLM ---------------------------------------------------------------


@dataclass
class VLLMLogprob:
    """vLLM's ``Logprob``: what its sampler reports for one token at one position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def test_vllm_logprobs_are_read_by_rank_and_decoded_where_vllm_did_not() -> None:
    positions = [
        # The sampled token first (vLLM's order), then the top 2 by rank.
        {
            9: VLLMLogprob(-3.0, 7, " far"),
            5: VLLMLogprob(-0.1, 1, " a"),
            7: VLLMLogprob(-2.5, 2, "b"),
        },
        # The sampled token among the top ones; one token vLLM did not detokenize.
        {7: VLLMLogprob(-0.2, 2, None), 3: VLLMLogprob(-0.1, 1, "c")},
        {4: VLLMLogprob(float("-inf"), 1, "d")},
    ]
    decoded = from_vllm([9, 7, 4], positions, 2, lambda token_id: f"<{token_id}>")
    assert [(t.token, t.logprob) for t in decoded] == [(" far", -3.0), ("<7>", -0.2), ("d", FLOOR)]
    assert [[(a.token, a.logprob) for a in t.top] for t in decoded] == [
        [(" a", -0.1), ("b", -2.5)],
        [("c", -0.1), ("<7>", -0.2)],
        [("d", FLOOR)],
    ]
    # top_logprobs 0: the sampled tokens alone.
    assert all(t.top == () for t in from_vllm([9], positions[:1], 0, str))
    assert from_vllm([1, 2], None, 2, str) == ()
