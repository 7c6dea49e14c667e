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
closed as remain open, and every ``_COMPACT_EVERY_S`` while sockets stay if the
process's resident memory grew by ``_GROWTH_TO_COMPACT`` since the last compaction (or
the first freeze). That pause is 0.7-1.9 s at 10,000 sockets: idle sockets, whose
memory stays flat, are not stopped for it every ten minutes, and garbage frozen
meanwhile (by HTTP requests, say), which can only take new memory, still cannot grow
the process by more than that share between two compactions. Memory, because the
collector offers nothing cheap that says what the freezes kept: counting the frozen
objects (``gc.get_freeze_count``) walked the heap for 0.4 s at 5,000 sockets, and its
allocation count (net of frees while above zero) added up to 5,500 objects a second
there, more than the process grew. With 5,000 idle sockets, compacting every 20 s for
the test, the old rule stopped the loop 1.6-2.5 s each time; this one compacted once
(the sockets had just opened) and then skipped, the process at 664-723 MiB.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
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
#: ...if the process's resident memory grew by this share since the last compaction
#: (or the first freeze); if not, it waits another interval.
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
        # Resident memory after the last compaction, or at the first freeze.
        self._rss_base: int | None = None

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
        if self._rss_base is None:
            self._rss_base = _resident_bytes()

    def _refreeze(self) -> None:
        # A timer, not a task: nothing is left pending when the loop stops.
        if self.open < self.freeze_every:
            self._refreezing = None
            return
        self._refreezes += 1
        if self._refreezes * _REFREEZE_S < _COMPACT_EVERY_S:
            gc.freeze()
        else:
            rss, base = _resident_bytes(), self._rss_base
            if rss is None or base is None or rss > base * (1 + _GROWTH_TO_COMPACT):
                self._compact("on schedule")
            else:
                logger.debug(
                    "heap compaction skipped: %d MiB resident (%d after the last), %d open",
                    rss >> 20,
                    base >> 20,
                    self.open,
                )
                self._refreezes = 0  # looked at again after another interval
                gc.freeze()
        self._refreezing = asyncio.get_running_loop().call_later(_REFREEZE_S, self._refreeze)

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
        logger.debug(
            "heap compacted %s (%d open) in %.0f ms",
            why,
            self.open,
            1000 * (time.perf_counter() - started),
        )
        self._closed_since_compaction = 0
        self._opened_since_freeze = 0
        self._refreezes = 0
        self._rss_base = _resident_bytes()


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc); None where there is none."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
