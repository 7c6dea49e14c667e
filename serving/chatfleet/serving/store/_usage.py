"""Usage per client: tokens and requests by model and day, and requests by minute.

Both are added to with one upsert (``INSERT ... ON CONFLICT DO UPDATE``, on SQLite
and PostgreSQL alike), so replicas counting at once never lose a count: this is
what lets budgets hold across ingress replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chatfleet.serving.store._database import Database, when
from chatfleet.serving.store._models import RequestWindowRow, UsageRow, storable, utcnow


@dataclass(frozen=True, slots=True)
class UsageEntry:
    owner: str
    day: date
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.owner,
            "day": self.day.isoformat(),
            "model": self.model,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


class UsageStore(Database):
    async def _add(self, s: AsyncSession, table: Any, keys: dict[str, Any], **add: int) -> None:
        """``INSERT keys + add``, or add ``add`` to the row with those ``keys``."""
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        insert = dialect.insert(table).values(**keys, **add)
        statement = insert.on_conflict_do_update(
            index_elements=list(keys),
            set_={name: getattr(table.c, name) + value for name, value in add.items()},
        )
        await s.execute(statement)

    async def record_usage(
        self,
        owner: str,
        model: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        at: datetime | None = None,
    ) -> None:
        """Count one request of ``owner`` to ``model`` and the tokens it took."""
        day = (at or utcnow()).date()
        keys = {"owner": storable(owner), "day": day, "model": storable(model)}
        async with self._tx() as s:
            await self._add(
                s,
                UsageRow.__table__,
                keys,
                requests=1,
                prompt_tokens=max(0, prompt_tokens),
                completion_tokens=max(0, completion_tokens),
            )

    async def record_usage_batch(self, rows: list[tuple[str, str, date, int, int, int]]) -> None:
        """Add ``(owner, model, day, requests, prompt_tokens, completion_tokens)`` rows, in
        one transaction (a replica writes what it counted since its last write)."""
        async with self._tx() as s:
            for owner, model, day, requests, prompt, completion in rows:
                await self._add(
                    s,
                    UsageRow.__table__,
                    {"owner": storable(owner), "day": day, "model": storable(model)},
                    requests=requests,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                )

    async def usage(
        self,
        *,
        owner: str | None = None,
        model: str | None = None,
        since: date | None = None,
        until: date | None = None,
        limit: int = 1000,
    ) -> list[UsageEntry]:
        """Usage rows, newest day first (``owner``/``model``: only theirs; days inclusive)."""
        query = select(UsageRow).order_by(UsageRow.day.desc(), UsageRow.owner, UsageRow.model)
        if owner is not None:
            query = query.where(UsageRow.owner == owner)
        if model is not None:
            query = query.where(UsageRow.model == model)
        if since is not None:
            query = query.where(UsageRow.day >= since)
        if until is not None:
            query = query.where(UsageRow.day <= until)
        async with self._tx() as s:
            rows = (await s.scalars(query.limit(limit))).all()
            return [
                UsageEntry(
                    r.owner, r.day, r.model, r.requests, r.prompt_tokens, r.completion_tokens
                )
                for r in rows
            ]

    async def tokens_on(self, owner: str, day: date) -> int:
        """Every token ``owner`` used on ``day`` (UTC), all models together."""
        query = select(
            func.coalesce(func.sum(UsageRow.prompt_tokens + UsageRow.completion_tokens), 0)
        ).where(UsageRow.owner == owner, UsageRow.day == day)
        async with self._tx() as s:
            return int(await s.scalar(query) or 0)

    async def count_request(self, owner: str, at: datetime | None = None) -> int:
        """Count a request of ``owner`` in its minute; returns that minute's count so far."""
        minute = _minute(when(at) if at is not None else utcnow())
        keys = {"owner": storable(owner), "minute": minute}
        async with self._tx() as s:
            await self._add(s, RequestWindowRow.__table__, keys, requests=1)
            count = await s.scalar(
                select(RequestWindowRow.requests).where(
                    RequestWindowRow.owner == keys["owner"], RequestWindowRow.minute == minute
                )
            )
            # Earlier minutes no longer matter: the table stays one row per busy client.
            await s.execute(
                delete(RequestWindowRow).where(
                    RequestWindowRow.owner == keys["owner"],
                    RequestWindowRow.minute < minute - timedelta(minutes=1),
                )
            )
            return int(count or 0)
