"""OpenAIEngine against a real local OpenAI-compatible server (tests/fakes/openai_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from tests.fakes.local_server import wait_until
from tests.fakes.openai_server import Answer, Failure, FakeOpenAIServer
from tests.fakes.ports import free_port

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines import create_engine
from chatfleet.serving.engines.openai_api import OpenAIEngine
from chatfleet.serving.errors import EngineUnavailable, UpstreamError
from chatfleet.serving.protocol import Chunk, GenerationRequest, Message, Usage

API_KEY = "sk-test-7f3c9a1e5b2d4c6e8a0f"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=API_KEY) as running:
        yield running


@pytest.fixture
def upstream(server: FakeOpenAIServer) -> FakeOpenAIServer:
    server.reset()
    server.api_key = API_KEY
    return server


def model_config(upstream: FakeOpenAIServer, **settings: Any) -> ModelConfig:
    openai = {
        "base_url": upstream.base_url,
        "model": "gpt-test",
        "api_key": API_KEY,
        "max_retries": 0,
        "timeout_s": 10.0,
        **settings,
    }
    return ModelConfig(name="remote", engine="openai", openai=openai)


@contextlib.asynccontextmanager
async def running(upstream: FakeOpenAIServer, **settings: Any) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(model_config(upstream, **settings))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture
async def engine(upstream: FakeOpenAIServer) -> AsyncIterator[OpenAIEngine]:
    async with running(upstream) as started:
        yield started


def ask(text: str = "Say hello", **fields: Any) -> GenerationRequest:
    return GenerationRequest(model="remote", messages=[Message("user", text)], **fields)


async def collect(engine: OpenAIEngine, request: GenerationRequest | None = None) -> list[Chunk]:
    return [chunk async for chunk in engine.stream(request or ask())]


def joined(chunks: list[Chunk], kind: str) -> str:
    return "".join(c.text for c in chunks if c.kind == kind)


# --- streaming ---------------------------------------------------------------------------


async def test_streams_text_then_finish_and_upstream_usage(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=["Hel", "lo", " world"], usage=(17, 3)))

    chunks = await collect(engine, ask(max_tokens=50, temperature=0.2, top_p=0.9))

    assert [(c.kind, c.text) for c in chunks[:-1]] == [
        ("text", "Hel"),
        ("text", "lo"),
        ("text", " world"),
    ]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert (last.text, last.finish_reason, last.usage) == ("", "stop", Usage(17, 3))
    assert sum(c.tokens for c in chunks) == 3
    assert upstream.disconnects == []  # a finished answer is not a client gone away


async def test_request_is_sent_as_a_streamed_chat_completion_with_bearer_key(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    request = GenerationRequest(
        model="remote",
        messages=[Message("system", "Be brief."), Message("user", "Hi")],
        max_tokens=64,
        temperature=0.3,
        top_p=0.8,
        stop=["\n\n"],
        seed=7,
    )
    await collect(engine, request)

    (seen,) = upstream.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    assert seen.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.8,
        "stop": ["\n\n"],
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_extra_body_is_merged_into_every_request(upstream: FakeOpenAIServer) -> None:
    async with running(upstream, extra_body={"top_k": 20, "repetition_penalty": 1.1}) as engine:
        await collect(engine)
    assert upstream.requests[0].body["top_k"] == 20
    assert upstream.requests[0].body["repetition_penalty"] == 1.1


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_field_becomes_thinking_chunks(
    engine: OpenAIEngine, upstream: FakeOpenAIServer, field: str
) -> None:
    upstream.queue(
        Answer(reasoning=["The user", " greets."], content=["Hi", "!"], reasoning_field=field)
    )

    chunks = await collect(engine)

    assert [(c.kind, c.text) for c in chunks[:-1]] == [
        ("thinking", "The user"),
        ("thinking", " greets."),
        ("text", "Hi"),
        ("text", "!"),
    ]
    assert chunks[-1].usage == Usage(11, 4)


async def test_inline_think_tags_are_split_even_across_pieces(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=["<thi", "nk>Plan", " it.</th", "ink>", "Done", "."]))

    chunks = await collect(engine)

    assert joined(chunks, "thinking") == "Plan it."
    assert joined(chunks, "text") == "Done."
    assert "<" not in "".join(c.text for c in chunks)
    # Every upstream piece is counted once, even those held back in a split tag.
    assert sum(c.tokens for c in chunks) == 6


async def test_max_tokens_reached_finishes_with_length(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=["a", "b", "c", "d", "e"]))

    chunks = await collect(engine, ask(max_tokens=2))

    assert joined(chunks, "text") == "ab"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == Usage(11, 2)


@pytest.mark.parametrize("upstream_reason", ["content_filter", "function_call", "stop"])
async def test_other_finish_reasons_map_to_stop(
    engine: OpenAIEngine, upstream: FakeOpenAIServer, upstream_reason: str
) -> None:
    upstream.queue(Answer(content=["x"], finish_reason=upstream_reason))
    chunks = await collect(engine)
    assert chunks[-1].finish_reason == "stop"


async def test_usage_is_counted_when_upstream_reports_none(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(reasoning=["hmm"], content=["one", " two", " three"], usage=None))

    chunks = await collect(engine, ask("a prompt of some forty characters or so."))

    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 4
    assert usage.prompt_tokens > 0


async def test_slow_stream_yields_each_chunk_as_it_arrives(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=["a", "b", "c"], delay_s=0.3))
    arrivals = []
    start = time.monotonic()
    async for chunk in engine.stream(ask()):
        arrivals.append((chunk.text, time.monotonic() - start))

    assert [text for text, _ in arrivals] == ["a", "b", "c", ""]
    # "a" arrives before the server has even produced "b": nothing is buffered.
    assert arrivals[1][1] - arrivals[0][1] > 0.15


async def test_events_cut_across_reads_and_sse_comments_are_handled(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(
        Answer(reasoning=["why"], content=["one", " two"], split_events=True, comments=True)
    )

    chunks = await collect(engine)

    assert [(c.kind, c.text) for c in chunks[:-1]] == [
        ("thinking", "why"),
        ("text", "one"),
        ("text", " two"),
    ]
    assert chunks[-1].finish_reason == "stop"


async def test_concurrent_streams_share_one_engine(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    results = await asyncio.gather(*(collect(engine, ask(f"echo {i} back")) for i in range(4)))
    assert [joined(chunks, "text") for chunks in results] == [f"echo {i} back" for i in range(4)]


# --- non-streaming upstream --------------------------------------------------------------


async def test_non_streaming_makes_one_call_and_yields_the_answer_whole(
    upstream: FakeOpenAIServer,
) -> None:
    upstream.queue(Answer(reasoning=["Think", "ing."], content=["Hello", " there"], usage=(5, 4)))

    async with running(upstream, stream=False) as engine:
        chunks = await collect(engine)

    assert [(c.kind, c.text) for c in chunks] == [
        ("thinking", "Thinking."),
        ("text", "Hello there"),
    ]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage == Usage(5, 4)
    assert sum(c.tokens for c in chunks) == 4
    (seen,) = upstream.requests
    assert "stream" not in seen.body or seen.body["stream"] is False
    assert "stream_options" not in seen.body


async def test_non_streaming_splits_inline_think_tags_and_caps_length(
    upstream: FakeOpenAIServer,
) -> None:
    upstream.queue(Answer(content=["<think>", "why", "</think>", "because", " so", " much"]))

    async with running(upstream, stream=False) as engine:
        chunks = await collect(engine, ask(max_tokens=5))

    assert [(c.kind, c.text) for c in chunks] == [("thinking", "why"), ("text", "because so")]
    assert chunks[-1].finish_reason == "length"


# --- credentials -------------------------------------------------------------------------


async def test_api_key_from_environment_variable(
    upstream: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATFLEET_TEST_UPSTREAM_KEY", API_KEY)

    async with running(upstream, api_key=None, api_key_env="CHATFLEET_TEST_UPSTREAM_KEY") as engine:
        chunks = await collect(engine)

    assert chunks[-1].finish_reason == "stop"
    assert upstream.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


async def test_missing_key_variable_is_reported_at_start(
    upstream: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHATFLEET_TEST_UNSET_KEY", raising=False)
    engine = OpenAIEngine(
        model_config(upstream, api_key=None, api_key_env="CHATFLEET_TEST_UNSET_KEY")
    )

    with pytest.raises(EngineUnavailable, match="CHATFLEET_TEST_UNSET_KEY"):
        await engine.start()


async def test_without_a_key_the_ambient_openai_key_is_not_sent(
    upstream: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-do-not-leak")
    upstream.api_key = None  # a local server without auth

    async with running(upstream, api_key=None) as engine:
        await collect(engine)

    assert "sk-ambient" not in upstream.requests[0].headers.get("authorization", "")


async def test_rejected_key_is_an_upstream_error_without_the_key(
    upstream: FakeOpenAIServer,
) -> None:
    wrong = "sk-wrong-4b1d8e2f9c7a"

    async with running(upstream, api_key=wrong) as engine:
        with pytest.raises(UpstreamError) as caught:
            await collect(engine)

    message = str(caught.value)
    assert "401" in message
    assert "Incorrect API key" in message  # the upstream's own words reach the client...
    assert wrong not in message  # ...but not the key it echoed back
    assert API_KEY not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    # The wrong key really went out as a bearer token.
    assert upstream.requests[0].headers["authorization"] == f"Bearer {wrong}"


# --- upstream errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (Failure(500, "<html><body>Internal Server Error</body></html>"), "HTTP 500"),
        (
            Failure(429, {"error": {"message": "Rate limit reached", "type": "requests"}}),
            "HTTP 429 (rate limited): Rate limit reached",
        ),
        (
            Failure(404, {"error": {"message": "The model `gpt-test` does not exist"}}),
            "HTTP 404 (unknown model or URL)",
        ),
        (Failure(400, {"error": {"message": "context too long", "param": "messages"}}), "400"),
    ],
)
async def test_http_errors_are_upstream_errors(
    engine: OpenAIEngine, upstream: FakeOpenAIServer, failure: Failure, expected: str
) -> None:
    upstream.queue(failure)

    with pytest.raises(UpstreamError, match=re.escape(expected)) as caught:
        await collect(engine)

    assert API_KEY not in str(caught.value)
    assert len(upstream.requests) == 1  # max_retries=0


async def test_retryable_errors_are_retried_before_the_first_token(
    upstream: FakeOpenAIServer,
) -> None:
    upstream.queue(
        Failure(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "10"}),
        Failure(503, {"error": {"message": "overloaded"}}, {"retry-after-ms": "10"}),
        Answer(content=["finally"]),
    )

    async with running(upstream, max_retries=2) as engine:
        chunks = await collect(engine)

    assert joined(chunks, "text") == "finally"
    assert len(upstream.requests) == 3


async def test_error_event_inside_the_stream_is_an_upstream_error(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=["par", "tial", "never"], error_after=2))
    received: list[Chunk] = []

    with pytest.raises(UpstreamError, match="The server had an error"):
        async for chunk in engine.stream(ask()):
            received.append(chunk)

    assert joined(received, "text") == "partial"


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"id": "chatcmpl-fake", "choices": [\n\n',
        b"data: 42\n\n",
        b'data: {"choices": [7]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": "text"}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n\n',
    ],
    ids=["not-json", "not-an-object", "bad-choice", "bad-delta", "bad-content"],
)
async def test_malformed_event_is_an_upstream_error(
    engine: OpenAIEngine, upstream: FakeOpenAIServer, event: bytes
) -> None:
    upstream.queue(Answer(content=["ok", "then"], malformed_after=1, malformed_event=event))

    with pytest.raises(UpstreamError, match="malformed"):
        await collect(engine)


@pytest.mark.parametrize("body", [{"unexpected": "shape"}, "<html>not json</html>", []])
async def test_malformed_non_streaming_body_is_an_upstream_error(
    upstream: FakeOpenAIServer, body: Any
) -> None:
    upstream.queue(Failure(200, body))

    async with running(upstream, stream=False) as engine:
        with pytest.raises(UpstreamError):
            await collect(engine)


async def test_connection_cut_mid_stream_is_an_upstream_error(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=["one", " two", " three"], drop_after=2))
    received: list[Chunk] = []

    with pytest.raises(UpstreamError, match="connection lost mid-answer"):
        async for chunk in engine.stream(ask()):
            received.append(chunk)

    assert joined(received, "text") == "one two"


async def test_read_timeout_mid_stream_is_an_upstream_error(upstream: FakeOpenAIServer) -> None:
    upstream.queue(Answer(content=["quick", " then", " stuck"], delay_s=2.0))

    async with running(upstream, timeout_s=0.3) as engine:
        with pytest.raises(UpstreamError, match="timed out"):
            await collect(engine)


async def test_unreachable_server_is_engine_unavailable_without_credentials() -> None:
    model = ModelConfig(
        name="remote",
        engine="openai",
        openai={
            "base_url": f"http://admin:hunter2@127.0.0.1:{free_port()}/v1?token=zzz",
            "model": "gpt-test",
            "api_key": API_KEY,
            "max_retries": 0,
        },
    )
    engine = OpenAIEngine(model)
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match="unreachable") as caught:
            await collect(engine)
    finally:
        await engine.close()

    message = str(caught.value)
    assert "127.0.0.1" in message
    assert all(secret not in message for secret in ("hunter2", "admin", "zzz", API_KEY))


# --- cancellation ------------------------------------------------------------------------


async def test_closing_the_stream_early_disconnects_from_upstream(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=[f"w{i} " for i in range(50)], delay_s=0.1))
    stream = engine.stream(ask())

    first = [await anext(stream), await anext(stream)]
    started = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]

    assert [c.text for c in first] == ["w0 ", "w1 "]
    await wait_until(lambda: len(upstream.disconnects) == 1, within_s=3)
    assert time.monotonic() - started < 2  # far sooner than the 5 s the answer would take
    assert upstream.disconnects[0].body["model"] == "gpt-test"


async def test_cancelling_the_consumer_disconnects_from_upstream(
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=[f"w{i} " for i in range(50)], delay_s=0.1))
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
    engine: OpenAIEngine, upstream: FakeOpenAIServer
) -> None:
    upstream.queue(Answer(content=["x"] * 20, delay_s=0.05), Answer(content=["fine"]))
    stream = engine.stream(ask())
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_until(lambda: len(upstream.disconnects) == 1)

    chunks = await collect(engine)

    assert joined(chunks, "text") == "fine"


# --- wiring ------------------------------------------------------------------------------


async def test_create_engine_builds_the_openai_engine(upstream: FakeOpenAIServer) -> None:
    engine = create_engine(model_config(upstream))
    assert isinstance(engine, OpenAIEngine)
    assert engine.name == "remote"
