"""A small, faithful OpenAI-compatible chat completions server for tests.

``POST /v1/chat/completions`` answers with a chat.completion object, or with
Server-Sent Events (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``) when the
request says ``stream: true``; a usage chunk with empty ``choices`` comes last
only when ``stream_options.include_usage`` asks for it, as OpenAI does.
``max_tokens`` caps the answer (finish_reason ``length``). ``logprobs: true`` gets each
content piece's logprobs (`token_logprob`), in each chunk's choice or in the
completion's, with ``top_logprobs`` alternatives. With ``api_key`` set,
requests need ``Authorization: Bearer <key>``; a wrong key gets OpenAI's 401
body, which (unlike OpenAI, which masks it) echoes the key back in full, so
tests can prove that engines scrub it.

Tests script replies with `queue`: an `Answer` (pieces of reasoning and
content, pacing, and faults: drop the connection, an error event, a malformed
event) or a `Failure` (an HTTP error). Without a script, the server echoes
the last message.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .local_server import Exchange, Failure, LocalServer

__all__ = ["Answer", "Failure", "FakeOpenAIServer", "token_logprob"]


@dataclass(frozen=True)
class Answer:
    """One scripted completion. Each piece is one streamed chunk (about a token)."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    #: "reasoning_content" (DeepSeek, vLLM) or "reasoning" (OpenRouter, Groq).
    reasoning_field: str = "reasoning_content"
    finish_reason: str = "stop"
    #: Reported (prompt_tokens, completion_tokens); None: the server reports no usage.
    usage: tuple[int, int] | None = (11, -1)  # -1: count the pieces
    delay_s: float = 0.0
    #: Send each piece's event in two TCP writes, cut mid-JSON, a moment apart.
    split_events: bool = False
    #: Interleave SSE comment lines, as OpenRouter does while it waits.
    comments: bool = False
    #: Faults, after this many streamed pieces: cut the connection (no [DONE]),
    #: send an error event, send ``malformed_event`` (by default not even JSON).
    drop_after: int | None = None
    error_after: int | None = None
    malformed_after: int | None = None
    malformed_event: bytes = b'data: {"id": "chatcmpl-fake", "choices": [\n\n'
    #: Tool calls after the content: (id, function name, argument pieces), streamed as
    #: OpenAI does (the first delta of a call names it, the next ones add arguments).
    tool_calls: list[tuple[str, str, list[str]]] = field(default_factory=list)


class FakeOpenAIServer(LocalServer):
    def __init__(self, *, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self._script: deque[Answer | Failure] = deque()

    def queue(self, *replies: Answer | Failure) -> None:
        """Script the next replies, one per request, in order."""
        self._script.extend(replies)

    def reset(self) -> None:
        super().reset()
        self._script.clear()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def handle(self, exchange: Exchange) -> None:
        request = exchange.request
        if request.method != "POST" or request.path != "/v1/chat/completions":
            await exchange.respond(
                404, _error(f"Unknown request URL: {request.method} {request.path}", "unknown_url")
            )
            return
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}":
                presented = auth.removeprefix("Bearer ")
                await exchange.respond(
                    401,
                    _error(
                        f"Incorrect API key provided: {presented}. You can find your API key"
                        " at https://platform.openai.com/account/api-keys.",
                        "invalid_api_key",
                    ),
                )
                return
        body = request.body
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("model"), str)
            or not body.get("messages")
        ):
            await exchange.respond(
                400, _error("'model' and 'messages' are required", "invalid_request")
            )
            return
        reply = self._script.popleft() if self._script else _echo(body)
        if isinstance(reply, Failure):
            await exchange.respond(reply.status, reply.body, reply.headers)
        elif body.get("stream"):
            await self._stream(exchange, body, reply)
        else:
            await exchange.respond(200, _completion(body, reply))

    async def _stream(self, exchange: Exchange, body: dict[str, Any], answer: Answer) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": None,
        }

        def event(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            chunk = {
                **base,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                ],
            }
            if include_usage:
                chunk["usage"] = None
            return _sse(chunk)

        await exchange.start(200, "text/event-stream; charset=utf-8")
        if not await exchange.write(event({"role": "assistant", "content": ""})):
            return
        pieces, finish = _capped(answer, body)
        said = 0  # content pieces so far
        for sent, (name, piece) in enumerate(pieces):
            if sent == answer.drop_after:
                return  # a started response left unfinished: uvicorn drops the connection
            if sent == answer.error_after:
                await exchange.write(
                    _sse({"error": {"message": "The server had an error", "type": "server_error"}})
                )
                await exchange.end()
                return
            if sent == answer.malformed_after:
                await exchange.write(answer.malformed_event)
                await exchange.end()
                return
            if sent and not await exchange.pause(answer.delay_s):
                return
            delta = {answer.reasoning_field: piece} if name == "reasoning" else {"content": piece}
            logprobs = None
            if name == "content" and body.get("logprobs"):
                top = body.get("top_logprobs") or 0
                logprobs = {"content": [token_logprob(piece, said, top)], "refusal": None}
                said += 1
            if answer.comments and not await exchange.write(b": OPENROUTER PROCESSING\n\n"):
                return
            if not await exchange.write_split(
                event(delta, None, logprobs), split=answer.split_events
            ):
                return
        for index, (call_id, name, arguments) in enumerate(answer.tool_calls):
            function = {"name": name, "arguments": ""}
            head = {"index": index, "id": call_id, "type": "function", "function": function}
            if not await exchange.write(event({"tool_calls": [head]})):
                return
            for piece in arguments:
                more = {"index": index, "function": {"arguments": piece}}
                if not await exchange.write(event({"tool_calls": [more]})):
                    return
        if not await exchange.write(event({}, finish)):
            return
        usage = _usage(answer, len(pieces))
        if include_usage and usage is not None:
            await exchange.write(_sse({**base, "choices": [], "usage": usage}))
        await exchange.write(b"data: [DONE]\n\n")
        await exchange.end()


def _capped(answer: Answer, body: dict[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """The pieces to send under the request's max_tokens, and the finish reason."""
    pieces = [("reasoning", p) for p in answer.reasoning] + [("content", p) for p in answer.content]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and len(pieces) > limit:
        return pieces[:limit], "length"
    return pieces, answer.finish_reason


def _completion(body: dict[str, Any], answer: Answer) -> dict[str, Any]:
    pieces, finish = _capped(answer, body)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(p for name, p in pieces if name == "content"),
        "refusal": None,
    }
    reasoning = "".join(p for name, p in pieces if name == "reasoning")
    if reasoning:
        message[answer.reasoning_field] = reasoning
    logprobs = None
    if body.get("logprobs"):
        content = [p for name, p in pieces if name == "content"]
        top = body.get("top_logprobs") or 0
        logprobs = {
            "content": [token_logprob(p, i, top) for i, p in enumerate(content)],
            "refusal": None,
        }
    if answer.tool_calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": "".join(a)}}
            for i, n, a in answer.tool_calls
        ]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        ],
        "usage": _usage(answer, len(pieces)),
    }


def token_logprob(piece: str, i: int, top: int) -> dict[str, Any]:
    """The made-up logprobs of the ``i``-th content piece: -(i + 1) / 8, its
    alternatives ``alt1``, ``alt2``... each 1 lower (``top`` entries in all)."""
    logprob = -(i + 1) / 8
    alternatives = [(piece, logprob)] + [(f"alt{j}", logprob - j) for j in range(1, top)]
    return {
        "token": piece,
        "logprob": logprob,
        "bytes": list(piece.encode()),
        "top_logprobs": [
            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives[:top]
        ],
    }


def _usage(answer: Answer, pieces: int) -> dict[str, int] | None:
    if answer.usage is None:
        return None
    prompt, completion = answer.usage
    completion = pieces if completion < 0 else completion
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _echo(body: dict[str, Any]) -> Answer:
    last = str(body["messages"][-1].get("content", ""))
    words = last.split()
    return Answer(content=[w if i == 0 else " " + w for i, w in enumerate(words)])


def _error(message: str, code: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()
