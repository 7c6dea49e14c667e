"""Batch a token stream into messages on its way to the ingress (handle or relay).

Every message through a Ray Serve streaming handle costs about 0.1 ms of CPU on
each side, so an engine that yields one chunk per token caps a replica at a few
thousand tokens/s. `coalesce` merges consecutive chunks of the same kind into
batches, like Nagle's algorithm: a chunk goes out at once when nothing went out
in the last ``max_delay`` seconds, otherwise it waits until ``max_delay`` after
the previous batch, or until ``max_tokens`` are pending. So no token waits more
than ``max_delay``, a slow stream's tokens are not held at all, and a stream
sends at most one message per ``max_delay``. The first chunk and the last one
(with a finish reason) always go out at once. ``max_delay`` may be a function,
asked once per batch: an engine replica lengthens it under load (`delay_for_load`).

One pump task per stream reads the engine, and the consumer wakes once per batch.
A source that runs ahead (it goes on decoding while unread: a GPU, a generation
thread, a remote server, `FakeEngine` at a set tokens/s) is not read again until
the batch is due: the pump sleeps once per batch instead of waking for every
token, and takes what piled up when it wakes; near the request's max_tokens it
is read eagerly again, so an answer cut at its length is not held at its end (one
that stops on its own may be, by up to ``max_delay``). Any other source is read
eagerly, and its batch goes out when due even if the source then stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

from chatfleet.serving.config import CoalesceConfig
from chatfleet.serving.protocol import Chunk


def delay_for_load(config: CoalesceConfig, active_streams: int) -> float:
    """Seconds a batch may wait when a replica streams ``active_streams`` at once.

    ``max_delay_ms`` while the replica's streams together send fewer than
    ``max_messages_per_s`` messages; beyond that, the delay grows with the streams so
    that they stay near that rate, up to ``max_delay_under_load_ms``.
    """
    spread_s = active_streams / config.max_messages_per_s
    return min(max(config.max_delay_ms / 1000, spread_s), config.max_delay_under_load_ms / 1000)


def _merge(pending: list[Chunk]) -> list[Chunk]:
    out: list[Chunk] = []
    for chunk in pending:
        last = out[-1] if out else None
        # Tool-call pieces stay apart: each says which call it belongs to.
        mergeable = last is not None and last.kind == chunk.kind != "tool_call"
        if last is not None and mergeable and last.finish_reason is None:
            out[-1] = Chunk(
                kind=last.kind,
                text=last.text + chunk.text,
                tokens=last.tokens + chunk.tokens,
                finish_reason=chunk.finish_reason,
                usage=chunk.usage,
                logprobs=last.logprobs + chunk.logprobs,
            )
        else:
            out.append(chunk)
    return out


class _Pump:
    """Reads ``source`` into ``pending`` and tells the consumer when a batch is due."""

    def __init__(
        self,
        source: AsyncGenerator[Chunk, None],
        max_tokens: int,
        max_delay: Callable[[], float],
        lazy: bool,
        limit: int | None,
    ) -> None:
        self.source = source
        self.lazy = lazy
        self.limit = limit
        self.read = 0  # tokens read from the source so far
        self.first_read_at = 0.0
        self.max_tokens = max_tokens
        self.max_delay = max_delay
        self.pending: list[Chunk] = []
        self.tokens = 0
        self.due_at = 0.0  # loop time before which a new batch waits (last batch + delay)
        self.delivered_any = False
        self.done = False
        self.error: Exception | None = None
        self.ready = asyncio.Event()  # the consumer's wake-up: a batch is due, or the end
        self.room = asyncio.Event()  # cleared while a batch that must go first waits
        self.room.set()
        self.timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for chunk in self.source:
                now = loop.time()
                if not self.read:
                    self.first_read_at = now
                self.read += chunk.tokens
                self.pending.append(chunk)
                self.tokens += chunk.tokens
                if (
                    not self.delivered_any
                    or self.tokens >= self.max_tokens
                    or chunk.finish_reason is not None
                ):
                    # Out at once, and alone: the first token, a full batch, the end.
                    self.ready.set()
                    self.room.clear()
                    await self.room.wait()
                elif now >= self.due_at:
                    # Due now: the consumer takes it (with whatever the source yields
                    # before it next makes the pump wait).
                    self.ready.set()
                elif self.lazy and not self.ends_before(self.due_at, now):
                    # Early, from a source that runs ahead: read it again when due.
                    await asyncio.sleep(self.due_at - now)
                    self.ready.set()
                elif self.timer is None:
                    # Read on, but the batch goes when due even if the source stalls.
                    self.timer = loop.call_at(self.due_at, self.ready.set)
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True
            self.ready.set()

    def ends_before(self, when: float, now: float) -> bool:
        """Whether, at its pace so far, the stream reaches its token limit by ``when``.

        Such a stream is read eagerly from then on, so its end is not held back.
        """
        elapsed = now - self.first_read_at
        if self.limit is None or self.read < 2 or elapsed <= 0:
            return False
        rate = (self.read - 1) / elapsed
        return self.read + rate * (when - now) >= self.limit

    def take(self) -> list[Chunk]:
        batch = _merge(self.pending)
        self.pending = []
        self.tokens = 0
        self.delivered_any = True
        self.due_at = asyncio.get_running_loop().time() + self.max_delay()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.room.set()
        return batch


async def coalesce(
    source: AsyncGenerator[Chunk, None],
    *,
    max_tokens: int = 256,
    max_delay: float | Callable[[], float] = 0.02,
    runs_ahead: bool = False,
    limit: int | None = None,
) -> AsyncGenerator[list[Chunk], None]:
    """Yield lists of chunks from ``source``: the flushed batches.

    ``runs_ahead``: the source goes on producing while unread (`Engine.runs_ahead`),
    so it is left unread until a batch is due; ``limit`` (the request's max_tokens):
    once the stream is due to reach it within a batch, it is read eagerly, so an
    answer cut at its length ends without waiting for the batch.

    An engine error is raised after the text produced before it has been
    delivered. Closing the returned generator stops the pump and closes
    ``source``, so the engine stops generating.
    """
    if callable(max_delay):
        delay = max_delay
    else:
        fixed = max_delay

        def delay() -> float:
            return fixed

    pump = _Pump(source, max_tokens, delay, runs_ahead, limit)
    task = asyncio.create_task(pump.run())
    try:
        while True:
            if not pump.done:
                await pump.ready.wait()
                pump.ready.clear()
            if pump.pending:
                yield pump.take()
            elif pump.done:
                break
        if pump.error is not None:
            raise pump.error
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await source.aclose()
