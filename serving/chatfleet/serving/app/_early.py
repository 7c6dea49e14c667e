"""`EarlyStarts`: generations an engine replica started from a request the ingress sent
ahead on the token relay's link, until their Serve handle call joins them.

Serve's gRPC call can take tens of milliseconds to reach a replica on a busy machine;
the copy on the link (`chatfleet.serving.relay`) arrives in one or two. The engine
starts on the copy, and the handle call, when it comes, takes the started generation
over (`claim`): its outcome, its cancellation and Serve's accounting are the call's from
then on. A copy whose call never comes (Serve sent the request elsewhere, or the client
left while it was routed) is cancelled when the ingress withdraws it (`drop`) or, at
the latest, after ``claim_within_s``. A call that comes first claims its id, so a copy
arriving after it is ignored.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["EarlyStarts"]

#: How long a started copy waits for its handle call (Serve's call is normally a few
#: milliseconds behind; seconds on a starved machine).
CLAIM_WITHIN_S = 30.0
# Ids whose handle call came first, kept so that their copies are ignored.
_MAX_CLAIMED = 10_000

Result = list[Any]


class EarlyStarts:
    """The started copies of one engine replica, by stream id."""

    def __init__(self, claim_within_s: float = CLAIM_WITHIN_S) -> None:
        self._claim_within_s = claim_within_s
        self._started: dict[str, tuple[asyncio.Task[Result], asyncio.TimerHandle | None]] = {}
        self._claimed: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._started)

    def start(
        self,
        stream_id: str,
        run: Callable[[], Coroutine[Any, Any, Result]],
        *,
        alone: bool = False,
        on_end: Callable[[], object] | None = None,
    ) -> bool:
        """Start ``run()`` for ``stream_id``, unless its handle call came first (or it
        was started already). ``alone``: no handle call follows (the request came on the
        link alone); it is kept until it ends, and `drop` still stops it. ``on_end()`` is
        called when the run ends, however (cancelled before it began too)."""
        if stream_id in self._claimed or stream_id in self._started:
            return False
        loop = asyncio.get_running_loop()
        task = loop.create_task(run())
        timer = None if alone else loop.call_later(self._claim_within_s, self.drop, stream_id)
        self._started[stream_id] = (task, timer)
        task.add_done_callback(_consume)
        if on_end is not None:
            task.add_done_callback(lambda _: on_end())
        if alone:
            task.add_done_callback(lambda _: self._ended(stream_id, task))
        return True

    def _ended(self, stream_id: str, task: asyncio.Task[Result]) -> None:
        started = self._started.get(stream_id)
        if started is not None and started[0] is task:
            del self._started[stream_id]

    def claim(self, stream_id: str) -> asyncio.Task[Result] | None:
        """The handle call for ``stream_id`` came: its started generation, or None (the
        call runs it, and a copy coming later is ignored)."""
        started = self._started.pop(stream_id, None)
        if started is not None:
            if started[1] is not None:
                started[1].cancel()
            return started[0]
        self._claimed[stream_id] = None
        while len(self._claimed) > _MAX_CLAIMED:
            self._claimed.popitem(last=False)
        return None

    def drop(self, stream_id: str) -> None:
        """Cancel ``stream_id``'s copy if no handle call took it over."""
        started = self._started.pop(stream_id, None)
        if started is not None:
            if started[1] is not None:
                started[1].cancel()
            started[0].cancel()

    def close(self) -> None:
        for stream_id in list(self._started):
            self.drop(stream_id)


def _consume(task: asyncio.Task[Result]) -> None:
    """Read a copy's outcome so that one nobody claims logs no "never retrieved"."""
    if not task.cancelled():
        task.exception()
