"""The streaming path's cost per request: one body message per engine batch, no thread.

Every ASGI message crosses each middleware and Serve's send path, and a thread pool
hand-off costs CPU and latency per request: bench/gateway.py measures the effect, these
tests pin the behaviour (same events on the wire, fewer messages, no worker thread).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from chatfleet.serving.api import Metrics, create_app
from chatfleet.serving.api._streaming import sse
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.protocol import Chunk, GenerationRequest, Usage

#: What a coalescing engine client hands the ingress: the first token alone, then runs.
BATCH_SIZES = (1, 5, 4)
TOKENS = sum(BATCH_SIZES)


class BatchedEngine:
    """An engine client replaying fixed batches, so the test knows their boundaries."""

    def __init__(self, texts: list[list[str]]) -> None:
        self.texts = texts

    def batches(self, request: GenerationRequest) -> AsyncGenerator[list[Chunk], None]:
        async def replay() -> AsyncGenerator[list[Chunk], None]:
            for i, texts in enumerate(self.texts):
                batch = [Chunk("text", text) for text in texts]
                if i == len(self.texts) - 1:
                    batch.append(Chunk("text", "", finish_reason="stop", usage=Usage(2, TOKENS)))
                yield batch
                await asyncio.sleep(0)

        return replay()

    async def is_ready(self) -> bool:
        return True


#: Tokens by batch; every one distinct, so their order shows.
TEXTS = [[f"t{i}.{j} " for j in range(n)] for i, n in enumerate(BATCH_SIZES)]
#: Text JSON escapes: quotes, backslashes, controls, non-ASCII, a lone surrogate.
ODD_TEXTS = [
    ['"quoted"', "back\\slash", "line\nbreak\ttab\x00\x1f", "\u2028"],
    ["é", "😀", "\ud800", "</script>"],
]


def app(texts: list[list[str]]) -> Any:
    config = AppConfig(models=[ModelConfig(name="fake", engine="fake")], auth={"enabled": False})
    return create_app(config, {"fake": BatchedEngine(texts)}, metrics=Metrics())


async def post(
    path: str,
    body: dict[str, Any],
    texts: list[list[str]] = TEXTS,
    messages: list[tuple[bytes, bool]] | None = None,
) -> list[bytes]:
    """The body messages of one POST, as the server (uvicorn, Serve) would send them
    (those with a body; ``messages`` gets every one, with its ``more_body``)."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5555),
        "headers": [
            (b"host", b"chatfleet"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
    }
    done = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    status: list[int] = []
    bodies: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            if messages is not None:
                messages.append((message.get("body", b""), message.get("more_body", False)))
            if message.get("body"):
                bodies.append(message["body"])

    await app(texts)(scope, receive, send)
    done.set()
    assert status == [200], b"".join(bodies)
    return bodies


def sse_events(bodies: list[bytes]) -> list[str]:
    return [e for e in b"".join(bodies).decode().split("\n\n") if e]


async def test_generate_sends_a_batch_of_tokens_as_one_message() -> None:
    bodies = await post("/api/generate", {"model": "fake", "prompt": "hi"})
    events = sse_events(bodies)
    texts = [json.loads(e.split("data: ", 1)[1])["text"] for e in events if "text_chunk" in e]
    # Every token is still its own event, in order ...
    assert texts == [t for batch in TEXTS for t in batch]
    assert events[0].startswith("event: metadata") and events[-1].startswith("event: end_stream")
    # ... but a batch's events share one body message, the metadata going with the first
    # batch and end_stream in a message of its own, after the last.
    assert len(bodies) == len(BATCH_SIZES) + 1
    assert bodies[0].startswith(b"event: metadata")
    counts = [b.count(b"event: text_chunk") for b in bodies[:-1]]
    assert counts == list(BATCH_SIZES)
    assert bodies[-1].startswith(b"event: end_stream")


async def test_openai_stream_sends_a_batch_of_tokens_as_one_message() -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    bodies = await post("/v1/chat/completions", body)
    events = sse_events(bodies)
    assert events[-1] == "data: [DONE]"
    deltas = [json.loads(e[len("data: ") :])["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas[1:-1]] == [t for batch in TEXTS for t in batch]
    # One message per batch, the role chunk going with the first; then the finish chunk
    # and [DONE] together.
    assert len(bodies) == len(BATCH_SIZES) + 1
    assert [b.count(b'"content": ') for b in bodies[:-1]] == list(BATCH_SIZES)
    assert b'"role":"assistant"' in bodies[0]
    assert bodies[-1].endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in bodies[-1]


@pytest.mark.parametrize(
    ("path", "body", "closing"),
    [
        ("/api/generate", {"model": "fake", "prompt": "hi"}, b"event: end_stream"),
        (
            "/v1/chat/completions",
            {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            b"data: [DONE]",
        ),
    ],
)
async def test_the_closing_events_end_the_response(
    path: str, body: dict[str, Any], closing: bytes
) -> None:
    # No empty body message after them: the server writes the end of the chunked
    # body with them, in one socket write instead of two.
    messages: list[tuple[bytes, bool]] = []
    await post(path, body, messages=messages)
    assert [more for _, more in messages] == [True] * len(BATCH_SIZES) + [False]
    assert closing in messages[-1][0]
    assert all(part for part, _ in messages)


async def test_a_stream_needs_no_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # FastAPI runs a plain ``def`` dependency (or handler) in the thread pool: a hand-off
    # per request. The streaming path's dependencies are coroutines.
    import fastapi.dependencies.utils

    async def no_thread(*_: Any, **__: Any) -> Any:
        raise AssertionError("a request of the streaming path went to the thread pool")

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", no_thread)
    await post("/api/generate", {"model": "fake", "prompt": "hi"})
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    await post("/v1/chat/completions", body)


async def test_text_events_are_the_json_the_generic_encoder_writes() -> None:
    # The per-token events skip json.dumps: their bytes must not change for any text.
    tokens = [t for batch in ODD_TEXTS for t in batch]
    bodies = await post("/api/generate", {"model": "fake", "prompt": "hi"}, ODD_TEXTS)
    expected = "".join(sse({"text": t}, "text_chunk") for t in tokens)
    assert expected in b"".join(bodies).decode()

    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    events = sse_events(await post("/v1/chat/completions", body, ODD_TEXTS))
    deltas = [e.split('"delta":', 1)[1].split(',"finish_reason"', 1)[0] for e in events[1:-2]]
    assert deltas == [json.dumps({"content": t}) for t in tokens]
