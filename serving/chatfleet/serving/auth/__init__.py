"""Authentication: JWT access and refresh tokens for registered clients.

`Authenticator` issues tokens for the client-credentials grant, verifies them,
rotates refresh tokens (a used refresh token is revoked) and revokes tokens
through a `RevocationStore` (the SQL store in production, so revocation
survives restarts). Its `RateLimiter` is a per-client token bucket. The signing
key comes from an environment variable (a Secret in a cluster) or, locally, a
key file generated once in the data folder with mode 0600.
"""

from chatfleet.serving.auth._keys import data_dir, load_signing_key, local_signing_key
from chatfleet.serving.auth._ratelimit import RateLimiter
from chatfleet.serving.auth._revocation import MemoryRevocationStore, RevocationStore
from chatfleet.serving.auth._tokens import Authenticator, Claims, TokenPair, TokenType

__all__ = [
    "Authenticator",
    "Claims",
    "MemoryRevocationStore",
    "RateLimiter",
    "RevocationStore",
    "TokenPair",
    "TokenType",
    "data_dir",
    "load_signing_key",
    "local_signing_key",
]
