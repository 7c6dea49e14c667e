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
        waiter = _Waiter(on_end)
        waiters = self._waiting.setdefault(jti, set())
        waiters.add(waiter)
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(max(0.0, expires_at - self._clock()), waiter, "expired")
        self._start_polling()

        def stop() -> None:
            waiter.ended = True
            expiry.cancel()
            waiters.discard(waiter)
            if not waiters and self._waiting.get(jti) is waiters:
                del self._waiting[jti]

        waiter.stop = stop
        return stop

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
    """One watched connection: ends once, stopping its watch first."""

    __slots__ = ("ended", "on_end", "stop")

    def __init__(self, on_end: Callable[[Ending], None]) -> None:
        self.on_end = on_end
        self.ended = False
        self.stop: Callable[[], None] = lambda: None

    def __call__(self, how: Ending) -> None:
        if not self.ended:
            self.stop()
            self.on_end(how)
