"""Storage of conversations, sessions, logs and revoked tokens."""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, field_serializer, model_validator

from chatfleet.serving.config._base import _Model


class StoreConfig(_Model):
    """Where conversations, sessions, logs and revoked tokens are kept."""

    url: SecretStr | None = Field(
        None,
        description="SQLAlchemy async URL (postgresql+asyncpg://..., sqlite+aiosqlite:///...)."
        " Empty: a SQLite file under the data directory. In a cluster, set url_env instead.",
    )
    url_env: str | None = Field(
        None, description="Name of the environment variable holding the URL (from a Secret)."
    )
    data_dir: str | None = Field(
        None,
        description="Folder of the default SQLite file; empty: $CHATFLEET_DATA_DIR or"
        " ~/.local/share/chatfleet.",
    )
    migrate_on_start: bool = Field(
        True, description="Apply Alembic migrations when the server starts."
    )
    history_limit: int = Field(
        200, ge=1, le=100_000, description="Most stored messages prepended to a conversation."
    )
    pool_size: int = Field(5, ge=1, le=200, description="Connections per replica (PostgreSQL).")
    heartbeat_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="How often a replica renews its lease and looks for sessions and replies"
        " left in progress by replicas that are gone.",
    )
    lease_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="A replica that has not renewed its lease for this long is gone: what it"
        " was running is marked interrupted, at most lease_s + heartbeat_s after it stopped."
        " At least twice heartbeat_s, so that a slow live replica is never taken for dead.",
    )
    events_flush_s: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Session events are written to the store in batches at most this far"
        " apart (a finishing session's at once).",
    )
    events_poll_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="How often a replica reads the events other replicas stored (on"
        " PostgreSQL, LISTEN/NOTIFY wakes it at once; this is the fallback).",
    )
    events_retention_s: float = Field(
        86_400.0,
        gt=0,
        description="Stored session events older than this are deleted (resume reaches back"
        " this far).",
    )

    @model_validator(mode="after")
    def _lease_outlasts_heartbeats(self) -> Self:
        if self.lease_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"store.lease_s ({self.lease_s}) must be at least twice store.heartbeat_s"
                f" ({self.heartbeat_s}), or a live replica could be taken for dead"
            )
        return self

    @field_serializer("url", when_used="json")
    def _reveal_url(self, url: SecretStr | None) -> str | None:
        return url.get_secret_value() if url is not None else None
