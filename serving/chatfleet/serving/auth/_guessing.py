"""`GuessingGuard`: failed client-credential attempts, limited where they come from.

A wrong secret costs the address it came from: a token bucket of failures per
(client id, source address), so one address guessing one client's secret is
stopped, and one per source address, so a spray across many client ids is
stopped too. Nothing is counted against a client id alone: failures from one
address never lock out the right secret presented from another. Only failures
count, so a client that knows its secret never waits. Each ingress replica keeps
its own buckets (a guesser spread over N replicas gets N times the budget, still
a handful of guesses a minute).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from chatfleet.serving.auth._ratelimit import RateLimiter
from chatfleet.serving.config import CredentialGuessingConfig


class GuessingGuard:
    def __init__(
        self, config: CredentialGuessingConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        forgive = config.forgiven_per_minute
        self._pairs = RateLimiter(forgive, config.failures_per_client_address, clock=clock)
        self._addresses = RateLimiter(forgive, config.failures_per_address, clock=clock)

    def wait(self, client_id: str, address: str) -> float:
        """Seconds before ``address`` may try ``client_id``'s secret again (0.0: now)."""
        return max(self._pairs.wait(f"{client_id}\x00{address}"), self._addresses.wait(address))

    def failed(self, client_id: str, address: str) -> None:
        self._pairs.acquire(f"{client_id}\x00{address}")
        self._addresses.acquire(address)
