"""The ingress API in one process, through httpx's ASGI transport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chatfleet.serving.api import LocalEngineClient, Metrics, create_app
from chatfleet.serving.config import AppConfig, ModelConfig
from chatfleet.serving.engines.fake import FakeEngine


def fake_model(name: str = "fake", **fake: Any) -> ModelConfig:
    return ModelConfig(name=name, engine="fake", fake=fake)


def make_config(*models: ModelConfig, **fields: Any) -> AppConfig:
    # Auth has its own tests (test_auth.py); these exercise the API behind it.
    fields.setdefault("auth", {"enabled": False})
    return AppConfig(models=list(models) or [fake_model()], **fields)


class Harness:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.engines = {m.name: FakeEngine(m) for m in config.models}
        self.clients = {n: LocalEngineClient(e, config.coalesce) for n, e in self.engines.items()}
        self.metrics = Metrics()
        self.app = create_app(config, self.clients, metrics=self.metrics)

    async def start(self) -> None:
        for client in self.clients.values():
            await client.start()

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://chatfleet"
        )


@pytest.fixture
async def harness() -> Harness:
    h = Harness(
        make_config(
            fake_model("fake", reply_tokens=40),
            fake_model("thinker", reply_tokens=10, thinking_tokens=5),
            fake_model("broken", reply_tokens=30, fail_after_tokens=20),
            fake_model("dead", fail_after_tokens=0),
        )
    )
    await h.start()
    return h


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with harness.http() as c:
        yield c


def sse_events(body: str) -> list[tuple[str | None, str]]:
    events = []
    for block in body.strip().split("\n\n"):
        event, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        events.append((event, "\n".join(data)))
    return events


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "Hello there"}]}


async def test_models_lists_every_served_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["fake", "thinker", "broken", "dead"]


async def test_non_streaming_completion_has_text_and_usage(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    content = body["choices"][0]["message"]["content"]
    expected = harness.engines["fake"].words(_request("Hello there"), 40)
    assert content == " ".join(expected)
    assert body["usage"]["completion_tokens"] == 40
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 40


def _request(text: str) -> Any:
    from chatfleet.serving.protocol import GenerationRequest, Message

    return GenerationRequest(model="fake", messages=[Message("user", text)])


async def test_max_tokens_cuts_with_length(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["message"]["content"].split()) == 5


async def test_streaming_completion_is_openai_sse(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [data for _, data in sse_events(r.text)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 40
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 40
    # Tokens were batched: far fewer content events than tokens.
    assert len(chunks) < 20


async def test_thinking_is_reasoning_content(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "thinker"})
    message = r.json()["choices"][0]["message"]
    assert len(message["reasoning_content"].split()) == 5
    assert len(message["content"].split()) == 10


async def test_generate_streams_native_events(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"model": "thinker", "prompt": "why?"})
    assert r.status_code == 200
    events = sse_events(r.text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "metadata" and kinds[-1] == "end_stream"
    assert kinds.index("thinking_chunk") < kinds.index("text_chunk")
    end = json.loads(events[-1][1])
    assert end["finish_reason"] == "stop"
    assert end["usage"]["completion_tokens"] == 15


async def test_generate_defaults_to_first_model(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"prompt": "hi"})
    assert json.loads(sse_events(r.text)[0][1])["model"] == "fake"


async def test_engine_failing_midstream_ends_stream_with_error(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    r = await client.post("/api/generate", json={"model": "broken", "prompt": "x"})
    assert r.status_code == 200
    events = sse_events(r.text)
    kinds = [e for e, _ in events]
    assert "text_chunk" in kinds
    error = json.loads(events[kinds.index("error")][1])["error"]
    assert error["code"] == "engine_error"
    assert "Traceback" not in r.text
    assert kinds[-1] == "end_stream"
    assert json.loads(events[-1][1])["finish_reason"] == "error"
    # ... and the server keeps serving.
    again = await client.post("/v1/chat/completions", json=CHAT)
    assert again.status_code == 200


async def test_openai_stream_failure_is_an_error_event(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "broken", "stream": True})
    events = [data for _, data in sse_events(r.text)]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_error"


async def test_engine_failing_before_first_token_is_an_http_error(
    client: httpx.AsyncClient,
) -> None:
    for stream in (False, True):
        r = await client.post(
            "/v1/chat/completions", json={**CHAT, "model": "dead", "stream": stream}
        )
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "engine_error"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({**CHAT, "model": "nope"}, 404, "model"),
        ({**CHAT, "messages": []}, 400, "messages"),
        ({"model": "fake"}, 400, "messages"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": 1_000_000}, 400, "max_tokens"),
        ({**CHAT, "temperature": 3}, 400, "temperature"),
        ({**CHAT, "top_p": 0}, 400, "top_p"),
        ({**CHAT, "n": 2}, 400, "n"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ],
)
async def test_bad_requests_get_openai_errors(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, param: str
) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"] == "invalid_request_error"


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        content=b'{"model": "fake", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "request body is not valid JSON"


async def test_generate_needs_prompt_or_messages(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"model": "fake"})
    assert r.status_code == 400
    assert "exactly one" in r.json()["error"]["message"]
    # Fields it has no use for are ignored (the prompt router's clients send their own).
    r = await client.post("/api/generate", json={"model": "fake", "prompt": "x", "bogus": 1})
    assert r.status_code == 200


async def test_oversized_body_is_413() -> None:
    h = Harness(make_config(server={"max_body_bytes": 2048}))
    await h.start()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    async with h.http() as c:
        r = await c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"

        async def chunked() -> AsyncIterator[bytes]:
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        r = await c.post(
            "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


async def test_health_ready_and_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    health = (await client.get("/health")).json()
    assert health["status"] == "ok" and health["models"]["fake"] == "ready"
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/chat/completions" in spec["paths"]


async def test_not_ready_until_engines_start() -> None:
    h = Harness(make_config())
    async with h.http() as c:
        r = await c.get("/ready")
        assert r.status_code == 503
        assert r.json()["models"] == {"fake": "loading"}
        await h.start()
        assert (await c.get("/ready")).status_code == 200


async def test_metrics_count_requests_tokens_and_errors(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=CHAT)
    await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = (await client.get("/metrics")).text
    assert (
        'chatfleet_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0'
        in text
    )
    assert 'chatfleet_errors_total{code="model_not_found"} 1.0' in text
    assert 'chatfleet_tokens_total{model="fake",type="output"} 40.0' in text
    assert 'chatfleet_time_to_first_token_seconds_count{model="fake"} 1.0' in text
    assert 'chatfleet_active_streams{model="fake"} 0.0' in text
    assert 'chatfleet_generations_total{finish_reason="stop",model="fake"} 1.0' in text


async def test_request_duration_covers_the_whole_stream_and_unmatched_paths() -> None:
    # 20 tokens at 200 tok/s: the stream takes >= 0.1 s after its headers.
    h = Harness(make_config(fake_model("slow", reply_tokens=20, tokens_per_second=200)))
    await h.start()
    async with h.http() as c:
        body = {**CHAT, "model": "slow", "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                pass
        assert (await c.get("/no/such/path")).status_code == 404
    sample = h.metrics.registry.get_sample_value
    route = {"route": "/v1/chat/completions"}
    assert sample("chatfleet_http_request_duration_seconds_sum", route) >= 0.09
    labels = {"route": "unmatched", "method": "GET", "status": "404"}
    assert sample("chatfleet_http_requests_total", labels) == 1
