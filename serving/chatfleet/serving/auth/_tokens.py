"""JWT access and refresh tokens (HS256) for registered clients."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jwt

from chatfleet.serving.auth._guessing import GuessingGuard
from chatfleet.serving.auth._keys import load_signing_key
from chatfleet.serving.auth._ratelimit import RateLimiter
from chatfleet.serving.auth._revocation import RevocationStore
from chatfleet.serving.auth._watch import Ending, TokenWatch
from chatfleet.serving.config import AuthConfig, ClientCredential
from chatfleet.serving.errors import (
    AuthenticationError,
    InvalidClient,
    RequestError,
    TokenExpired,
    TokenRevoked,
)

logger = logging.getLogger(__name__)

TokenType = Literal["access", "refresh"]
_ALGORITHM = "HS256"
_REQUIRED = ["sub", "scope", "type", "jti", "iat", "exp", "iss"]


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified token's claims."""

    client_id: str
    scopes: tuple[str, ...]
    token_type: TokenType
    jti: str
    issued_at: int
    expires_at: int
    issuer: str

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Claims:
        token_type = payload["type"]
        if token_type not in ("access", "refresh") or not isinstance(payload["scope"], str):
            raise AuthenticationError("malformed token")
        return cls(
            client_id=str(payload["sub"]),
            scopes=tuple(payload["scope"].split()),
            token_type=token_type,
            jti=str(payload["jti"]),
            issued_at=int(payload["iat"]),
            expires_at=int(payload["exp"]),
            issuer=str(payload["iss"]),
        )

    def as_dict(self) -> dict[str, Any]:
        """The JWT claim names (what ``/auth/validate`` returns)."""
        return {
            "sub": self.client_id,
            "scope": " ".join(self.scopes),
            "type": self.token_type,
            "jti": self.jti,
            "iat": self.issued_at,
            "exp": self.expires_at,
            "iss": self.issuer,
        }


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int
    scopes: tuple[str, ...]

    def as_response(self) -> dict[str, Any]:
        """An OAuth 2.0 token response (RFC 6749 §5.1)."""
        return {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "refresh_expires_in": self.refresh_expires_in,
            "scope": " ".join(self.scopes),
        }


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Authenticator:
    """Issues, verifies, refreshes (with rotation) and revokes tokens; rate-limits clients.

    Secrets are compared as SHA-256 digests in constant time; an unknown client
    id costs the same comparison as a known one.

    Revocation lookups are cached (a database round trip per request would cost
    more than the request): a revocation made through this instance holds at
    once; one made through another replica holds here within
    ``revocation_cache_s``. Refresh rotation always asks the store.
    """

    def __init__(
        self,
        config: AuthConfig,
        signing_key: str,
        revocations: RevocationStore,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        revocation_cache_s: float = 2.0,
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.revocations = revocations
        self._key = signing_key
        self._clock = clock
        self._clients: dict[str, ClientCredential] = {c.client_id: c for c in config.clients}
        self._digests: dict[str, bytes] = {}
        for client in config.clients:
            if client.secret_sha256 is not None:
                self._digests[client.client_id] = bytes.fromhex(client.secret_sha256)
            elif client.secret_env and env.get(client.secret_env):
                self._digests[client.client_id] = _sha256(env[client.secret_env])
            else:
                logger.warning(
                    "client %s: %s is not set; it cannot obtain tokens",
                    client.client_id,
                    client.secret_env,
                )
        self._decoy = secrets.token_bytes(32)
        limit = config.rate_limit
        self.rate_limiter = (
            RateLimiter(limit.requests_per_minute, limit.burst) if limit.enabled else None
        )
        self.guessing = GuessingGuard(config.guessing)
        self._rotation = asyncio.Lock()
        self._revocation_cache = _RevocationCache(revocation_cache_s)
        self.watch = TokenWatch(revocations, poll_s=config.socket_recheck_s, clock=clock)

    @classmethod
    def from_config(
        cls,
        config: AuthConfig,
        revocations: RevocationStore,
        *,
        data_dir: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Authenticator:
        """With the key from ``config.signing_key_env``, else the local key file."""
        key = load_signing_key(config, data_dir, environ)
        return cls(config, key, revocations, environ=environ)

    # ---- issuing -----------------------------------------------------------------

    def mint(self, client_id: str, scopes: tuple[str, ...] | list[str]) -> TokenPair:
        """A fresh access + refresh pair, no questions asked (callers check first)."""
        now = int(self._clock())
        scopes = tuple(scopes)
        access_ttl = self.config.access_token_ttl_s
        refresh_ttl = self.config.refresh_token_ttl_s
        return TokenPair(
            access_token=self._encode(client_id, scopes, "access", now, access_ttl),
            refresh_token=self._encode(client_id, scopes, "refresh", now, refresh_ttl),
            expires_in=access_ttl,
            refresh_expires_in=refresh_ttl,
            scopes=scopes,
        )

    def _encode(
        self, client_id: str, scopes: tuple[str, ...], kind: TokenType, now: int, ttl: int
    ) -> str:
        payload = {
            "sub": client_id,
            "scope": " ".join(scopes),
            "type": kind,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + ttl,
            "iss": self.config.issuer,
        }
        return jwt.encode(payload, self._key, algorithm=_ALGORITHM)

    async def issue(
        self,
        client_id: str,
        client_secret: str,
        scope: str | None = None,
        *,
        source: str = "unknown",
    ) -> TokenPair:
        """The client-credentials grant. Raises `InvalidClient` on any mismatch.

        ``source`` is the caller's address: a mismatch counts against it (see
        `GuessingGuard`; ask ``guessing.wait`` before calling this).
        """
        expected = self._digests.get(client_id, self._decoy)
        matches = hmac.compare_digest(_sha256(client_secret), expected)
        if not matches or client_id not in self._digests:
            self.guessing.failed(client_id, source)
            raise InvalidClient("unknown client or wrong secret")
        granted = self._clients[client_id].scopes
        if scope:
            requested = scope.split()
            refused = [s for s in requested if s not in granted]
            if refused:
                raise RequestError(f"scope not granted: {' '.join(refused)}", param="scope")
            granted = requested
        return self.mint(client_id, granted)

    async def refresh(self, refresh_token: str) -> TokenPair:
        """A new pair for a refresh token, which is revoked (rotation: single use)."""
        claims = await self.validate(refresh_token, token_type="refresh")
        if claims.client_id not in self._digests:
            raise InvalidClient("the client is no longer registered")
        async with self._rotation:
            # Two refreshes with the same token: only the first one wins.
            if await self.revocations.is_revoked(claims.jti):
                raise AuthenticationError("token has been revoked")
            await self.revocations.revoke(claims.jti, _datetime(claims.expires_at))
            self._revocation_cache.revoked(claims.jti, claims.expires_at)
        return self.mint(claims.client_id, claims.scopes)

    # ---- verifying -----------------------------------------------------------------

    def decode(self, token: str, *, verify_exp: bool = True) -> Claims:
        """Check signature, issuer and shape (not revocation). Raises `AuthenticationError`."""
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                issuer=self.config.issuer,
                options={"require": _REQUIRED, "verify_exp": verify_exp},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token has expired") from None
        except jwt.InvalidTokenError:
            raise AuthenticationError("invalid token") from None
        return Claims.from_payload(payload)

    async def validate(self, token: str, *, token_type: TokenType = "access") -> Claims:
        """Verified, unexpired, unrevoked claims of the given type, or `AuthenticationError`."""
        claims = self.decode(token)
        if claims.token_type != token_type:
            raise AuthenticationError(
                f"expected {'an' if token_type == 'access' else 'a'} {token_type} token"
            )
        if await self._is_revoked(claims):
            raise AuthenticationError("token has been revoked")
        return claims

    async def ensure_current(self, claims: Claims) -> None:
        """Claims verified earlier (a long-lived WebSocket's) still hold: unexpired, unrevoked."""
        if claims.expires_at <= self._clock():
            raise AuthenticationError("token has expired")
        if await self._is_revoked(claims):
            raise AuthenticationError("token has been revoked")

    async def revoke(self, token: str, *, by: Claims | None = None) -> Claims:
        """Revoke a token (access or refresh) of the caller ``by``; expired ones need nothing."""
        claims = self.decode(token, verify_exp=False)
        if by is not None and claims.client_id != by.client_id:
            raise RequestError("the token was issued to another client", param="token")
        if claims.expires_at > self._clock():
            await self.revocations.revoke(claims.jti, _datetime(claims.expires_at))
            self._revocation_cache.revoked(claims.jti, claims.expires_at)
            self.watch.revoked(claims.jti)
        return claims

    async def until_invalid(self, claims: Claims) -> AuthenticationError:
        """Wait while an open connection's token holds; returns the error that ends it.

        Expiry ends it on time; a revocation through this replica at once, through
        another within ``config.socket_recheck_s``.
        """
        return _ending_error(await self.watch.until_invalid(claims.jti, claims.expires_at))

    def when_invalid(
        self, claims: Claims, on_end: Callable[[AuthenticationError], None]
    ) -> Callable[[], None]:
        """`until_invalid` as a callback: ``on_end`` gets the error that ends the
        connection; returns what stops the watch."""
        return self.watch.notify(
            claims.jti, claims.expires_at, lambda how: on_end(_ending_error(how))
        )

    async def _is_revoked(self, claims: Claims) -> bool:
        cached = self._revocation_cache.get(claims.jti)
        if cached is not None:
            return cached
        revoked = await self.revocations.is_revoked(claims.jti)
        if revoked:
            self._revocation_cache.revoked(claims.jti, claims.expires_at)
        else:
            self._revocation_cache.valid(claims.jti)
        return revoked

    def retry_after(self, client_id: str) -> float:
        """0 when ``client_id`` may make a request now, else seconds to wait."""
        if self.rate_limiter is None:
            return 0.0
        return self.rate_limiter.acquire(client_id)


class _RevocationCache:
    """Known-revoked ids (until they expire) and recently checked valid ids (briefly)."""

    def __init__(self, valid_for_s: float, max_entries: int = 100_000) -> None:
        self._valid_for_s = valid_for_s
        self._max = max_entries
        self._revoked: dict[str, float] = {}  # jti -> exp (epoch seconds)
        self._valid: OrderedDict[str, float] = OrderedDict()  # jti -> checked (monotonic)

    def get(self, jti: str) -> bool | None:
        if jti in self._revoked:
            return True
        checked = self._valid.get(jti)
        if checked is not None and time.monotonic() - checked < self._valid_for_s:
            return False
        return None

    def valid(self, jti: str) -> None:
        if self._valid_for_s <= 0:
            return
        self._valid[jti] = time.monotonic()
        self._valid.move_to_end(jti)
        while len(self._valid) > self._max:
            self._valid.popitem(last=False)

    def revoked(self, jti: str, expires_at: float) -> None:
        self._valid.pop(jti, None)
        if len(self._revoked) >= self._max:
            now = time.time()
            for old in [j for j, exp in self._revoked.items() if exp < now]:
                del self._revoked[old]
            if len(self._revoked) >= self._max:
                return  # the store still answers for the rest
        self._revoked[jti] = expires_at


def _datetime(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _ending_error(how: Ending) -> AuthenticationError:
    if how == "expired":
        return TokenExpired("token has expired; refresh it and reconnect")
    return TokenRevoked("token has been revoked")
