"""The baseline for bench/gateway.py: one FastAPI + uvicorn process, one token per event.

Usage: ``python bench/_naive_server.py ENGINES_JSON PORT`` (``{model name: fake
engine settings}``). Serves
``POST /api/generate`` with the same request body and SSE events as chatfleet
(``text_chunk`` {text} per token, then ``end_stream``), and a streamed
``POST /v1/chat/completions`` (one OpenAI chunk per token, for bench/aiperf.py),
straight from a `FakeEngine` in this process: no Ray, no coalescing, no metrics, no
middleware.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from chatfleet.serving.config import ModelConfig
from chatfleet.serving.engines.fake import FakeEngine
from chatfleet.serving.protocol import GenerationRequest, Message

_TOKEN = re.compile(r" ?\S+")


class Body(BaseModel):
    model: str | None = None
    prompt: str
    max_tokens: int = 256


class ChatBody(BaseModel):
    model: str | None = None
    messages: list[dict[str, object]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def _pieces(text: str, tokens: int) -> list[str]:
    """One piece per token, even when the engine hands over several that came due
    together (it does when the reading loop runs late)."""
    return [p for p in (_TOKEN.findall(text) if tokens > 1 else [text]) if p]


def build(models: dict[str, dict[str, object]]) -> FastAPI:
    engines = {
        name: FakeEngine(ModelConfig(name=name, engine="fake", fake=fake))
        for name, fake in models.items()
    }
    default = next(iter(engines))
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/generate")
    async def generate(body: Body) -> StreamingResponse:
        engine = engines[body.model or default]
        request = GenerationRequest(
            model=engine.name, messages=[Message("user", body.prompt)], max_tokens=body.max_tokens
        )

        async def events() -> AsyncIterator[str]:
            finish = "stop"
            async for chunk in engine.stream(request):
                for text in _pieces(chunk.text, chunk.tokens):
                    yield f"event: text_chunk\ndata: {json.dumps({'text': text})}\n\n"
                finish = chunk.finish_reason or finish
            yield f"event: end_stream\ndata: {json.dumps({'finish_reason': finish})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models_list() -> dict[str, object]:
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in engines]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> StreamingResponse:
        engine = engines.get(body.model or default, engines[default])
        prompt = " ".join(str(m.get("content", "")) for m in body.messages)
        request = GenerationRequest(
            model=engine.name,
            messages=[Message("user", prompt)],
            max_tokens=body.max_completion_tokens or body.max_tokens or 256,
        )
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": engine.name,
        }

        def event(delta: dict[str, str], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        async def events() -> AsyncIterator[str]:
            yield event({"role": "assistant", "content": ""})
            finish = "stop"
            async for chunk in engine.stream(request):
                for text in _pieces(chunk.text, chunk.tokens):
                    yield event({"content": text})
                finish = chunk.finish_reason or finish
            yield event({}, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> int:
    models, port = json.loads(sys.argv[1]), int(sys.argv[2])
    uvicorn.run(build(models), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
