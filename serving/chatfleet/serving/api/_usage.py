"""Usage and budgets: every generation counted per client, model and day; budgets enforced.

`UsageMeter.admit` runs before a generation opens (in `Gateway.open`, the one seam):
a client over its ``budget`` gets a 429 (`BudgetExceeded`) naming the budget and
when it resets. When the answer ends, its prompt and completion tokens are added
to the store (`Store.record_usage`), in the background, so a client that goes away
is still counted. Both go through the store, so budgets hold across ingress
replicas; without a store, usage is not kept and budgets are not enforced (the
config says so at start-up).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from chatfleet.serving.api._answers import Answer
from chatfleet.serving.api._metrics import Metrics
from chatfleet.serving.config import AuthConfig, ClientBudget
from chatfleet.serving.errors import BudgetExceeded
from chatfleet.serving.store import Store

logger = logging.getLogger(__name__)


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(1, int((moment - now).total_seconds() + 0.999))


class UsageMeter:
    def __init__(
        self, store: Store | None, auth: AuthConfig | None, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.metrics = metrics
        clients = auth.clients if auth is not None and auth.enabled else []
        self.budgets: dict[str, ClientBudget] = {
            c.client_id: c.budget for c in clients if c.budget is not None
        }
        if self.budgets and store is None:
            logger.warning("client budgets are configured but there is no store: not enforced")
        self._pending: set[asyncio.Task[Any]] = set()

    async def admit(self, owner: str | None) -> None:
        """Raise `BudgetExceeded` if ``owner`` may not start another generation now."""
        budget = self.budgets.get(owner) if owner is not None else None
        if budget is None or self.store is None or owner is None:
            return
        now = datetime.now(UTC)
        if budget.tokens_per_day is not None:
            used = await self.store.tokens_on(owner, now.date())
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
        store, metrics = self.store, self.metrics

        def record(done: Answer) -> None:
            usage = done.final_usage()
            if metrics is not None:
                metrics.client_tokens.labels(owner, done.model, "prompt").inc(usage.prompt_tokens)
                tokens = metrics.client_tokens.labels(owner, done.model, "completion")
                tokens.inc(usage.completion_tokens)
            if store is None:
                return
            task = asyncio.ensure_future(
                store.record_usage(
                    owner,
                    done.model,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                )
            )
            self._pending.add(task)
            task.add_done_callback(self._recorded)

        answer.on_end(record)

    def _recorded(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not record usage", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for the usage still being written (on shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
