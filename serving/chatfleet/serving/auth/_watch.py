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
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def watched(self) -> int:
        """Connections waiting now."""
        return sum(len(events) for events in self._waiting.values())

    async def until_invalid(self, jti: str, expires_at: float) -> Ending:
        """Wait until the token ``jti`` expires (``expires_at``, epoch seconds) or is revoked."""
        revoked = asyncio.Event()
        self._waiting.setdefault(jti, set()).add(revoked)
        self._start_polling()
        try:
            async with asyncio.timeout(max(0.0, expires_at - self._clock())):
                await revoked.wait()
            return "revoked"
        except TimeoutError:
            return "expired"
        finally:
            events = self._waiting.get(jti)
            if events is not None:
                events.discard(revoked)
                if not events:
                    del self._waiting[jti]

    def revoked(self, jti: str) -> None:
        """A revocation (through this replica, or found by polling): wake its waiters."""
        for event in self._waiting.get(jti, ()):
            event.set()

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
