"""Keep open WebSockets' objects out of Python's full garbage collections.

Each open socket holds a few hundred objects the cyclic collector tracks for its whole
life (uvicorn's and websockets' protocol state, Ray Serve's per-request wrappers, the
app's tasks, coroutines and events). A full (generation 2) collection walks all of them
with the GIL held: with 5,000 idle sockets in the ingress each one stopped the event
loop for 0.2 to 1.2 s, with 10,000 for 1.2 to 1.9 s, and one came every 8 to 20 s (the
heartbeats' objects, promoted while in flight, fill generation 2 until Python collects
it); sockets missed their pong deadline and were dropped. That was the chat p99 time to
first token of hundreds of ms with thousands of idle sockets (gc.callbacks timed it).

``gc.freeze()`` moves every object tracked now into a permanent generation the
collector skips; reference counting still frees them. The heap is frozen after every
``_FREEZE_EVERY`` sockets opened (a young collection first) and, while that many are
open, every ``_REFREEZE_S`` without one. Without the refreezes, young collections with
10,000 sockets (pinged every 5 s) took 35-70 ms each and freed 0-10 objects: what the
sockets allocate stays alive for a while. A young collection before each refreeze took
8-13 ms a second and freed nothing either; so, while sockets idle, no collection runs
(gc.callbacks timed all of these).

What freezing costs: cyclic garbage frozen with them (of a socket that then closes, of
a request that ended) is not reclaimed until `gc.unfreeze`. So the heap is compacted
(unfrozen, fully collected once: one pause, and frozen again) once as many sockets have
closed as remain open, and every ``_COMPACT_EVERY_S`` while sockets stay if the frozen
heap grew by ``_GROWTH_TO_COMPACT`` since the last compaction. That pause is 0.7-1.9 s
at 10,000 sockets: idle sockets whose heap does not grow are not stopped for it every
ten minutes (counting the frozen objects to know is a quarter of it), and garbage
frozen meanwhile (by HTTP requests, say) still cannot grow the heap by more than that
share between two compactions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

#: Sockets opened between two freezes: a young collection and a freeze cost about a
#: millisecond, so this bounds the unfrozen sockets (and a full collection's work).
_FREEZE_EVERY = 100
#: While that many sockets are open, the heap is also frozen this often: what they
#: keep between frames outlives young collections and would fill the young
#: generations (and generation 2) again within seconds.
_REFREEZE_S = 1.0
#: Cyclic garbage a refreeze caught is reclaimed by a compaction at most this late...
_COMPACT_EVERY_S = 600.0
#: ...if the frozen heap grew by this share (of the objects frozen after the last
#: compaction) since then; if not, it waits for the next interval.
_GROWTH_TO_COMPACT = 0.25


class LongLivedSockets:
    """Freezes the heap as WebSockets open, and compacts it once many have closed.

    A pure ASGI middleware: a counter per WebSocket opened and closed, nothing per
    message, nothing for HTTP.
    """

    def __init__(self, app: ASGIApp, freeze_every: int = _FREEZE_EVERY) -> None:
        self.app = app
        self.freeze_every = freeze_every
        self.open = 0
        self._opened_since_freeze = 0
        self._closed_since_compaction = 0
        self._refreezing: asyncio.TimerHandle | None = None
        self._refreezes = 0
        # Objects frozen after the last compaction (None: none yet).
        self._compacted_heap: int | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        self._opened()
        try:
            await self.app(scope, receive, send)
        finally:
            self._closed()

    def _opened(self) -> None:
        self.open += 1
        self._opened_since_freeze += 1
        if self._opened_since_freeze >= self.freeze_every:
            self._freeze()
            if self._refreezing is None:
                self._refreezing = asyncio.get_running_loop().call_later(
                    _REFREEZE_S, self._refreeze
                )

    def _freeze(self) -> None:
        # The young generations' garbage is collected first, not frozen with them.
        gc.collect(1)
        gc.freeze()
        self._opened_since_freeze = 0

    def _refreeze(self) -> None:
        # A timer, not a task: nothing is left pending when the loop stops.
        if self.open < self.freeze_every:
            self._refreezing = None
            return
        self._refreezes += 1
        if self._refreezes * _REFREEZE_S >= _COMPACT_EVERY_S and self._heap_grew():
            self._compact("on schedule")
        else:
            if self._refreezes * _REFREEZE_S >= _COMPACT_EVERY_S:
                self._refreezes = 0  # looked again at the next interval
            gc.freeze()
        self._refreezing = asyncio.get_running_loop().call_later(_REFREEZE_S, self._refreeze)

    def _heap_grew(self) -> bool:
        if self._compacted_heap is None:
            return True
        # Counting walks the frozen objects' list, without visiting what they refer to:
        # a quarter of a full collection's time (95 against 360 ms with 3 million
        # frozen objects, timed here on a busy box), once an interval.
        return gc.get_freeze_count() > self._compacted_heap * (1 + _GROWTH_TO_COMPACT)

    def _closed(self) -> None:
        self.open -= 1
        self._closed_since_compaction += 1
        closed = self._closed_since_compaction
        if closed >= self.freeze_every and closed >= self.open:
            self._compact(f"after {closed} WebSockets closed")

    def _compact(self, why: str) -> None:
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        # Even with no socket open: unfreeze released the start-up heap Ray Serve froze
        # when the replica started, too.
        gc.freeze()
        self._compacted_heap = gc.get_freeze_count()
        logger.debug(
            "heap compacted %s (%d open) in %.0f ms",
            why,
            self.open,
            1000 * (time.perf_counter() - started),
        )
        self._closed_since_compaction = 0
        self._opened_since_freeze = 0
        self._refreezes = 0
