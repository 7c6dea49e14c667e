"""One trace per chat request through real Ray Serve, exported over real OTLP/HTTP.

Every replica (ingress, router, classifier, engines) is its own process with its
own tracer provider; they all export to a small receiver in this process, which
decodes the protobuf payloads. The spans must form one tree across processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.fakes.otlp_receiver import OtlpReceiver, ReceivedSpan

from chatfleet.serving.config import AppConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "tracing"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
ERROR = 2  # Status.StatusCode


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def url(ray_serve: Any, receiver: OtlpReceiver) -> str:
    config = AppConfig.model_validate(
        {
            "models": [
                {"name": "general", "engine": "fake", "fake": {"reply_tokens": 12}},
                {"name": "broken", "engine": "fake", "fake": {"fail_after_tokens": 3}},
            ],
            "classifier": {"backend": "embedding", "max_batch_size": 4},
            "routing": {"routes": [{"category": "coding", "model": "general"}]},
            "auth": {"enabled": False},
            "telemetry": {
                "otlp_endpoint": receiver.endpoint,
                "service_name": "chatfleet-test",
                "export_delay_ms": 100,
            },
        }
    )
    return str(ray_serve.deploy(config, APP))


def of_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, list[ReceivedSpan]]:
    named: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if span.trace_id == trace_id:
            named.setdefault(span.name, []).append(span)
    return named


def test_a_routed_streamed_chat_is_one_trace_across_replicas(
    url: str, receiver: OtlpReceiver
) -> None:
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={
            "model": "auto",
            "stream": True,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Fix this Python function, it crashes."}],
        },
        timeout=120,
    ) as r:
        body = r.read().decode()
    assert r.status_code == 200, body
    trace_id = r.headers["x-chatfleet-trace-id"]
    first = json.loads(body.split("\n\n")[0].removeprefix("data: "))
    assert first["chatfleet_route"]["trace_id"] == trace_id
    assert first["chatfleet_route"]["model"] == "general"

    expected = {"POST /v1/chat/completions", "router.decide", "classifier.classify", "chat general"}

    def complete(spans: list[ReceivedSpan]) -> bool:
        named = of_trace(spans, trace_id)
        return expected <= set(named) and len(named["classifier.classify"]) == 2

    named = of_trace(receiver.wait_for(complete, timeout=60), trace_id)
    assert set(named) == expected, sorted(named)
    (root,) = named["POST /v1/chat/completions"]
    (decide,) = named["router.decide"]
    (engine,) = named["chat general"]
    by_kind = {s.kind: s for s in named["classifier.classify"]}
    assert set(by_kind) == {CLIENT, SERVER}

    # Parent links across four processes.
    assert root.parent_span_id == ""
    assert root.kind == SERVER
    assert decide.parent_span_id == root.span_id
    assert by_kind[CLIENT].parent_span_id == decide.span_id
    assert by_kind[SERVER].parent_span_id == by_kind[CLIENT].span_id
    assert engine.parent_span_id == root.span_id
    assert root.resource["chatfleet.component"] == "ingress"
    assert decide.resource["chatfleet.component"] == "ingress"  # the router runs there
    assert engine.resource["chatfleet.component"] == "engine-general"
    assert by_kind[SERVER].resource["chatfleet.component"] == "classifier"
    assert by_kind[CLIENT].resource["chatfleet.component"] == "ingress"
    assert {s.resource["service.name"] for s in receiver.received()} == {"chatfleet-test"}

    assert root.attributes["http.route"] == "/v1/chat/completions"
    assert root.attributes["http.response.status_code"] == 200
    assert decide.attributes["chatfleet.route.model"] == "general"
    assert engine.kind == CLIENT
    assert engine.status_code != ERROR
    attributes = engine.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.system"] == "fake"
    assert attributes["gen_ai.request.model"] == "general"
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] == 12
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert [name for name, _ in engine.events] == ["gen_ai.first_token"]


def test_an_engine_failure_is_an_error_span_in_the_request_trace(
    url: str, receiver: OtlpReceiver
) -> None:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "broken", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    )
    assert r.status_code == 200
    assert '"error"' in r.text
    trace_id = r.headers["x-chatfleet-trace-id"]

    def complete(spans: list[ReceivedSpan]) -> bool:
        named = of_trace(spans, trace_id)
        return {"POST /v1/chat/completions", "chat broken"} <= set(named)

    named = of_trace(receiver.wait_for(complete, timeout=60), trace_id)
    (root,) = named["POST /v1/chat/completions"]
    (engine,) = named["chat broken"]
    assert engine.parent_span_id == root.span_id
    assert engine.status_code == ERROR
    assert engine.attributes["error.type"] == "EngineError"
    assert engine.attributes["gen_ai.response.finish_reasons"] == ("error",)
    assert engine.attributes["gen_ai.usage.output_tokens"] == 3
    events = dict(engine.events)
    assert "fake engine failure" in events["exception"]["exception.message"]
