"""Authentication: JWT settings, the registered clients and their rate limit."""

from __future__ import annotations

from pydantic import Field, model_validator

from chatfleet.serving.config._base import _Model


class ClientBudget(_Model):
    """What a client may use, counted through the store (so across every ingress replica)."""

    tokens_per_day: int | None = Field(
        None,
        ge=1,
        description="Prompt plus completion tokens per UTC day, all models together; then"
        " 429 (budget_exceeded) until midnight UTC. A request under way when it is reached"
        " finishes.",
    )
    requests_per_minute: int | None = Field(
        None,
        ge=1,
        description="Generation requests per minute (UTC minutes); then 429 until the next.",
    )


class ClientCredential(_Model):
    """A registered API client allowed to obtain tokens."""

    client_id: str = Field(..., min_length=1, max_length=200, description="The client's id.")
    secret_env: str | None = Field(
        None, description="Environment variable holding the client secret (from a Secret)."
    )
    secret_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Hex SHA-256 of the client secret, for config files.",
    )
    scopes: list[str] = Field(
        default_factory=lambda: ["chat"],
        description="Scopes granted in its tokens. chat: use the API, with its own"
        " conversations, sessions, events and usage only; admin: see and manage every"
        " client's (the dashboard's view).",
    )

    budget: ClientBudget | None = Field(
        None, description="Usage limits of this client; none: unlimited (usage is still counted)."
    )

    @model_validator(mode="after")
    def _one_secret(self) -> ClientCredential:
        if (self.secret_env is None) == (self.secret_sha256 is None):
            raise ValueError(
                f"client {self.client_id!r}: give exactly one of secret_env or secret_sha256"
            )
        return self


class RateLimitConfig(_Model):
    """Per-client token bucket."""

    enabled: bool = Field(True, description="Limit each client's request rate.")
    requests_per_minute: float = Field(
        600, gt=0, le=1_000_000, description="Sustained requests per minute per client."
    )
    burst: int = Field(60, ge=1, le=100_000, description="Requests a client may send at once.")


class CredentialGuessingConfig(_Model):
    """Limits on wrong client secrets at ``/auth/token``, by where they come from."""

    failures_per_client_address: int = Field(
        10,
        ge=1,
        le=10_000,
        description="Wrong secrets one source address may try for one client id before it"
        " must wait (429 with Retry-After); other addresses are not affected.",
    )
    failures_per_address: int = Field(
        30,
        ge=1,
        le=100_000,
        description="Wrong secrets one source address may try across all client ids (sprays).",
    )
    forgiven_per_minute: float = Field(
        2,
        gt=0,
        le=10_000,
        description="Failures forgiven per minute (the buckets refill at this rate).",
    )
    forwarded_hops: int = Field(
        0,
        ge=0,
        le=10,
        description="Proxies in front of the ingress that append the client's address to"
        " X-Forwarded-For (e.g. 1 behind an ingress controller that does). 0: the peer"
        " address is the source; never set it higher than the proxies that really append,"
        " or clients can choose their own address.",
    )


class AuthConfig(_Model):
    """JWT bearer authentication (on by default)."""

    enabled: bool = Field(True, description="Require a bearer token on every API call.")
    signing_key_env: str = Field(
        "CHATFLEET_JWT_SIGNING_KEY",
        description="Environment variable with the HS256 signing key (the operator fills it"
        " from a Secret). Locally, a key is generated once and kept in the data directory.",
    )
    issuer: str = Field("chatfleet", description="The tokens' iss claim.")
    access_token_ttl_s: int = Field(
        900, ge=30, le=86_400, description="Lifetime of access tokens, seconds."
    )
    refresh_token_ttl_s: int = Field(
        1_209_600, ge=60, le=31_536_000, description="Lifetime of refresh tokens, seconds."
    )
    socket_recheck_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How soon an open WebSocket whose token was revoked through another"
        " replica is closed, seconds (through its own replica: at once; on expiry: on time).",
    )
    clients: list[ClientCredential] = Field(
        default_factory=list, max_length=1000, description="Clients that may obtain tokens."
    )
    rate_limit: RateLimitConfig = Field(
        default_factory=RateLimitConfig, description="Per-client rate limit."
    )
    guessing: CredentialGuessingConfig = Field(
        default_factory=CredentialGuessingConfig,
        description="Limits on wrong client secrets, per source address.",
    )
