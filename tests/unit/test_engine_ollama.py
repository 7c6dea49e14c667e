"""OllamaEngine against a real local Ollama-like server (tests/fakes/ollama_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from tests.fakes.local_server import wait_until
from tests.fakes.ollama_server import Failure, FakeOllamaServer, OllamaAnswer
from tests.fakes.ports import free_port

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines import create_engine
from chatfleet.serving.engines.ollama import OllamaEngine
from chatfleet.serving.errors import EngineUnavailable, UpstreamError
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message, Usage


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOllamaServer]:
    with FakeOllamaServer() as running:
        yield running


@pytest.fixture
def upstream(server: FakeOllamaServer) -> FakeOllamaServer:
    server.reset()
    return server


def model_config(upstream: FakeOllamaServer, **settings: Any) -> ModelConfig:
    ollama = {"base_url": upstream.url, "model": "qwen3:0.6b", "timeout_s": 10.0, **settings}
    return ModelConfig(name="local", engine="ollama", ollama=ollama)


@contextlib.asynccontextmanager
async def running(upstream: FakeOllamaServer, **settings: Any) -> AsyncIterator[OllamaEngine]:
    engine = OllamaEngine(model_config(upstream, **settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture
async def engine(upstream: FakeOllamaServer) -> AsyncIterator[OllamaEngine]:
    async with running(upstream) as started:
        yield started


def ask(text: str = "Say hello", **fields: Any) -> GenerationRequest:
    return GenerationRequest(model="local", messages=[Message("user", text)], **fields)


async def collect(engine: OllamaEngine, request: GenerationRequest | None = None) -> list[Chunk]:
    return [chunk async for chunk in engine.stream(request or ask())]


def joined(chunks: list[Chunk], kind: str) -> str:
    return "".join(c.text for c in chunks if c.kind == kind)


# --- streaming ---------------------------------------------------------------------------


async def test_streams_content_then_done_with_ollama_counts(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["Hel", "lo", " world"], prompt_eval_count=26))

    chunks = await collect(engine)

    assert [(c.kind, c.text, c.tokens) for c in chunks[:-1]] == [
        ("text", "Hel", 1),
        ("text", "lo", 1),
        ("text", " world", 1),
    ]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert (last.text, last.finish_reason, last.usage) == ("", "stop", Usage(26, 3))
    assert upstream.disconnects == []  # a finished answer is not a client gone away


async def test_request_body_is_an_ollama_chat_request(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    request = GenerationRequest(
        model="local",
        messages=[Message("system", "Be brief."), Message("user", "Hi")],
        max_tokens=64,
        temperature=0.3,
        top_p=0.8,
    )
    await collect(engine, request)

    (seen,) = upstream.requests
    assert (seen.method, seen.path) == ("POST", "/api/chat")
    assert seen.body == {
        "model": "qwen3:0.6b",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "stream": True,
        "options": {"temperature": 0.3, "top_p": 0.8, "num_predict": 64},
    }


async def test_configured_think_keep_alive_and_options_are_sent(upstream: FakeOllamaServer) -> None:
    async with running(
        upstream, think=True, keep_alive="10m", options={"num_ctx": 8192, "top_k": 20}
    ) as engine:
        await collect(engine, ask(seed=42, stop=["###"], temperature=0.1))

    body = upstream.requests[0].body
    assert body["think"] is True
    assert body["keep_alive"] == "10m"
    assert body["options"] == {
        "num_ctx": 8192,
        "top_k": 20,
        "temperature": 0.1,
        "top_p": 1.0,
        "num_predict": 256,
        "seed": 42,
        "stop": ["###"],
    }


async def test_thinking_field_becomes_thinking_chunks(upstream: FakeOllamaServer) -> None:
    upstream.queue(OllamaAnswer(thinking=["The user", " greets."], content=["Hi", "!"]))

    async with running(upstream, think=True) as engine:
        chunks = await collect(engine)

    assert [(c.kind, c.text) for c in chunks[:-1]] == [
        ("thinking", "The user"),
        ("thinking", " greets."),
        ("text", "Hi"),
        ("text", "!"),
    ]
    assert chunks[-1].usage == Usage(9, 4)


async def test_inline_think_tags_are_split_when_think_is_unset(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(thinking=["Plan", " it."], content=["Done", "."]))

    chunks = await collect(engine)

    assert "think" not in upstream.requests[0].body
    assert joined(chunks, "thinking") == "Plan it."
    assert joined(chunks, "text") == "Done."
    assert "<" not in "".join(c.text for c in chunks)


async def test_tags_cut_across_lines_still_count_every_token(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["<thi", "nk>Plan", " it.</th", "ink>", "Done", "."]))

    chunks = await collect(engine)

    assert joined(chunks, "thinking") == "Plan it."
    assert joined(chunks, "text") == "Done."
    assert sum(c.tokens for c in chunks) == 6


async def test_think_false_gives_no_thinking(upstream: FakeOllamaServer) -> None:
    upstream.queue(OllamaAnswer(thinking=["hidden"], content=["Just", " this"]))

    async with running(upstream, think=False) as engine:
        chunks = await collect(engine)

    assert upstream.requests[0].body["think"] is False
    assert [c.kind for c in chunks] == ["text"] * len(chunks)
    assert joined(chunks, "text") == "Just this"


async def test_num_predict_reached_finishes_with_length(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["a", "b", "c", "d"]))

    chunks = await collect(engine, ask(max_tokens=3))

    assert joined(chunks, "text") == "abc"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == Usage(9, 3)


@pytest.mark.parametrize("done_reason", ["stop", "load", "unload", "something-new"])
async def test_other_done_reasons_map_to_stop(
    engine: OllamaEngine, upstream: FakeOllamaServer, done_reason: str
) -> None:
    upstream.queue(OllamaAnswer(content=["x"], done_reason=done_reason))
    chunks = await collect(engine)
    assert chunks[-1].finish_reason == "stop"


async def test_missing_counts_are_estimated(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(
        OllamaAnswer(content=["one", " two", " three"], prompt_eval_count=None, eval_count=None)
    )

    chunks = await collect(engine, ask("a prompt that Ollama had cached already"))

    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 3
    assert usage.prompt_tokens > 0


async def test_slow_stream_yields_each_chunk_as_it_arrives(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["a", "b", "c"], delay_s=0.3))
    arrivals = []
    start = time.monotonic()
    async for chunk in engine.stream(ask()):
        arrivals.append((chunk.text, time.monotonic() - start))

    assert [text for text, _ in arrivals] == ["a", "b", "c", ""]
    assert arrivals[1][1] - arrivals[0][1] > 0.15  # nothing is buffered


async def test_lines_cut_across_reads_are_reassembled(
    upstream: FakeOllamaServer,
) -> None:
    upstream.queue(OllamaAnswer(thinking=["why"], content=["one", " two"], split_lines=True))

    async with running(upstream, think=True) as engine:
        chunks = await collect(engine)

    assert [(c.kind, c.text) for c in chunks[:-1]] == [
        ("thinking", "why"),
        ("text", "one"),
        ("text", " two"),
    ]
    assert chunks[-1].usage == Usage(9, 3)


async def test_concurrent_streams_share_one_engine(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    results = await asyncio.gather(*(collect(engine, ask(f"echo {i} back")) for i in range(4)))
    assert [joined(chunks, "text") for chunks in results] == [f"echo {i} back" for i in range(4)]


# --- errors ------------------------------------------------------------------------------


async def test_unknown_model_is_an_upstream_error_with_ollamas_words(
    upstream: FakeOllamaServer,
) -> None:
    async with running(upstream, model="mistral:7b") as engine:
        with pytest.raises(UpstreamError, match="HTTP 404: model 'mistral:7b' not found"):
            await collect(engine)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (Failure(500, {"error": "llama runner process has terminated"}), "HTTP 500: llama runner"),
        (Failure(400, {"error": "invalid options"}), "HTTP 400: invalid options"),
        (Failure(502, "<html>Bad Gateway</html>"), "HTTP 502: <html>Bad Gateway</html>"),
    ],
)
async def test_http_errors_are_upstream_errors(
    engine: OllamaEngine, upstream: FakeOllamaServer, failure: Failure, expected: str
) -> None:
    upstream.queue(failure)
    with pytest.raises(UpstreamError, match=expected):
        await collect(engine)


async def test_error_line_mid_stream_is_an_upstream_error(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["par", "tial", "never"], error_after=2))
    received: list[Chunk] = []

    with pytest.raises(UpstreamError, match="an error was encountered while running the model"):
        async for chunk in engine.stream(ask()):
            received.append(chunk)

    assert joined(received, "text") == "partial"


@pytest.mark.parametrize(
    "line",
    [
        b'{"message": {"role": "assistant", "content": \n',
        b"42\n",
        b'{"message": "text", "done": false}\n',
        b'{"message": {"role": "assistant", "content": 5}, "done": false}\n',
    ],
    ids=["not-json", "not-an-object", "bad-message", "bad-content"],
)
async def test_malformed_line_is_an_upstream_error(
    engine: OllamaEngine, upstream: FakeOllamaServer, line: bytes
) -> None:
    upstream.queue(OllamaAnswer(content=["ok", "then"], malformed_after=1, malformed_line=line))
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(engine)


async def test_stream_ending_without_done_is_an_upstream_error(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["cut", " short"], send_done=False))
    with pytest.raises(UpstreamError, match="before the answer was done"):
        await collect(engine)


async def test_connection_cut_mid_stream_is_an_upstream_error(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["one", " two", " three"], drop_after=2))
    received: list[Chunk] = []

    with pytest.raises(UpstreamError, match="connection lost"):
        async for chunk in engine.stream(ask()):
            received.append(chunk)

    assert joined(received, "text") == "one two"


async def test_read_timeout_is_an_upstream_error(upstream: FakeOllamaServer) -> None:
    upstream.queue(OllamaAnswer(content=["quick", " then", " stuck"], delay_s=2.0))

    async with running(upstream, timeout_s=0.3) as engine:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3s"):
            await collect(engine)


async def test_unreachable_server_is_engine_unavailable_without_credentials() -> None:
    model = ModelConfig(
        name="local",
        engine="ollama",
        ollama={"base_url": f"http://ops:s3cret@127.0.0.1:{free_port()}", "model": "qwen3:0.6b"},
    )
    engine = OllamaEngine(model)
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="unreachable") as caught:
            await collect(engine)
    finally:
        await engine.close()

    assert "127.0.0.1" in str(caught.value)
    assert "s3cret" not in str(caught.value)


# --- cancellation ------------------------------------------------------------------------


async def test_closing_the_stream_early_disconnects_from_ollama(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=[f"w{i} " for i in range(50)], delay_s=0.1))
    stream = engine.stream(ask())

    first = [await anext(stream), await anext(stream)]
    started = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]

    assert [c.text for c in first] == ["w0 ", "w1 "]
    await wait_until(lambda: len(upstream.disconnects) == 1, within_s=3)
    assert time.monotonic() - started < 2  # far sooner than the 5 s the answer would take


async def test_cancelling_the_consumer_disconnects_from_ollama(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=[f"w{i} " for i in range(50)], delay_s=0.1))
    received: list[Chunk] = []

    async def consume() -> None:
        async for chunk in engine.stream(ask()):
            received.append(chunk)

    task = asyncio.create_task(consume())
    await wait_until(lambda: len(received) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_until(lambda: len(upstream.disconnects) == 1, within_s=3)


async def test_engine_keeps_working_after_a_cancelled_stream(
    engine: OllamaEngine, upstream: FakeOllamaServer
) -> None:
    upstream.queue(OllamaAnswer(content=["x"] * 20, delay_s=0.05), OllamaAnswer(content=["fine"]))
    stream = engine.stream(ask())
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_until(lambda: len(upstream.disconnects) == 1)

    chunks = await collect(engine)

    assert joined(chunks, "text") == "fine"


# --- wiring ------------------------------------------------------------------------------


async def test_create_engine_builds_the_ollama_engine(upstream: FakeOllamaServer) -> None:
    engine = create_engine(model_config(upstream))
    assert isinstance(engine, OllamaEngine)
    assert engine.name == "local"
