"""Batch a token stream into messages before it crosses a Ray handle.

Every message through a Ray Serve streaming handle costs about 1 ms of CPU, so
an engine that yields one chunk per token caps a replica at a few hundred
tokens/s. `coalesce` merges consecutive chunks of the same kind until either
``max_tokens`` are pending or the oldest pending one is ``max_delay`` old.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from chatfleet.serving.protocol import Chunk


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


async def coalesce(
    source: AsyncIterator[Chunk], *, max_tokens: int = 16, max_delay: float = 0.02
) -> AsyncIterator[list[Chunk]]:
    """Yield lists of chunks from ``source``: the flushed batches.

    Closing the returned generator cancels the pending read and closes
    ``source``, so the engine stops generating.
    """
    loop = asyncio.get_running_loop()
    pending: list[Chunk] = []
    pending_tokens = 0
    deadline = 0.0
    read: asyncio.Future[Chunk] | None = None
    try:
        while True:
            if read is None:
                read = asyncio.ensure_future(anext(source))
            if pending:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    # Our deadline passed while reads kept completing at once.
                    yield _merge(pending)
                    pending, pending_tokens = [], 0
                    continue
                done, _ = await asyncio.wait((read,), timeout=timeout)
                if not done:
                    yield _merge(pending)
                    pending, pending_tokens = [], 0
                    continue
            else:
                await asyncio.wait((read,))
            try:
                chunk = read.result()
            except StopAsyncIteration:
                read = None
                break
            except BaseException:
                # An engine failure: deliver what was said before it, then raise.
                read = None
                if pending:
                    yield _merge(pending)
                raise
            read = None
            if not pending:
                deadline = loop.time() + max_delay
            pending.append(chunk)
            pending_tokens += chunk.tokens
            if pending_tokens >= max_tokens or chunk.finish_reason is not None:
                yield _merge(pending)
                pending, pending_tokens = [], 0
        if pending:
            yield _merge(pending)
    finally:
        if read is not None and not read.done():
            read.cancel()
            with contextlib.suppress(BaseException):
                await read
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
