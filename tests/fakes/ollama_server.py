"""A small, faithful Ollama server for tests: ``POST /api/chat`` streaming NDJSON.

Each line is a JSON object; content lines carry ``message.content``, reasoning
lines ``message.thinking`` (``think: true``); the last has ``done: true``,
``done_reason`` and the token counts. With ``think`` unset, the reasoning stays
inline in the content between ``<think>`` tags (what Ollama sends for models it
has no reasoning parser for, and sent for all before 0.9); with ``think: false``
the model does not think. ``options.num_predict`` caps the
answer (``done_reason: length``). An unknown model gets Ollama's 404 body.
Tool calls come whole in one line before the done line, with arguments as a JSON
object, as Ollama sends them; a request with a ``format`` (a JSON schema, or
``"json"``) and no script gets a document that follows it, as a constrained model's.
``logprobs: true`` gets each line's ``logprobs`` (as Ollama 0.12.11 sends them), with
the made-up values of the OpenAI fake (`token_logprob`), ``top_logprobs`` long.
``GET /api/version`` answers too.

Tests script replies with `queue`: an `OllamaAnswer` (pieces, pacing, faults: drop
the connection, an ``{"error": ...}`` line, a line that is not JSON) or a
`Failure`. Without a script, the server echoes the last message.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# The fake engine's schema-following generator stands for Ollama's constrained sampling.
from chatfleet.serving.engines._fake_scripts import json_document

from .local_server import Exchange, Failure, LocalServer
from .openai_server import token_logprob

__all__ = ["Failure", "FakeOllamaServer", "OllamaAnswer"]

_WORDS = ["llama", "alpaca", "vicuna", "guanaco"]


@dataclass(frozen=True)
class OllamaAnswer:
    """One scripted answer. Each piece is one NDJSON line (one token)."""

    content: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    done_reason: str = "stop"
    #: None leaves the count out of the final line (Ollama does for a cached prompt).
    prompt_eval_count: int | None = 9
    eval_count: int | None = -1  # -1: count the pieces
    delay_s: float = 0.0
    #: Send each line in two TCP writes, cut mid-JSON, a moment apart.
    split_lines: bool = False
    #: Faults: end the stream cleanly but without the done line; after this many
    #: lines, cut the connection, send an error line, send ``malformed_line``.
    send_done: bool = True
    drop_after: int | None = None
    error_after: int | None = None
    malformed_after: int | None = None
    malformed_line: bytes = b'{"message": {"role": "assistant", "content": \n'
    #: Ollama's calls: ``{"function": {"name": ..., "arguments": {...}}}``.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class FakeOllamaServer(LocalServer):
    def __init__(self, *, models: tuple[str, ...] = ("qwen3:0.6b", "llama3.2:1b")) -> None:
        super().__init__()
        self.models = set(models)
        self._script: deque[OllamaAnswer | Failure] = deque()

    def queue(self, *replies: OllamaAnswer | Failure) -> None:
        """Script the next replies, one per request, in order."""
        self._script.extend(replies)

    def reset(self) -> None:
        super().reset()
        self._script.clear()

    async def handle(self, exchange: Exchange) -> None:
        request = exchange.request
        if request.method == "GET" and request.path == "/api/version":
            await exchange.respond(200, {"version": "0.12.0"})
            return
        if request.method != "POST" or request.path != "/api/chat":
            await exchange.respond(404, "404 page not found")
            return
        body = request.body
        if not isinstance(body, dict):
            await exchange.respond(
                400, {"error": "invalid character looking for beginning of value"}
            )
            return
        model = body.get("model")
        if model not in self.models:
            await exchange.respond(
                404, {"error": f"model '{model}' not found, try pulling it first"}
            )
            return
        reply = self._script.popleft() if self._script else _echo(body)
        if isinstance(reply, Failure):
            await exchange.respond(reply.status, reply.body, reply.headers)
        else:
            await self._stream(exchange, body, reply)

    async def _stream(self, exchange: Exchange, body: dict[str, Any], answer: OllamaAnswer) -> None:
        think = body.get("think")
        thinking = [] if think is False else answer.thinking
        lines: list[dict[str, Any]]
        if think:
            lines = [{"content": "", "thinking": t} for t in thinking]
            lines += [{"content": c} for c in answer.content]
        else:  # unset: the reasoning stays inline, between tags
            inline = ["<think>", *thinking, "</think>"] if thinking else []
            lines = [{"content": c} for c in inline + answer.content]
        done_reason = answer.done_reason
        limit = (body.get("options") or {}).get("num_predict")
        if isinstance(limit, int) and limit >= 0 and len(lines) > limit:
            lines, done_reason = lines[:limit], "length"

        await exchange.start(200, "application/x-ndjson")
        for sent, message in enumerate(lines):
            if sent == answer.drop_after:
                return  # a started response left unfinished: uvicorn drops the connection
            if sent == answer.error_after:
                await exchange.write(
                    _line({"error": "an error was encountered while running the model"})
                )
                await exchange.end()
                return
            if sent == answer.malformed_after:
                await exchange.write(answer.malformed_line)
                await exchange.end()
                return
            if sent and not await exchange.pause(answer.delay_s):
                return
            line = {**_head(body), "message": {"role": "assistant", **message}, "done": False}
            if body.get("logprobs"):
                token = message.get("thinking") or message["content"]
                line["logprobs"] = [token_logprob(token, sent, body.get("top_logprobs") or 0)]
            if not await exchange.write_split(_line(line), split=answer.split_lines):
                return
        if answer.tool_calls:
            message = {"role": "assistant", "content": "", "tool_calls": answer.tool_calls}
            if not await exchange.write(_line({**_head(body), "message": message, "done": False})):
                return
        if not answer.send_done:
            await exchange.end()
            return
        final: dict[str, Any] = {
            **_head(body),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": done_reason,
            "total_duration": 1_200_000,
            "load_duration": 100_000,
        }
        if answer.prompt_eval_count is not None:
            final["prompt_eval_count"] = answer.prompt_eval_count
            final["prompt_eval_duration"] = 300_000
        if answer.eval_count is not None:
            final["eval_count"] = len(lines) if answer.eval_count < 0 else answer.eval_count
            final["eval_duration"] = 800_000
        await exchange.write(_line(final))
        await exchange.end()


def _head(body: dict[str, Any]) -> dict[str, Any]:
    return {"model": body["model"], "created_at": datetime.now(UTC).isoformat()}


def _echo(body: dict[str, Any]) -> OllamaAnswer:
    form = body.get("format")
    if form is not None:
        response_format = (
            {"type": "json_schema", "json_schema": {"schema": form}}
            if isinstance(form, dict)
            else {"type": "json_object"}
        )
        document = json_document(response_format, iter(_WORDS * 100))
        return OllamaAnswer(content=[document[i : i + 5] for i in range(0, len(document), 5)])
    messages = body.get("messages") or [{}]
    words = str(messages[-1].get("content", "")).split()
    return OllamaAnswer(content=[w if i == 0 else " " + w for i, w in enumerate(words)])


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\n"
