"""Any remote OpenAI-compatible API (OpenAI, Groq, OpenRouter, a vLLM server) as an engine.

The official ``openai`` client does the HTTP: retries before the first byte
(``max_retries``, honouring ``Retry-After``), timeouts, SSE decoding. This
module maps its output onto chunks and its failures onto the serving exception
tree.

Reasoning reaches us in one of three shapes, all turned into ``thinking``
chunks: ``delta.reasoning_content`` (DeepSeek, vLLM), ``delta.reasoning``
(OpenRouter, Groq, newer vLLM), or ``<think>`` tags inline in the content
(models served without a reasoning parser).

Failures::

    upstream answered with an HTTP error (after retries)  -> UpstreamError
    upstream unreachable or timed out before answering    -> EngineUnavailable
    connection lost mid-answer, error event, bad JSON     -> UpstreamError

Messages name the upstream by scheme, host and path only (no credentials or
query), and the API key is scrubbed from anything the upstream echoes back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from contextlib import aclosing
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
from openai import AsyncOpenAI, omit
from openai.types import CompletionUsage
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
)
from openai.types.chat.chat_completion import Choice as CompletionChoice
from openai.types.chat.chat_completion_chunk import Choice as StreamChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from chatfleet.serving.config import ModelConfig, OpenAIEngineConfig
from chatfleet.serving.engines._base import Engine
from chatfleet.serving.engines._logprobs import from_openai
from chatfleet.serving.engines._openai_tools import call_chunks, tool_arguments, wire_messages
from chatfleet.serving.engines._thinking import ThinkSplitter
from chatfleet.serving.errors import EngineError, EngineUnavailable, UpstreamError
from chatfleet.serving.protocol import (
    Chunk,
    ChunkKind,
    FinishReason,
    GenerationRequest,
    Message,
    TokenLogprob,
    Usage,
)

__all__ = ["OpenAIEngine"]

logger = logging.getLogger(__name__)

# Sent when no key is configured (vLLM's convention for servers without auth).
# Passing it also stops the client from picking up OPENAI_API_KEY on its own and
# sending that key to whatever base_url a model names.
_NO_KEY = "EMPTY"
_REASONING_FIELDS = ("reasoning_content", "reasoning")
_DETAIL_LIMIT = 300
_ChoiceT = TypeVar("_ChoiceT", CompletionChoice, StreamChoice)


class OpenAIEngine(Engine):
    """Streams chat completions from a remote OpenAI-compatible server."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model)
        settings = model.openai
        assert settings is not None  # guaranteed by ModelConfig's validation
        self.settings: OpenAIEngineConfig = settings
        self._client: AsyncOpenAI | None = None
        self._secret: str | None = None  # the key in use, to scrub from echoed errors
        self._where = _public_url(settings.base_url)

    async def start(self) -> None:
        self._connect()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        client = self._connect()
        answering = False
        try:
            if self.settings.stream:
                upstream = await client.chat.completions.create(
                    **self._arguments(request),
                    stream=True,
                    stream_options={"include_usage": True},
                )
                answering = True
                async with upstream, aclosing(_chunks_from_stream(upstream, request)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            else:
                completion = await client.chat.completions.create(
                    **self._arguments(request), stream=False
                )
                answering = True
                for chunk in _chunks_from_completion(completion, request):
                    yield chunk
        except openai.OpenAIError as exc:
            raise self._classify(exc, answering=answering) from None
        except ValueError as exc:  # not JSON, or JSON not shaped like the API (_Malformed)
            logger.warning("model %s: malformed upstream response: %s", self.name, exc)
            raise UpstreamError(f"{self._where} sent a malformed response") from None

    def _connect(self) -> AsyncOpenAI:
        if self._client is None:
            s = self.settings
            key = self._api_key()
            self._secret = key if key != _NO_KEY else None
            try:
                self._client = AsyncOpenAI(
                    base_url=s.base_url,
                    api_key=key,
                    timeout=s.timeout_s,
                    max_retries=s.max_retries,
                )
            except openai.OpenAIError as exc:
                raise EngineUnavailable(
                    f"model {self.name!r}: cannot set up the OpenAI client: {exc}"
                ) from None
        return self._client

    def _api_key(self) -> str:
        s = self.settings
        if s.api_key is not None:
            return s.api_key.get_secret_value()
        if s.api_key_env:
            key = os.environ.get(s.api_key_env)
            if not key:
                raise EngineUnavailable(
                    f"model {self.name!r}: environment variable {s.api_key_env}"
                    " (its API key) is not set"
                )
            return key
        return _NO_KEY

    def _arguments(self, request: GenerationRequest) -> dict[str, Any]:
        s = self.settings
        return {
            "model": s.model,
            "messages": wire_messages(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop or omit,
            "seed": request.seed if request.seed is not None else omit,
            # Only OpenAI's own penalties get here (the engine's capabilities).
            "frequency_penalty": request.sampling.get("frequency_penalty", omit),
            "presence_penalty": request.sampling.get("presence_penalty", omit),
            "extra_body": dict(s.extra_body) or None,
            "logprobs": True if request.logprobs is not None else omit,
            "top_logprobs": request.logprobs if request.logprobs is not None else omit,
            **tool_arguments(request),
        }

    def _classify(self, exc: openai.OpenAIError, *, answering: bool) -> EngineError:
        """Turn a client error into the serving tree, scrubbed of secrets."""
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = self._scrub(_detail(exc.body))
            logger.warning(
                "model %s: %s returned HTTP %s: %s", self.name, self._where, status, detail
            )
            hint = {
                401: " (API key rejected)",
                403: " (API key not allowed)",
                404: " (unknown model or URL)",
                429: " (rate limited)",
            }.get(status, "")
            return UpstreamError(
                f"{self._where} returned HTTP {status}{hint}" + (f": {detail}" if detail else "")
            )
        if isinstance(exc, openai.APIConnectionError):
            what = "timed out" if isinstance(exc, openai.APITimeoutError) else "connection failed"
            logger.warning("model %s: %s: %s", self.name, self._where, what)
            if answering:
                return UpstreamError(f"{self._where}: connection lost mid-answer ({what})")
            return EngineUnavailable(f"{self._where} is unreachable ({what})")
        if isinstance(exc, openai.APIError):  # an error event inside a 200 stream
            detail = self._scrub(_detail(exc.body) or exc.message)
            logger.warning("model %s: %s reported an error: %s", self.name, self._where, detail)
            return UpstreamError(f"{self._where} reported an error: {detail}")
        logger.warning("model %s: OpenAI client error: %s", self.name, type(exc).__name__)
        return UpstreamError(f"{self._where}: request failed ({type(exc).__name__})")

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


async def _chunks_from_stream(
    upstream: AsyncIterable[ChatCompletionChunk], request: GenerationRequest
) -> AsyncGenerator[Chunk]:
    """Chunks of one streamed completion; the last carries finish reason and usage."""
    answer = _Answer()
    finish: str | None = None
    usage: CompletionUsage | None = None
    named: set[int] = set()
    async for event in upstream:
        if not isinstance(event, ChatCompletionChunk):
            raise _Malformed(f"a stream event is a {type(event).__name__}")
        if isinstance(event.usage, CompletionUsage):
            usage = event.usage
        choice = _first_choice(event.choices, StreamChoice)
        if choice is None:  # e.g. the usage chunk
            continue
        if not isinstance(choice.delta, ChoiceDelta):
            raise _Malformed("a choice has no delta")
        logprobs = _logprobs(choice)
        for chunk in answer.feed(_reasoning(choice.delta), _text(choice.delta.content), logprobs):
            yield chunk
        for chunk in call_chunks(choice.delta.tool_calls, named):
            answer.pieces += 1
            yield chunk
        if choice.finish_reason:
            finish = choice.finish_reason
    yield answer.finish(finish, _usage(usage, request, answer.pieces))


def _chunks_from_completion(completion: ChatCompletion, request: GenerationRequest) -> list[Chunk]:
    """Chunks of one non-streamed completion: the reasoning if any, then the answer."""
    if not isinstance(completion, ChatCompletion):
        raise _Malformed(f"the completion is a {type(completion).__name__}")
    choice = _first_choice(completion.choices, CompletionChoice)
    if choice is None or not isinstance(choice.message, ChatCompletionMessage):
        raise _Malformed("the completion has no answer")
    reasoning, content = _reasoning(choice.message), _text(choice.message.content)
    usage = completion.usage if isinstance(completion.usage, CompletionUsage) else None
    answer = _Answer()
    parts = answer.feed(reasoning, content)
    counted = len((reasoning or "") + (content or "")) // 4 + 1
    last = answer.finish(choice.finish_reason, _usage(usage, request, counted))
    thinking = "".join(c.text for c in [*parts, last] if c.kind == "thinking")
    text = "".join(c.text for c in [*parts, last] if c.kind == "text")
    total = last.usage.completion_tokens if last.usage else 0
    # One call gives no per-token timing: share the tokens out by length.
    thinking_tokens = round(total * len(thinking) / max(1, len(thinking) + len(text)))
    chunks = [Chunk(kind="thinking", text=thinking, tokens=thinking_tokens)] if thinking else []
    chunks += call_chunks(choice.message.tool_calls, set())
    chunks.append(
        Chunk(
            kind="text",
            text=text,
            tokens=total - (thinking_tokens if thinking else 0),
            finish_reason=last.finish_reason,
            usage=last.usage,
            logprobs=_logprobs(choice),
        )
    )
    return chunks


class _Answer:
    """Turns reasoning and content pieces into chunks and counts their tokens.

    Each upstream piece stands for about one token. A piece held back by the
    `ThinkSplitter` (a tag cut in two) lends its token to the next chunk out.
    """

    def __init__(self) -> None:
        self._splitter = ThinkSplitter()
        self.pieces = 0
        self._owed = 0
        self._owed_logprobs: tuple[TokenLogprob, ...] = ()

    def feed(
        self, reasoning: str | None, content: str | None, logprobs: tuple[TokenLogprob, ...] = ()
    ) -> list[Chunk]:
        self._owed_logprobs += logprobs
        parts: list[tuple[ChunkKind, str]] = []
        if reasoning:
            parts.append(("thinking", reasoning))
        if content:
            parts += self._splitter.feed(content)
        self._owed += bool(reasoning) + bool(content)
        self.pieces += bool(reasoning) + bool(content)
        return self._chunks(parts)

    def finish(self, reason: str | None, usage: Usage) -> Chunk:
        tail = self._chunks(self._splitter.flush())
        text = "".join(c.text for c in tail)
        kind: ChunkKind = tail[-1].kind if tail else "text"
        return Chunk(
            kind=kind,
            text=text,
            tokens=sum(c.tokens for c in tail) + self._owed,
            finish_reason=_finish_reason(reason),
            usage=usage,
            logprobs=sum((c.logprobs for c in tail), self._owed_logprobs),
        )

    def _chunks(self, parts: list[tuple[ChunkKind, str]]) -> list[Chunk]:
        chunks = []
        for kind, text in parts:
            logprobs, self._owed_logprobs = self._owed_logprobs, ()
            chunks.append(Chunk(kind=kind, text=text, tokens=self._owed, logprobs=logprobs))
            self._owed = 0
        return chunks


class _Malformed(ValueError):
    """An upstream response that does not have the API's shape.

    The client builds response objects without validating them, so a server
    that bends the schema shows up here, not in the client.
    """


def _first_choice(choices: object, kind: type[_ChoiceT]) -> _ChoiceT | None:
    if choices is None:
        return None
    if not isinstance(choices, list) or not all(isinstance(c, kind) for c in choices):
        raise _Malformed("malformed choices")
    return next((c for c in choices if c.index == 0), None)


def _logprobs(choice: CompletionChoice | StreamChoice) -> tuple[TokenLogprob, ...]:
    """The choice's ``logprobs.content`` (none unless the request asked for them)."""
    try:
        return from_openai(choice.logprobs.content if choice.logprobs is not None else None)
    except (AttributeError, TypeError) as exc:
        raise _Malformed(f"malformed logprobs: {exc}") from None


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Malformed(f"content is a {type(value).__name__}")


def _reasoning(delta: Any) -> str | None:
    """Reasoning text of a delta or message, under whichever name the server uses."""
    for field in _REASONING_FIELDS:
        value = getattr(delta, field, None)
        if isinstance(value, str) and value:
            return value
    return None


def _usage(reported: CompletionUsage | None, request: GenerationRequest, counted: int) -> Usage:
    """Upstream's usage when it gave one, else our own count and estimate."""
    prompt = getattr(reported, "prompt_tokens", None)
    completion = getattr(reported, "completion_tokens", None)
    if not isinstance(prompt, int):
        prompt = _estimate_prompt_tokens(request.messages)
    if not isinstance(completion, int):
        completion = counted
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def _finish_reason(reason: str | None) -> FinishReason:
    if reason in ("length", "tool_calls"):
        return reason  # type: ignore[return-value]
    return "stop"


def _estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    """Rough prompt size for servers that report no usage: ~4 characters a token."""
    return sum(len(m.content) // 4 + 4 for m in messages)


def _detail(body: object) -> str:
    """The human part of an upstream error body, kept short."""
    if isinstance(body, dict):
        message = body.get("message", body.get("error"))
        text = message if isinstance(message, str) else json.dumps(body)
    elif body is None:
        text = ""
    else:
        text = str(body)
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 1] + "…"


def _public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: safe for messages and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")
