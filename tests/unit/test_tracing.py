"""Traces of chat requests through the in-process app, recorded by an in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from tests.fakes.otlp_receiver import OtlpReceiver
from websockets.asyncio.client import connect

from chatfleet.serving import telemetry
from chatfleet.serving.api import LocalEngineClient, LocalRouterClient, create_app
from chatfleet.serving.config import AppConfig, ModelConfig, TelemetryConfig
from chatfleet.serving.engines import traced_generation
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.protocol import Classification, Compression, GenerationRequest, Message
from chatfleet.serving.routing import Router

CATEGORIES = ["coding", "maths", "chit-chat", "summarisation", "translation"]
# A long last message: its context (before the blank line) is compressed.
PROMPT = " ".join(["background"] * 40) + "\n\nHow do I fix this python code?"


def fake(name: str, **settings: Any) -> ModelConfig:
    return ModelConfig(name=name, engine="fake", fake={"reply_tokens": 12, **settings})


def routed_config(*models: ModelConfig) -> AppConfig:
    return AppConfig.model_validate(
        {
            "models": list(models) or [fake("general"), fake("coder")],
            "classifier": {},
            "compressor": {},
            "auth": {"enabled": False},
            "routing": {"routes": [{"category": "coding", "model": "coder"}]},
        }
    )


async def classify(prompt: str) -> Classification:
    top = "coding" if "code" in prompt else "chit-chat"
    rest = [c for c in CATEGORIES if c != top]
    return Classification([top, *rest], [0.9] + [0.025] * len(rest))


async def compress(context: str, question: str) -> Compression:
    words = context.split()
    return Compression(" ".join(words[::2]), len(words), len(words[::2]))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    tracer_provider = telemetry.configure_tracing(
        TelemetryConfig(), processor=SimpleSpanProcessor(exporter)
    )
    assert tracer_provider is not None
    yield tracer_provider
    tracer_provider.shutdown()


async def started_app(config: AppConfig, provider: TracerProvider | None) -> httpx.AsyncClient:
    clients = {
        m.name: LocalEngineClient(FakeEngine(m), config.coalesce, tracer_provider=provider)
        for m in config.models
    }
    for client in clients.values():
        await client.start()
    router = None
    if config.routing is not None:
        router = LocalRouterClient(Router(config, classify, compress, tracer_provider=provider))
    app = create_app(config, clients, router=router, tracer_provider=provider)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatfleet")


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def chunks(body: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in body.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def test_a_routed_streamed_chat_is_one_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with await started_app(routed_config(), provider) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "auto",
                "stream": True,
                "max_tokens": 50,
                "temperature": 0.3,
                "messages": [{"role": "user", "content": PROMPT}],
            },
        )
    assert r.status_code == 200, r.text
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {
        "POST /v1/chat/completions",
        "router.decide",
        "classifier.classify",
        "compressor.compress",
        "chat coder",
    }
    root = spans["POST /v1/chat/completions"]
    decide, engine = spans["router.decide"], spans["chat coder"]
    assert root.parent is None
    assert root.kind is SpanKind.SERVER
    assert parent_of(decide) == span_id(root)
    assert parent_of(spans["classifier.classify"]) == span_id(decide)
    assert parent_of(spans["compressor.compress"]) == span_id(decide)
    assert parent_of(engine) == span_id(root)
    trace_id = trace_of(root)
    assert {trace_of(s) for s in spans.values()} == {trace_id}

    # The trace id comes back in a header and in the route explanation.
    assert r.headers[telemetry.TRACE_HEADER] == trace_id
    route = chunks(r.text)[0]["chatfleet_route"]
    assert route["model"] == "coder"
    assert route["trace_id"] == trace_id
    assert json.loads(r.headers["x-chatfleet-route"])["trace_id"] == trace_id

    assert root.attributes is not None
    assert root.attributes["http.route"] == "/v1/chat/completions"
    assert root.attributes["http.response.status_code"] == 200
    assert engine.kind is SpanKind.CLIENT
    assert engine.status.status_code is StatusCode.UNSET
    attributes = dict(engine.attributes or {})
    assert attributes.pop("chatfleet.request_id")
    assert attributes.pop("gen_ai.usage.input_tokens") > 0  # type: ignore[operator]
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "fake",
        "gen_ai.request.model": "coder",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.3,
        "gen_ai.request.top_p": 1.0,
        "gen_ai.usage.output_tokens": 12,
        "gen_ai.response.finish_reasons": ("stop",),
    }
    assert [e.name for e in engine.events] == ["gen_ai.first_token"]
    # The first token comes after the routing decision, inside the request.
    assert decide.end_time is not None and root.end_time is not None
    assert decide.end_time <= engine.events[0].timestamp <= root.end_time
    compressed = spans["compressor.compress"].attributes or {}
    assert compressed["chatfleet.compression.original_tokens"] == 40
    assert compressed["chatfleet.compression.compressed_tokens"] == 20


async def test_an_engine_failure_mid_stream_is_recorded(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    config = AppConfig(models=[fake("broken", fail_after_tokens=3)], auth={"enabled": False})
    async with await started_app(config, provider) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "broken",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert r.status_code == 200
    assert any("error" in c for c in chunks(r.text))
    spans = by_name(exporter.get_finished_spans())
    engine, root = spans["chat broken"], spans["POST /v1/chat/completions"]
    assert parent_of(engine) == span_id(root)
    assert engine.status.status_code is StatusCode.ERROR
    assert engine.attributes is not None
    assert engine.attributes["error.type"] == "EngineError"
    assert engine.attributes["gen_ai.response.finish_reasons"] == ("error",)
    assert engine.attributes["gen_ai.usage.output_tokens"] == 3
    names = [e.name for e in engine.events]
    assert names == ["gen_ai.first_token", "exception"]
    exception = engine.events[1].attributes or {}
    assert "fake engine failure" in str(exception["exception.message"])


async def test_an_engine_failure_before_the_first_token_fails_the_request_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    config = AppConfig(models=[fake("dead", fail_after_tokens=0)], auth={"enabled": False})
    async with await started_app(config, provider) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "dead", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert r.status_code >= 500
    spans = by_name(exporter.get_finished_spans())
    engine, root = spans["chat dead"], spans["POST /v1/chat/completions"]
    assert engine.status.status_code is StatusCode.ERROR
    assert [e.name for e in engine.events] == ["exception"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes is not None
    assert root.attributes["http.response.status_code"] == r.status_code
    assert r.headers[telemetry.TRACE_HEADER] == trace_of(root)


async def test_a_cancelled_generation_is_not_an_error(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    model = fake("slow", reply_tokens=100, tokens_per_second=1000)
    engine = FakeEngine(model)
    request = GenerationRequest(model="slow", messages=[Message("user", "hi")])
    stream = traced_generation(
        engine.stream(request), request, "fake", telemetry.get_tracer(provider)
    )
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None
    assert span.attributes["chatfleet.cancelled"] is True
    assert span.attributes["gen_ai.response.finish_reasons"] == ("cancelled",)
    assert [e.name for e in span.events] == ["gen_ai.first_token", "cancelled"]
    assert engine.cancelled == [request.request_id]


async def test_a_client_traceparent_continues_the_clients_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    parent_trace, parent_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    config = AppConfig(models=[fake("fake")], auth={"enabled": False})
    async with await started_app(config, provider) as http:
        r = await http.post(
            "/api/generate",
            json={"model": "fake", "prompt": "hello"},
            headers={"traceparent": f"00-{parent_trace}-{parent_span}-01"},
        )
    assert r.status_code == 200, r.text
    spans = by_name(exporter.get_finished_spans())
    root, engine = spans["POST /api/generate"], spans["chat fake"]
    assert root.parent is not None
    assert format_span_id(root.parent.span_id) == parent_span
    assert trace_of(root) == trace_of(engine) == parent_trace
    assert r.headers[telemetry.TRACE_HEADER] == parent_trace


async def test_every_response_carries_the_trace_id(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    config = AppConfig(models=[fake("fake")], auth={"enabled": False})
    async with await started_app(config, provider) as http:
        missing = await http.get("/no/such/path")
        health = await http.get("/healthz")
    assert missing.status_code == 404
    ids = [missing.headers[telemetry.TRACE_HEADER], health.headers[telemetry.TRACE_HEADER]]
    assert ids == [trace_of(s) for s in exporter.get_finished_spans()]
    assert ids[0] != ids[1]


async def test_without_an_endpoint_nothing_is_traced() -> None:
    assert telemetry.configure_tracing(TelemetryConfig()) is None
    assert not telemetry.records(telemetry.get_tracer(None))
    assert telemetry.records(telemetry.get_tracer(telemetry.TracerProvider()))
    # No exporter: the engine's stream is handed through as it is, no wrapper.
    request = GenerationRequest(model="fake", messages=[Message("user", "x")])
    source = FakeEngine(fake("fake")).stream(request)
    assert traced_generation(source, request, "fake", telemetry.get_tracer(None)) is source
    await source.aclose()  # type: ignore[attr-defined]
    config = AppConfig(models=[fake("fake")], auth={"enabled": False})
    async with await started_app(config, None) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
        # A client's own trace is still carried on (and named back) with nothing to
        # record it here: the middleware's short cut is only for requests without one.
        client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        continued = await http.get(
            "/healthz", headers={"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"}
        )
    assert r.status_code == 200
    assert telemetry.TRACE_HEADER not in r.headers
    assert continued.headers[telemetry.TRACE_HEADER] == client_trace


def test_the_otlp_http_exporter_sends_real_protobuf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLEET_TEST_OTLP_HEADERS", "Authorization=Bearer x, x-team = chat")
    with OtlpReceiver() as receiver:
        config = TelemetryConfig(
            otlp_endpoint=receiver.endpoint + "/",
            headers_env="CHATFLEET_TEST_OTLP_HEADERS",
            service_name="chat-a",
            export_delay_ms=20,
        )
        provider = telemetry.configure_tracing(config, component="router")
        assert provider is not None
        try:
            tracer = telemetry.get_tracer(provider)
            with (
                tracer.start_as_current_span("outer") as outer,
                tracer.start_as_current_span("inner", attributes={"gen_ai.system": "fake"}),
            ):
                pass
            spans = receiver.wait_for(lambda spans: len(spans) == 2, timeout=10)
        finally:
            provider.shutdown()
    inner, received_outer = sorted(spans, key=lambda s: s.name)
    assert received_outer.trace_id == telemetry.trace_id(outer)
    assert inner.parent_span_id == received_outer.span_id
    assert inner.attributes == {"gen_ai.system": "fake"}
    assert inner.resource["service.name"] == "chat-a"
    assert inner.resource["chatfleet.component"] == "router"
    assert receiver.headers[0]["authorization"] == "Bearer x"
    assert receiver.headers[0]["x-team"] == "chat"
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"


def test_grpc_and_sampling_are_configurable() -> None:
    config = TelemetryConfig(
        otlp_endpoint="http://127.0.0.1:4317", otlp_protocol="grpc", sample_ratio=0.25
    )
    provider = telemetry.configure_tracing(config)
    assert provider is not None
    try:
        assert "0.25" in provider.sampler.get_description()
        assert provider.sampler.get_description().startswith("ParentBased")
    finally:
        provider.shutdown()


def test_the_carrier_round_trips_the_current_span(provider: TracerProvider) -> None:
    tracer = telemetry.get_tracer(provider)
    assert telemetry.inject() == {}
    with tracer.start_as_current_span("outer") as outer:
        carrier = telemetry.inject()
        assert set(carrier) == {"traceparent"}
    with telemetry.continued(carrier), tracer.start_as_current_span("inner") as inner:
        assert telemetry.trace_id(inner) == telemetry.trace_id(outer)
    assert telemetry.trace_id() is None


async def test_each_websocket_chat_message_is_its_own_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    config = AppConfig(models=[fake("fake")], auth={"enabled": False})
    clients = {"fake": LocalEngineClient(FakeEngine(config.models[0]), tracer_provider=provider)}
    app = create_app(config, clients, tracer_provider=provider)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        async with connect(f"ws://127.0.0.1:{sock.getsockname()[1]}/ws/chat") as ws:
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            for _ in range(2):
                await ws.send(json.dumps({"type": "chat", "content": "Hi", "model": "fake"}))
                while (frame := json.loads(await asyncio.wait_for(ws.recv(), 10)))[
                    "type"
                ] == "token":
                    pass
                assert frame["type"] == "complete", frame
    finally:
        server.should_exit = True
        await serving
        sock.close()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "WS /ws/chat chat"]
    engines = [s for s in spans if s.name == "chat fake"]
    assert len(roots) == len(engines) == 2
    assert len({trace_of(s) for s in roots}) == 2
    for root, engine in zip(roots, engines, strict=True):
        assert root.parent is None
        assert root.status.status_code is StatusCode.UNSET
        assert parent_of(engine) == span_id(root)


def test_the_public_surface() -> None:
    assert sorted(telemetry.__all__) == [
        "TRACE_HEADER",
        "TracerProvider",
        "configure_tracing",
        "continued",
        "extract",
        "get_tracer",
        "inject",
        "record_error",
        "records",
        "trace_id",
    ]
