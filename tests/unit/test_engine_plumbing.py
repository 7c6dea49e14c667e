"""Coalescing, think-tag splitting and the fake engine."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator

import pytest

from chatfleet.serving.config import CoalesceConfig, ModelConfig
from chatfleet.serving.engines import ThinkSplitter, coalesce, create_engine, delay_for_load
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.errors import EngineError, ModelNotFound
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message


def request(text: str = "hello", max_tokens: int = 256) -> GenerationRequest:
    return GenerationRequest(model="fake", messages=[Message("user", text)], max_tokens=max_tokens)


async def paced(chunks: list[Chunk], delay: float) -> AsyncIterator[Chunk]:
    for chunk in chunks:
        await asyncio.sleep(delay)
        yield chunk


async def test_coalesce_sends_the_first_token_alone_then_flushes_on_count() -> None:
    chunks = [Chunk("text", f"t{i} ") for i in range(40)]
    batches = [b async for b in coalesce(paced(chunks, 0), max_tokens=16, max_delay=10)]
    assert [sum(c.tokens for c in b) for b in batches] == [1, 16, 16, 7]
    assert "".join(c.text for b in batches for c in b) == "".join(c.text for c in chunks)


async def test_coalesce_flushes_on_time() -> None:
    # 5 tokens 30 ms apart with a 10 ms deadline: each goes out alone.
    chunks = [Chunk("text", "x") for _ in range(5)]
    batches = [b async for b in coalesce(paced(chunks, 0.03), max_tokens=16, max_delay=0.01)]
    assert len(batches) == 5


async def test_coalesce_asks_a_delay_function_at_every_wait() -> None:
    # 6 tokens 30 ms apart: with 10 ms each goes alone; once the delay becomes 200 ms,
    # the rest wait for each other.
    chunks = [Chunk("text", "x") for _ in range(6)]
    delays = iter([0.01, 0.01] + [0.2] * 100)
    batches = [
        b
        async for b in coalesce(paced(chunks, 0.03), max_tokens=16, max_delay=lambda: next(delays))
    ]
    assert [sum(c.tokens for c in b) for b in batches][:2] == [1, 1]
    assert len(batches) < 6
    assert sum(c.tokens for b in batches for c in b) == 6


def test_coalesce_does_not_spin_on_uvloops_early_timers() -> None:
    # uvloop fires timers on a 1 ms clock, up to 1 ms early: waiting again for the
    # remainder would spin with zero timeouts until the deadline. Each pass of the
    # wait loop asks for the delay once, so the asks per batch count the passes.
    uvloop = pytest.importorskip("uvloop")
    asks = 0

    def delay() -> float:
        nonlocal asks
        asks += 1
        return 0.02133

    async def main() -> int:
        chunks = [Chunk("text", "x") for _ in range(30)]
        return len([b async for b in coalesce(paced(chunks, 1 / 60), max_delay=delay)])

    batches = uvloop.run(main())
    assert batches >= 10
    assert asks <= 3 * batches


async def test_coalesce_reads_a_paced_source_once_per_batch() -> None:
    # The fake engine decodes on its own schedule (200 tokens/s): the pump leaves it
    # unread until a batch is due, then gets every token due so far in one chunk.
    engine = FakeEngine(
        ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 40, "tokens_per_second": 200})
    )
    reads = 0

    async def counted() -> AsyncIterator[Chunk]:
        nonlocal reads
        async for chunk in engine.stream(request()):
            reads += 1
            yield chunk

    batches = [
        b async for b in coalesce(counted(), max_tokens=256, max_delay=0.05, runs_ahead=True)
    ]
    eager = [c async for c in engine.stream(request())]
    assert "".join(c.text for b in batches for c in b) == "".join(c.text for c in eager)
    assert sum(c.tokens for b in batches for c in b) == 40
    assert len(batches) <= 12  # 200 ms of tokens in 50 ms batches, not one per token
    assert reads <= 2 * len(batches) + 2  # not one read per token (41 chunks read eagerly)


async def test_coalesce_does_not_hold_the_end_of_a_stream_cut_at_its_limit() -> None:
    # 40 tokens at 200/s take 0.2 s; batches may wait 5 s. Once the stream is due to
    # reach its max_tokens within the batch, the pump reads on, and the end goes out
    # as it comes instead of 5 s later.
    engine = FakeEngine(
        ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 40, "tokens_per_second": 200})
    )

    async def run(limit: int | None) -> list[list[Chunk]]:
        stream = coalesce(
            engine.stream(request(max_tokens=40)),
            max_tokens=256,
            max_delay=5,
            runs_ahead=True,
            limit=limit,
        )
        return [b async for b in stream]

    batches = await asyncio.wait_for(run(40), timeout=2.5)
    assert sum(c.tokens for b in batches for c in b) == 40
    assert batches[-1][-1].finish_reason == "stop"
    with pytest.raises(TimeoutError):  # without the limit, the end waits for the batch
        await asyncio.wait_for(run(None), timeout=2.5)


async def test_coalesce_reads_other_sources_eagerly() -> None:
    # A source that starts each chunk's 10 ms only when read: leaving it unread for
    # 50 ms would send one token per batch.
    chunks = [Chunk("text", "x") for _ in range(20)]
    batches = [b async for b in coalesce(paced(chunks, 0.01), max_tokens=256, max_delay=0.05)]
    assert sum(c.tokens for b in batches for c in b) == 20
    assert len(batches) <= 10


def test_delay_grows_with_the_streams_a_replica_carries() -> None:
    config = CoalesceConfig(max_delay_ms=20, max_messages_per_s=3000, max_delay_under_load_ms=60)
    assert delay_for_load(config, 0) == 0.02
    assert delay_for_load(config, 60) == 0.02  # 60 streams x 50 messages/s = 3000/s
    assert delay_for_load(config, 120) == pytest.approx(0.04)  # kept near 3000 messages/s
    assert delay_for_load(config, 1000) == 0.06  # never past the cap


def test_by_default_a_loaded_replica_sends_a_batch_per_stream_every_150_ms() -> None:
    config = CoalesceConfig()
    assert delay_for_load(config, 1) == 0.02  # a token at most 20 ms behind
    assert delay_for_load(config, 30) == 0.02  # 30 streams x 50 messages/s = 1500/s
    assert delay_for_load(config, 128) == pytest.approx(128 / 1500)
    assert delay_for_load(config, 256) == 0.15


def test_the_delay_under_load_cannot_undercut_the_base_delay() -> None:
    with pytest.raises(ValueError, match="max_delay_under_load_ms"):
        CoalesceConfig(max_delay_ms=50, max_delay_under_load_ms=40)


async def test_coalesce_keeps_kinds_apart_and_final_chunk() -> None:
    chunks = [Chunk("thinking", "a"), Chunk("thinking", "b"), Chunk("text", "c")]
    chunks.append(Chunk("text", "", tokens=0, finish_reason="stop"))
    first, batch = [b async for b in coalesce(paced(chunks, 0), max_tokens=16, max_delay=1)]
    assert [(c.kind, c.text) for c in first] == [("thinking", "a")]
    assert [(c.kind, c.text) for c in batch] == [("thinking", "b"), ("text", "c")]
    assert batch[-1].finish_reason == "stop"


async def test_coalesce_delivers_text_before_an_engine_error() -> None:
    async def failing() -> AsyncIterator[Chunk]:
        yield Chunk("text", "first")
        yield Chunk("text", " said")
        raise EngineError("boom")

    got: list[list[Chunk]] = []
    with pytest.raises(EngineError):
        async for batch in coalesce(failing(), max_tokens=16, max_delay=1):
            got.append(batch)
    assert got == [[Chunk("text", "first")], [Chunk("text", " said")]]


async def test_coalesce_wakes_once_per_batch_at_full_speed() -> None:
    engine = FakeEngine(ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 256}))
    batches = [b async for b in coalesce(engine.stream(request()), max_tokens=64, max_delay=1)]
    assert [sum(c.tokens for c in b) for b in batches] == [1, 64, 64, 64, 63]
    assert batches[-1][-1].finish_reason == "stop"


async def test_closing_coalesce_stops_the_engine() -> None:
    engine = FakeEngine(
        ModelConfig(
            name="fake", engine="fake", fake={"reply_tokens": 1000, "tokens_per_second": 200}
        )
    )
    stream = coalesce(engine.stream(request()), max_tokens=4, max_delay=0.01)
    await anext(stream)
    assert engine.active == 1
    await stream.aclose()
    assert engine.active == 0
    assert len(engine.cancelled) == 1


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>plan</think>answer"],
        ["<thi", "nk>pl", "an</th", "ink>ans", "wer"],
        ["<", "t", "h", "i", "n", "k", ">", "plan", "<", "/think>", "answer"],
    ],
)
def test_think_splitter_handles_split_tags(pieces: list[str]) -> None:
    splitter = ThinkSplitter()
    parts = [p for piece in pieces for p in splitter.feed(piece)] + splitter.flush()
    thinking = "".join(t for k, t in parts if k == "thinking")
    text = "".join(t for k, t in parts if k == "text")
    assert (thinking, text) == ("plan", "answer")


def test_think_splitter_passes_plain_text_and_lone_brackets() -> None:
    splitter = ThinkSplitter()
    parts = splitter.feed("a < b and <b>bold</b>") + splitter.flush()
    assert "".join(t for _, t in parts) == "a < b and <b>bold</b>"
    assert {k for k, _ in parts} == {"text"}


def test_think_splitter_can_start_inside_reasoning() -> None:
    # Some chat templates open <think> in the prompt; the model emits only </think>.
    splitter = ThinkSplitter(start_in_thinking=True)
    assert splitter.feed("hmm</think>yes") == [("thinking", "hmm"), ("text", "yes")]


async def test_fake_engine_is_deterministic_and_counts() -> None:
    model = ModelConfig(name="fake", engine="fake", fake={"reply_tokens": 10, "thinking_tokens": 3})
    engine = create_engine(model)
    first = [c async for c in engine.stream(request("same"))]
    second = [c async for c in engine.stream(request("same"))]
    assert first == second
    assert [c.kind for c in first[:3]] == ["thinking"] * 3
    assert first[-1].finish_reason == "stop"
    assert first[-1].usage is not None and first[-1].usage.completion_tokens == 13


async def test_fake_engine_paces_and_fails_on_request() -> None:
    model = ModelConfig(
        name="fake", engine="fake", fake={"reply_tokens": 10, "fail_after_tokens": 4}
    )
    engine = create_engine(model)
    got = []
    with pytest.raises(EngineError, match="after 4 tokens"):
        async for chunk in engine.stream(request()):
            got.append(chunk)
    assert len(got) == 4


def test_errors_survive_pickling_for_ray() -> None:
    err = pickle.loads(pickle.dumps(ModelNotFound("no such model", param="model")))
    assert isinstance(err, ModelNotFound)
    assert (err.message, err.param, err.status_code) == ("no such model", "model", 404)
