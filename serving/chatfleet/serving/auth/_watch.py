"""`TokenWatch`: tells a long-lived connection when its token stops holding.

A WebSocket is authenticated once, when it opens; its token may expire or be
revoked hours before it closes. The watch wakes each connection's waiter at its
token's expiry, at once when the token is revoked through this replica, and
within ``poll_s`` when it is revoked through another one: one query per replica
and interval (`RevocationStore.revoked_since`), however many sockets are open,
and only while some are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from chatfleet.serving.auth._revocation import RevocationStore

logger = logging.getLogger(__name__)

Ending = Literal["expired", "revoked"]

# Revocations are stamped with the revoking replica's clock: look back this far
# beyond the last poll, so clocks that disagree by less never hide one.
_CLOCK_SKEW = timedelta(seconds=30)


class TokenWatch:
    def __init__(
        self,
        revocations: RevocationStore,
        *,
        poll_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.revocations = revocations
        self.poll_s = poll_s
        self._clock = clock
        self._waiting: dict[str, set[_Waiter]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def watched(self) -> int:
        """Connections waiting now."""
        return sum(len(waiters) for waiters in self._waiting.values())

    def notify(
        self, jti: str, expires_at: float, on_end: Callable[[Ending], None]
    ) -> Callable[[], None]:
        """Call ``on_end`` once, when the token ``jti`` expires (``expires_at``, epoch
        seconds) or is revoked; returns what stops the watch (idempotent).

        A timer and an entry in a dict per connection, no task: an idle socket costs the
        event loop nothing until its token ends.
        """
        waiter = _Waiter(self, jti, on_end)
        self._waiting.setdefault(jti, set()).add(waiter)
        delay = max(0.0, expires_at - self._clock())
        waiter.expiry = asyncio.get_running_loop().call_later(delay, waiter, "expired")
        self._start_polling()
        return waiter.stop

    def _forget(self, waiter: _Waiter) -> None:
        waiters = self._waiting.get(waiter.jti)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiting[waiter.jti]

    async def until_invalid(self, jti: str, expires_at: float) -> Ending:
        """Wait until the token ``jti`` expires (``expires_at``, epoch seconds) or is revoked."""
        ended: asyncio.Future[Ending] = asyncio.get_running_loop().create_future()

        def settle(how: Ending) -> None:
            if not ended.done():  # cancelled with the waiting task, before `stop`
                ended.set_result(how)

        stop = self.notify(jti, expires_at, settle)
        try:
            return await ended
        finally:
            stop()

    def revoked(self, jti: str) -> None:
        """A revocation (through this replica, or found by polling): wake its waiters."""
        for waiter in list(self._waiting.get(jti, ())):
            waiter("revoked")

    def _start_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="token-watch")

    async def _poll(self) -> None:
        since = datetime.now(UTC) - _CLOCK_SKEW
        while self._waiting:
            await asyncio.sleep(self.poll_s)
            started = datetime.now(UTC)
            try:
                found = await self.revocations.revoked_since(since)
            except Exception:
                if not self._failing:  # once per outage, not once per poll
                    logger.warning("cannot poll token revocations", exc_info=True)
                self._failing = True
                continue
            self._failing = False
            since = started - _CLOCK_SKEW
            for jti in found:
                self.revoked(jti)


class _Waiter:
    """One watched connection: ends once, stopping its watch first (no reference
    cycle is left behind: its timer is dropped when it stops)."""

    __slots__ = ("ended", "expiry", "jti", "on_end", "watch")

    def __init__(self, watch: TokenWatch, jti: str, on_end: Callable[[Ending], None]) -> None:
        self.watch = watch
        self.jti = jti
        self.on_end = on_end
        self.ended = False
        self.expiry: asyncio.TimerHandle | None = None

    def __call__(self, how: Ending) -> None:
        if not self.ended:
            self.stop()
            self.on_end(how)

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        self.ended = True
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.watch._forget(self)
