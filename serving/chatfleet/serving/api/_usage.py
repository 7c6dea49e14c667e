"""Usage and budgets: every generation counted per client, model and day; budgets enforced.

`UsageMeter.admit` runs before a generation opens (in `Gateway.open`, the one seam):
a client over its ``budget`` gets a 429 (`BudgetExceeded`) naming the budget and
when it resets. When the answer ends, its prompt and completion tokens are counted
in memory and written to the store within `FLUSH_S` (one upsert per client, model
and day), so a client that goes away is still counted and a request costs no
database round trip; a token budget adds what this replica has not written yet.
Both go through the store, so budgets hold across ingress replicas; without a
store, usage is not kept and budgets are not enforced (a warning at start-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, date, datetime, timedelta

from chatfleet.serving.api._answers import Answer
from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.config import AuthConfig, ClientBudget
from chatfleet.serving.errors import BudgetExceeded
from chatfleet.serving.store import Store

logger = logging.getLogger(__name__)


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(1, int((moment - now).total_seconds() + 0.999))


#: How often the usage counted in memory is written to the store: one upsert per
#: client, model and day per interval, not one database round trip per request.
FLUSH_S = 1.0


class UsageMeter:
    def __init__(
        self,
        store: Store | None,
        auth: AuthConfig | None,
        metrics: Metrics | None = None,
        *,
        flush_s: float = FLUSH_S,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.flush_s = flush_s
        clients = auth.clients if auth is not None and auth.enabled else []
        self.budgets: dict[str, ClientBudget] = {
            c.client_id: c.budget for c in clients if c.budget is not None
        }
        if self.budgets and store is None:
            logger.warning("client budgets are configured but there is no store: not enforced")
        # (owner, model, day) -> [requests, prompt tokens, completion tokens] not yet stored.
        self._unwritten: dict[tuple[str, str, date], list[int]] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Set on shutdown: the flusher waiting out its interval writes at once.
        self._draining = asyncio.Event()

    async def admit(self, owner: str | None) -> None:
        """Raise `BudgetExceeded` if ``owner`` may not start another generation now."""
        budget = self.budgets.get(owner) if owner is not None else None
        if budget is None or self.store is None or owner is None:
            return
        now = datetime.now(UTC)
        if budget.tokens_per_day is not None:
            # What the store holds (every replica's), and what this one has not written.
            used = await self.store.tokens_on(owner, now.date()) + sum(
                counts[1] + counts[2]
                for (who, _, day), counts in self._unwritten.items()
                if who == owner and day == now.date()
            )
            if used >= budget.tokens_per_day:
                midnight = datetime.combine(
                    now.date() + timedelta(days=1), datetime.min.time(), UTC
                )
                raise BudgetExceeded(
                    f"client {owner!r} has used its budget of {budget.tokens_per_day} tokens"
                    f" per day ({used} used); it resets at {midnight.isoformat()}",
                    param="tokens_per_day",
                    retry_after=_seconds_until(midnight, now),
                )
        if budget.requests_per_minute is not None:
            count = await self.store.count_request(owner, now)
            if count > budget.requests_per_minute:
                minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
                raise BudgetExceeded(
                    f"client {owner!r} has used its budget of {budget.requests_per_minute}"
                    f" requests per minute; it resets at {minute.isoformat()}",
                    param="requests_per_minute",
                    retry_after=_seconds_until(minute, now),
                )

    def meter(self, answer: Answer, owner: str | None) -> None:
        """Count ``answer`` against ``owner`` once it has ended, however it ends."""
        if owner is None:
            return

        def record(done: Answer) -> None:
            usage = done.final_usage()
            if self.metrics is not None:
                prompt = self.metrics.client_tokens.labels(owner, done.model, "prompt")
                prompt.inc(usage.prompt_tokens)
                completion = self.metrics.client_tokens.labels(owner, done.model, "completion")
                completion.inc(usage.completion_tokens)
            if self.store is None:
                return
            key = (owner, done.model, datetime.now(UTC).date())
            counts = self._unwritten.setdefault(key, [0, 0, 0])
            counts[0] += 1
            counts[1] += max(0, usage.prompt_tokens)
            counts[2] += max(0, usage.completion_tokens)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.ensure_future(self._flush_soon())

        answer.on_end(record)

    async def _flush_soon(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._draining.wait(), self.flush_s)
        await self._flush()

    async def _flush(self) -> None:
        if self.store is None or not self._unwritten:
            return
        batch, self._unwritten = self._unwritten, {}
        try:
            await self.store.record_usage_batch(
                [
                    (owner, model, day, counts[0], counts[1], counts[2])
                    for (owner, model, day), counts in batch.items()
                ]
            )
        except Exception:
            logger.warning("could not record usage; kept for the next write", exc_info=True)
            for key, counts in batch.items():  # counted again with what comes next
                kept = self._unwritten.setdefault(key, [0, 0, 0])
                for i, value in enumerate(counts):
                    kept[i] += value

    async def drain(self) -> None:
        """Write the usage still counted in memory (on shutdown).

        The flusher is woken, not cancelled: cancelled during its write, it would lose
        the batch it had taken. Then what was counted meanwhile is written too.
        """
        self._draining.set()
        if self._flusher is not None:
            await asyncio.wait([self._flusher])
        await self._flush()
