"""Revoked token ids, kept until the tokens expire anyway."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from chatfleet.serving.store._database import Database, when
from chatfleet.serving.store._models import RevokedTokenRow, utcnow


class TokenStore(Database):
    async def revoke(self, jti: str, expires_at: datetime | float) -> None:
        """Remember a token id as revoked until it expires. Idempotent.

        ``expires_at`` is an aware datetime or seconds since the epoch (the
        token's ``exp`` claim).
        """
        expires = when(expires_at)
        try:
            async with self._tx() as s:
                if await s.get(RevokedTokenRow, jti) is None:
                    s.add(RevokedTokenRow(jti=jti, expires_at=expires))
        except IntegrityError:
            pass  # revoked concurrently: the outcome is the same

    async def is_revoked(self, jti: str) -> bool:
        async with self._tx() as s:
            found = await s.scalar(select(RevokedTokenRow.jti).where(RevokedTokenRow.jti == jti))
            return found is not None

    async def revoked_since(self, after: datetime) -> list[str]:
        """The ids revoked after ``after`` whose tokens have not expired."""
        query = select(RevokedTokenRow.jti).where(
            RevokedTokenRow.revoked_at > when(after), RevokedTokenRow.expires_at > utcnow()
        )
        async with self._tx() as s:
            return list((await s.scalars(query)).all())

    async def purge_expired(self, now: datetime | float | None = None) -> int:
        """Forget revocations of tokens that have expired anyway; returns how many."""
        cutoff = when(now) if now is not None else utcnow()
        async with self._tx() as s:
            result = await s.execute(
                delete(RevokedTokenRow).where(RevokedTokenRow.expires_at <= cutoff)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]
