"""Where revoked token ids are kept: the `RevocationStore` protocol."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Protocol


class RevocationStore(Protocol):
    """Revoked token ids (``jti``), kept at least until the token would have expired.

    The SQL store (``chatfleet.serving.store``) implements it so that revocation
    survives restarts and is shared by every ingress replica.
    """

    async def revoke(self, jti: str, expires_at: datetime) -> None: ...

    async def is_revoked(self, jti: str) -> bool: ...

    async def revoked_since(self, after: datetime) -> list[str]:
        """The ids revoked after ``after`` (still unexpired), for `TokenWatch`."""
        ...


class MemoryRevocationStore:
    """Revocations in this process only (tests, ``--no-store`` experiments)."""

    def __init__(self) -> None:
        self._revoked: dict[str, float] = {}  # jti -> exp
        self._revoked_at: dict[str, float] = {}

    async def revoke(self, jti: str, expires_at: datetime) -> None:
        self._prune()
        self._revoked[jti] = expires_at.timestamp()
        self._revoked_at.setdefault(jti, time.time())

    async def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    async def revoked_since(self, after: datetime) -> list[str]:
        cutoff = after.timestamp()
        return [jti for jti, at in self._revoked_at.items() if at > cutoff]

    def _prune(self) -> None:
        # An expired token fails validation anyway: forget it.
        now = time.time()
        for jti in [j for j, exp in self._revoked.items() if exp < now]:
            del self._revoked[jti]
            self._revoked_at.pop(jti, None)
