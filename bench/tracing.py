"""Tracing overhead: streamed chat requests through the in-process app, tracing off vs on.

Run from the repository root::

    .venv/bin/python bench/tracing.py                 # 300 requests a mode, 3 rounds
    .venv/bin/python bench/tracing.py --requests 1000 --tokens 256

Modes: ``off`` (no exporter configured: OpenTelemetry's no-op tracer, the default),
``recording`` (a real SDK provider with a BatchSpanProcessor over an exporter that
drops spans: the cost of making spans, not of shipping them). Each request is
``POST /v1/chat/completions`` with ``stream: true`` from the fake engine at full
speed through `httpx.ASGITransport`; the figures are this process's CPU time per
request (client included), less noisy than wall time on a shared machine. Modes
alternate every round. Prints figures and ratios only; it never asserts.
"""

# ruff: noqa: E402 - sys.path is trimmed before the other imports, on purpose
from __future__ import annotations

import os
import sys

# bench/operator.py would shadow the stdlib module: keep this directory off
# sys.path (as bench/gateway.py does).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

import httpx
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from chatfleet.serving import telemetry
from chatfleet.serving.api import LocalEngineClient, create_app
from chatfleet.serving.config import AppConfig, ModelConfig, TelemetryConfig
from chatfleet.serving.engines.fake import FakeEngine


class _Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def _run(mode: str, requests: int, tokens: int) -> float:
    """Seconds of CPU time (this process) per request."""
    provider = None
    if mode == "recording":
        provider = telemetry.configure_tracing(
            TelemetryConfig(), processor=BatchSpanProcessor(_Dropping())
        )
    fake = {"reply_tokens": tokens, "tokens_per_second": 0}
    model = ModelConfig(name="fake", engine="fake", fake=fake)
    config = AppConfig(models=[model], auth={"enabled": False})
    client = LocalEngineClient(FakeEngine(model), config.coalesce, tracer_provider=provider)
    await client.start()
    app = create_app(config, {"fake": client}, tracer_provider=provider)
    body = {
        "model": "fake",
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "hello"}],
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        for _ in range(10):  # warm up
            await http.post("/v1/chat/completions", json=body)
        started = time.process_time()
        for _ in range(requests):
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
        elapsed = time.process_time() - started
    if provider is not None:
        provider.shutdown()
    return elapsed / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests a mode a round")
    parser.add_argument("--tokens", type=int, default=128, help="tokens an answer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, modes alternating")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"off": [], "recording": []}
    for i in range(args.rounds):
        order = ["off", "recording"] if i % 2 == 0 else ["recording", "off"]
        for mode in order:
            samples[mode].append(asyncio.run(_run(mode, args.requests, args.tokens)))
    off = statistics.median(samples["off"])
    on = statistics.median(samples["recording"])
    print(f"{args.requests} streamed requests x {args.rounds} rounds, {args.tokens} tokens each")
    print(f"  tracing off       {off * 1e3:8.3f} ms CPU/request (median of rounds)")
    print(f"  tracing recording {on * 1e3:8.3f} ms CPU/request")
    print(f"  recording adds    {(on - off) * 1e6:8.0f} us/request ({on / off:.3f}x)")


if __name__ == "__main__":
    main()
