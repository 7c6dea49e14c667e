"""An Ollama server as an engine: ``POST /api/chat`` streamed as NDJSON.

In a cluster Ollama runs as a sidecar of the GPU worker pod; locally it is
whatever ``ollama serve`` listens on. Each streamed line is a JSON object;
``message.thinking`` (when ``think`` is on) is reasoning, ``message.content``
the answer, which may itself carry ``<think>`` tags for models Ollama does not
parse. The line with ``"done": true`` ends the answer with ``done_reason`` and
the token counts. The request's sampling (temperature, top_p, max_tokens as
``num_predict``, seed, stop, and the sampling extras: top_k, min_p, penalties) goes
into ``options`` over the configured ones.

Tools and ``response_format`` use Ollama's own fields: ``tools`` (OpenAI's shape; left
out for ``tool_choice: none``, and only the first call is kept for
``parallel_tool_calls: false``: Ollama has neither option; ``tool_choice`` ``required``
or a named function constrains the answer with ``format`` and reads it back as calls,
see `_forced_tools`, so it cannot go with a ``response_format``, refused at the ingress),
``message.tool_calls`` in the history and the answer (arguments as a JSON object,
not a text; a call has no id, so one is made up here) and ``format`` (``"json"`` or
the schema). Ollama sends each tool call whole, in one line; the answer then ends
with ``done_reason: stop``, reported here as ``tool_calls`` as OpenAI does.
``logprobs``/``top_logprobs`` are Ollama's own fields too (since 0.12.11): each line
then carries its tokens' ``logprobs`` in OpenAI's shape.

Failures::

    Ollama unreachable (connect error or connect timeout)   -> EngineUnavailable
    non-200 status, an {"error": ...} line, bad JSON,
    read timeout, connection lost, stream ended before done -> UpstreamError
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import httpx

from chatfleet.serving.config import ModelConfig, OllamaEngineConfig
from chatfleet.serving.engines._base import Engine
from chatfleet.serving.engines._forced_tools import ForcedCalls, forced_schema
from chatfleet.serving.engines._logprobs import from_json
from chatfleet.serving.engines._thinking import ThinkSplitter
from chatfleet.serving.errors import EngineUnavailable, UpstreamError
from chatfleet.serving.protocol import (
    Chunk,
    ChunkKind,
    FinishReason,
    GenerationRequest,
    Message,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)

__all__ = ["OllamaEngine"]

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 10.0
_DETAIL_LIMIT = 300
#: Sampling extras Ollama spells its own way (the others keep their names).
_OLLAMA_OPTIONS = {"repetition_penalty": "repeat_penalty"}


class OllamaEngine(Engine):
    """Streams chat answers from an Ollama server."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model)
        settings = model.ollama
        assert settings is not None  # guaranteed by ModelConfig's validation
        self.settings: OllamaEngineConfig = settings
        self._client: httpx.AsyncClient | None = None
        self._where = f"Ollama at {_public_url(settings.base_url)}"

    async def start(self) -> None:
        self._connect()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        client = self._connect()
        try:
            async with client.stream("POST", "/api/chat", json=self._body(request)) as response:
                if response.status_code != 200:
                    detail = _detail(await response.aread())
                    logger.warning(
                        "model %s: %s returned HTTP %s: %s",
                        self.name,
                        self._where,
                        response.status_code,
                        detail,
                    )
                    raise UpstreamError(
                        f"{self._where} returned HTTP {response.status_code}"
                        + (f": {detail}" if detail else "")
                    )
                async with aclosing(self._chunks(response, request)) as chunks:
                    async for chunk in chunks:
                        yield chunk
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            logger.warning("model %s: %s unreachable: %s", self.name, self._where, exc)
            raise EngineUnavailable(f"{self._where} is unreachable") from None
        except httpx.TimeoutException:
            raise UpstreamError(
                f"{self._where} did not answer within {self.settings.timeout_s:g}s"
            ) from None
        except httpx.HTTPError as exc:
            logger.warning("model %s: %s: %s", self.name, self._where, exc)
            raise UpstreamError(f"{self._where}: connection lost ({type(exc).__name__})") from None

    async def _chunks(
        self, response: httpx.Response, request: GenerationRequest
    ) -> AsyncGenerator[Chunk]:
        splitter = ThinkSplitter()
        forced = ForcedCalls.of(request)
        calls = 0
        generated = 0  # streamed lines with text: one generated token each
        owed = 0  # tokens of text the splitter holds back, paid with the next chunk
        logprobs: tuple[TokenLogprob, ...] = ()  # and their logprobs
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            event = self._parse(line)
            message = event.get("message") or {}
            if not isinstance(message, dict):
                raise self._malformed(line)
            thinking, content = message.get("thinking"), message.get("content")
            if not (_is_text(thinking) and _is_text(content)):
                raise self._malformed(line)
            parts: list[tuple[ChunkKind, str]] = [("thinking", thinking)] if thinking else []
            if content:
                parts += splitter.feed(content)
            if thinking or content:
                generated += 1
                owed += 1
            if request.logprobs is not None:
                try:
                    logprobs += from_json(event.get("logprobs"))
                except ValueError:
                    raise self._malformed(line) from None
            for kind, text in parts:
                for chunk in self._forced(forced, kind, text, calls):
                    calls += chunk.call is not None and chunk.call.id is not None
                    yield replace(chunk, tokens=owed, logprobs=logprobs)
                    owed, logprobs = 0, ()
            for call in message.get("tool_calls") or ():
                if calls and request.parallel_tool_calls is False:
                    break  # Ollama cannot be told: the calls past the first are dropped
                yield self._call_chunk(call, calls, request, line)
                calls += 1
            if event.get("done"):
                tail = splitter.flush()
                finish = _finish_reason(event.get("done_reason"))
                if forced is not None:
                    for chunk in self._forced_end(forced, tail, calls, finish):
                        calls += chunk.call is not None and chunk.call.id is not None
                        yield replace(chunk, tokens=owed)
                        owed = 0
                    tail = []
                finish = "tool_calls" if calls and finish == "stop" else finish
                prompt_count, eval_count = event.get("prompt_eval_count"), event.get("eval_count")
                if not isinstance(prompt_count, int):  # left out when the prompt was cached
                    prompt_count = _estimate_prompt_tokens(request.messages)
                yield Chunk(
                    kind=tail[0][0] if tail else "text",
                    text=tail[0][1] if tail else "",
                    tokens=owed,
                    logprobs=logprobs,
                    finish_reason=finish,
                    usage=Usage(
                        prompt_tokens=prompt_count,
                        completion_tokens=eval_count if isinstance(eval_count, int) else generated,
                    ),
                )
                return
        raise UpstreamError(f"{self._where} ended the stream before the answer was done")

    def _forced(
        self, forced: ForcedCalls | None, kind: ChunkKind, text: str, calls: int
    ) -> list[Chunk]:
        if forced is None or kind != "text":
            return [Chunk(kind=kind, text=text)]
        return forced.feed(text, calls)

    def _forced_end(
        self,
        forced: ForcedCalls,
        tail: list[tuple[ChunkKind, str]],
        calls: int,
        finish: FinishReason,
    ) -> list[Chunk]:
        """The forced answer's last calls; text cut short by ``length`` is sent as text."""
        chunks = [c for kind, text in tail for c in self._forced(forced, kind, text, calls)]
        started = sum(c.call is not None and c.call.id is not None for c in chunks)
        try:
            return chunks + forced.finish(calls + started, finish)
        except ValueError as exc:
            if finish == "length":
                return [*chunks, Chunk(kind="text", text=forced.text)]
            logger.warning(
                "model %s: %s broke the forced tool choice: %s", self.name, self._where, exc
            )
            raise UpstreamError(
                f"{self._where} did not answer with the tool calls tool_choice asks for"
            ) from None

    def _parse(self, line: str) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise self._malformed(line)
        if "error" in event:
            detail = _detail(event["error"])
            logger.warning("model %s: %s reported: %s", self.name, self._where, detail)
            raise UpstreamError(f"{self._where} reported an error: {detail}")
        return event

    def _call_chunk(self, call: object, index: int, request: GenerationRequest, line: str) -> Chunk:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", {}) if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, dict | str):
            raise self._malformed(line)
        call_id = call.get("id") if isinstance(call, dict) else None
        if not isinstance(call_id, str) or not call_id:
            call_id = f"call_{request.request_id[:16]}_{index}"
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return Chunk(kind="tool_call", text="", call=ToolCallDelta(index, text, call_id, name))

    def _malformed(self, line: str) -> UpstreamError:
        logger.warning("model %s: malformed line from %s: %.200r", self.name, self._where, line)
        return UpstreamError(f"{self._where} sent a malformed line")

    def _connect(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = self.settings.timeout_s
            self._client = httpx.AsyncClient(
                base_url=self.settings.base_url,
                timeout=httpx.Timeout(timeout, connect=min(timeout, _CONNECT_TIMEOUT_S)),
            )
        return self._client

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            **s.options,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "num_predict": request.max_tokens,
        }
        if request.seed is not None:
            options["seed"] = request.seed
        if request.stop:
            options["stop"] = list(request.stop)
        for name, value in request.sampling.items():
            options[_OLLAMA_OPTIONS.get(name, name)] = value
        body: dict[str, Any] = {
            "model": s.model,
            "messages": _messages(request.messages),
            "stream": True,
            "options": options,
        }
        if request.tools and request.tool_choice != "none":
            body["tools"] = request.tools
        form = request.response_format
        forcing = forced_schema(request)
        if forcing is not None:
            # The tools stay in the prompt for the model to read; the format makes it call.
            body["format"] = forcing
        elif form is not None:
            schema = form.get("json_schema", {}).get("schema")
            body["format"] = schema if form["type"] == "json_schema" and schema else "json"
        if request.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
        if s.think is not None:
            body["think"] = s.think
        if s.keep_alive is not None:
            body["keep_alive"] = s.keep_alive
        return body


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The conversation in Ollama's shape: calls with object arguments, results named."""
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None and m.tool_call_id in names:
            message["tool_name"] = names[m.tool_call_id]
        out.append(message)
    return out


def _arguments(text: str) -> Any:
    # What a client says the model called with is not ours to refuse: kept as text.
    try:
        return json.loads(text)
    except ValueError:
        return text


def _is_text(value: object) -> TypeGuard[str | None]:
    return value is None or isinstance(value, str)


def _finish_reason(reason: object) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    """Rough prompt size when Ollama reports none (cached prompt): ~4 characters a token."""
    return sum(len(m.content) // 4 + 4 for m in messages)


def _detail(body: object) -> str:
    """The human part of an Ollama error (``{"error": "..."}``), kept short."""
    if isinstance(body, bytes):
        text = body.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = text
    if isinstance(body, dict):
        error = body.get("error")
        body = error if isinstance(error, str) else json.dumps(body)
    text = " ".join(str(body).split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"


def _public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: safe for messages and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")
