"""The floor for bench/request_cpu.py: Ray Serve with chatfleet's topology and no chatfleet.

Usage: ``python bench/_bare_serve.py PORT``. Starts Ray and Serve the way ``chatfleet
serve`` does (its ``serve_environment``: Serve's throughput mode, HAProxy in front,
gRPC between replicas, workers at normal priority) and deploys two ingress replicas of
a FastAPI app whose ``POST /v1/chat/completions`` makes one streaming handle call to
one "engine" replica that yields ``max_tokens`` tokens at 50 a second (the first at
once, then a message per 100 ms), relayed as OpenAI chunks over SSE.
Nothing else: no auth, store, metrics, tracing, routing, admission, token relay or
adaptive coalescing (the engine's fixed 100 ms batches stand in for it). ``GET /ready``
answers once it is up. Stops on SIGINT or SIGTERM.
"""

# No ``from __future__ import annotations``: the handlers travel to the replicas by
# value (cloudpickle), and FastAPI there needs their annotations as objects.
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse


def main() -> int:
    port = int(sys.argv[1])
    from chatfleet.serving.cli import serve_environment

    os.environ.update(serve_environment(os.environ)[0])

    import ray
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    @serve.deployment(
        num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1}
    )
    class Engine:
        async def generate(self, body: dict[str, Any]) -> AsyncGenerator[str, None]:
            # ``max_tokens`` at 50 tokens/s: the first at once, then what came in each
            # 100 ms as one message (a handle message per token would be the cost).
            tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 1)
            yield "tok "
            loop = asyncio.get_running_loop()
            sent, last = 1, loop.time()
            while sent < tokens:
                await asyncio.sleep(0.02)
                if loop.time() - last >= 0.1 or sent + 1 == tokens:
                    count = round((loop.time() - last) / 0.02)
                    count = max(1, min(count, tokens - sent))
                    yield "tok " * count
                    sent, last = sent + count, loop.time()

    api = FastAPI()

    @serve.deployment(
        num_replicas=2, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1}
    )
    @serve.ingress(api)
    class Ingress:
        def __init__(self, engine: DeploymentHandle[Any]) -> None:
            self.engine = engine.options(stream=True)

        @api.get("/ready")
        async def ready(self) -> dict[str, bool]:
            return {"ready": True}

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> StreamingResponse:
            body = await request.json()
            tokens = self.engine.generate.remote(body)
            # OpenAI's chunk shape, as bench/_naive_server.py sends it (aiperf parses it).
            head = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": str(body.get("model")),
            }

            def event(delta: dict[str, str], finish: str | None = None) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

            async def events() -> AsyncGenerator[str, None]:
                yield event({"role": "assistant", "content": ""})
                async for text in tokens:
                    yield event({"content": text})
                yield event({}, "length")
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            Ingress.bind(Engine.bind()),  # type: ignore[attr-defined]
            name="bare",
            route_prefix="/",
            blocking=False,
            logging_config={"enable_access_log": False},
        )
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
