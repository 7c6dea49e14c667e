"""An answer as it streams (`Answer`, what `Gateway.open` returns) and storing it safely."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from chatfleet.serving.errors import StoreUnavailable
from chatfleet.serving.protocol import Chunk, GenerationRequest, TokenLogprob, ToolCall, Usage
from chatfleet.serving.routing import RoutingDecision
from chatfleet.serving.store import Store

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Partial answers are written to the store at most this often while streaming, so a
#: replica that dies mid-answer still leaves what was said.
CHECKPOINT_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Delta:
    """One batch of an answer, with the reasoning and the reply text it added."""

    chunks: list[Chunk]
    thinking: str
    text: str


class Answer:
    """One generation, opened by `Gateway.open`: its batches, and what they add up to.

    Iterate `deltas()` once (or `collect()`); either keeps the running totals (`content`,
    `reasoning`, `tokens`, `usage`, `finish_reason`) and closes the engine's stream
    however the iteration ends, which stops the generation when a client goes away.
    """

    def __init__(
        self,
        request: GenerationRequest,
        batches: AsyncGenerator[list[Chunk], None],
        decision: RoutingDecision | None = None,
    ) -> None:
        self.request = request
        self.decision = decision
        self._batches = batches
        self.text: list[str] = []
        self.thinking: list[str] = []
        #: The tool calls so far, by index: [id, name, arguments].
        self.calls: dict[int, list[str]] = {}
        #: The answer's tokens' logprobs, when the request asked for them.
        self.logprobs: list[TokenLogprob] = []
        self.tokens = 0
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self._checkpointed = time.monotonic()
        self._on_end: list[Callable[[Answer], None]] = []

    @classmethod
    def unopened(cls, request: GenerationRequest) -> Answer:
        """The answer to a request whose engine never started: empty, no usage."""
        return cls(request, _nothing())

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def route(self) -> dict[str, Any] | None:
        """Why ``model: auto`` chose this model; ``None`` for a named model."""
        return None if self.decision is None else self.decision.explain()

    def on_end(self, callback: Callable[[Answer], None]) -> None:
        """Call ``callback(self)`` once, when the answer ends (read through, failed, closed)."""
        self._on_end.append(callback)

    def _ended(self) -> None:
        callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("an end-of-answer callback failed")

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        try:
            async for batch in self._batches:
                yield Delta(batch, *self.add(batch))
        finally:
            await self._batches.aclose()
            self._ended()

    async def collect(self) -> Answer:
        async for _ in self.deltas():
            pass
        return self

    async def aclose(self) -> None:
        """Give up on an answer that will not be read (stops the engine)."""
        await self._batches.aclose()
        self._ended()

    def add(self, batch: list[Chunk]) -> tuple[str, str]:
        """Take a batch; returns the (thinking, text) it added."""
        thinking: list[str] = []
        text: list[str] = []
        for chunk in batch:
            self.tokens += chunk.tokens
            self.usage = chunk.usage or self.usage
            self.finish_reason = chunk.finish_reason or self.finish_reason
            if chunk.call is not None:
                call = self.calls.setdefault(chunk.call.index, ["", "", ""])
                call[0] = chunk.call.id or call[0]
                call[1] = chunk.call.name or call[1]
                call[2] += chunk.call.arguments
            if chunk.text:
                (thinking if chunk.kind == "thinking" else text).append(chunk.text)
            if chunk.logprobs and chunk.kind == "text":  # as OpenAI's: none for reasoning
                self.logprobs.extend(chunk.logprobs)
        self.thinking.extend(thinking)
        self.text.extend(text)
        return "".join(thinking), "".join(text)

    @property
    def content(self) -> str:
        return "".join(self.text)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(*self.calls[i]) for i in sorted(self.calls)]

    @property
    def reasoning(self) -> str:
        return "".join(self.thinking)

    @property
    def finish(self) -> str:
        return self.finish_reason or "stop"

    def final_usage(self) -> Usage:
        return self.usage or Usage(prompt_tokens=0, completion_tokens=self.tokens)

    def usage_dict(self) -> dict[str, int]:
        usage = self.final_usage()
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        }

    def checkpoint_due(self) -> bool:
        now = time.monotonic()
        if now - self._checkpointed < CHECKPOINT_INTERVAL_S:
            return False
        self._checkpointed = now
        return True


async def _nothing() -> AsyncGenerator[list[Chunk], None]:
    return
    yield  # an async generator that ends at once


class BackgroundWrites:
    """Store writes that must finish even if the request that started them is cancelled.

    `settle` awaits a write; if the caller is cancelled meanwhile (the client
    went away, Ray cancelled the request), the write carries on here.
    """

    def __init__(self) -> None:
        self._pending: set[asyncio.Task[Any]] = set()

    async def settle(self, write: Awaitable[_T]) -> _T:
        task: asyncio.Task[_T] = asyncio.ensure_future(write)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_failure)  # nobody is left to see how it ends
            raise

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


async def best_effort(action: Callable[[], Awaitable[Any]], what: str) -> None:
    """A side write (a checkpoint, a log line) whose failure must not end a stream."""
    try:
        await action()
    except Exception:
        logger.warning("%s failed", what, exc_info=True)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("a store write failed", exc_info=task.exception())


def require_store(store: Store | None) -> Store:
    if store is None:
        raise StoreUnavailable("this server has no store configured")
    return store
