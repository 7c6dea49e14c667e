"""Batch a token stream into messages before it crosses a Ray handle.

Every message through a Ray Serve streaming handle costs about 0.5-1 ms of CPU,
so an engine that yields one chunk per token caps a replica at a few hundred
tokens/s. `coalesce` merges consecutive chunks of the same kind until either
``max_tokens`` are pending or the oldest pending one is ``max_delay`` old. The
first chunk of a stream goes out at once: batching must not add to the time to
first token. ``max_delay`` may be a function, asked at every wait: an engine
replica lengthens it under load (`delay_for_load`).

One pump task per stream reads the engine; the consumer wakes once per batch,
not once per token (a task and a wait per token cost ~10 µs of CPU each, more
than a fast engine spends on the token itself).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from chatfleet.serving.config import CoalesceConfig
from chatfleet.serving.protocol import Chunk

# uvloop (Serve's throughput mode runs it) keeps timers on a 1 ms clock and may fire
# one up to a millisecond early; waiting again for the remainder then spins the loop
# with zero timeouts (at 64 streams it tripled a replica's CPU). A batch that is due
# within this margin goes out now.
_TIMER_SLACK_S = 0.001


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
        if last is not None and last.kind == chunk.kind and last.finish_reason is None:
            out[-1] = Chunk(
                kind=last.kind,
                text=last.text + chunk.text,
                tokens=last.tokens + chunk.tokens,
                finish_reason=chunk.finish_reason,
                usage=chunk.usage,
            )
        else:
            out.append(chunk)
    return out


class _Pump:
    """Reads ``source`` into ``pending``; pauses while a full batch awaits delivery."""

    def __init__(self, source: AsyncIterator[Chunk], max_tokens: int) -> None:
        self.source = source
        self.max_tokens = max_tokens
        self.pending: list[Chunk] = []
        self.tokens = 0
        self.first_at = 0.0
        self.full = False  # deliver now: count reached, stream end, or first chunk
        self.delivered_any = False
        self.done = False
        self.error: Exception | None = None
        self.wake = asyncio.Event()  # set on: first pending chunk, full, done
        self.room = asyncio.Event()  # clear while a full batch waits
        self.room.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for chunk in self.source:
                if not self.pending:
                    self.first_at = loop.time()
                    self.wake.set()
                self.pending.append(chunk)
                self.tokens += chunk.tokens
                if (
                    not self.delivered_any
                    or self.tokens >= self.max_tokens
                    or chunk.finish_reason is not None
                ):
                    self.full = True
                    self.wake.set()
                    self.room.clear()
                    await self.room.wait()
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True
            self.wake.set()

    def take(self) -> list[Chunk]:
        batch = _merge(self.pending)
        self.pending = []
        self.tokens = 0
        self.full = False
        self.delivered_any = True
        self.room.set()
        return batch


async def coalesce(
    source: AsyncIterator[Chunk],
    *,
    max_tokens: int = 256,
    max_delay: float | Callable[[], float] = 0.02,
) -> AsyncIterator[list[Chunk]]:
    """Yield lists of chunks from ``source``: the flushed batches.

    An engine error is raised after the text produced before it has been
    delivered. Closing the returned generator stops the pump and closes
    ``source``, so the engine stops generating.
    """
    loop = asyncio.get_running_loop()
    pump = _Pump(source, max_tokens)
    task = asyncio.create_task(pump.run())
    try:
        while True:
            if not pump.pending:
                if pump.done:
                    break
                pump.wake.clear()
                await pump.wake.wait()
                continue
            if not (pump.full or pump.done):
                delay = max_delay() if callable(max_delay) else max_delay
                remaining = pump.first_at + delay - loop.time()
                if remaining > _TIMER_SLACK_S:
                    pump.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await pump.wake.wait()
                    continue
            yield pump.take()
        if pump.error is not None:
            raise pump.error
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
